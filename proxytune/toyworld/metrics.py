"""The toy world oracle's scores as proxytune metrics (registered by `plugin.register`): subject accuracy,
prompt accuracy and both at once, per image, for the world's subjects (`images: toyworld:NAME`).

The oracle reads every image's attributes once per model; the three metrics share that reading.
"""

from __future__ import annotations


from proxytune.metrics import Metric, ScoringInputs, register
from proxytune.toyworld.judges import oracle_reader, oracle_scores  # the judges, read here as metrics

WORLD = "toyworld"  # the world's name, and the metrics' provider
APPLIES_TO = "toy subjects (images: toyworld:NAME)"
NOTE = ("Subject acc.: fraction of images in which the oracle finds every distinctive attribute of the subject the "
        "prompt does not change; prompt acc.: per image, the fraction of the attributes the prompt asks for that the "
        "oracle finds, averaged; subject+prompt acc.: fraction of images showing the subject and everything the "
        "prompt asks.")
METRICS = (  # name, label, what encoders.json says it is
    ("subject_acc", "subject acc.",
     "1 when the oracle reads every attribute of distinctive(subject, prompt) off the image, else 0"),
    ("prompt_acc", "prompt acc.", "fraction of parse_prompt(prompt without identifier) the oracle reads off the image"),
    ("subject_prompt_acc", "subject+prompt acc.",
     "1 when subject_acc is 1 and the oracle reads all of parse_prompt(...), else 0"),
)


def _scores(inputs: ScoringInputs) -> dict:
    """The three scores of one model's images: the oracle loaded once per evaluation, read once per model."""
    from proxytune.toyworld.subjects import SUBJECTS

    if "toyworld.oracle" not in inputs.session:
        inputs.session["toyworld.oracle"] = oracle_reader()
    if "toyworld.oracle" not in inputs.cache:
        inputs.cache["toyworld.oracle"] = oracle_scores(inputs.session["toyworld.oracle"], inputs.images,
                                                        inputs.prompts, inputs.token, SUBJECTS[inputs.item])
    return inputs.cache["toyworld.oracle"]


def describe(world, item: str | None) -> dict:
    """encoders.json's `oracle`: the oracle's weights and the subject's look."""
    from proxytune.toyworld.builtins import manifest, oracle_folder
    from proxytune.toyworld.subjects import SUBJECTS

    return {"oracle": {"model": "toy-oracle", "path": str(oracle_folder()),
                       "digest": manifest().get("toy-oracle", {}).get("digest"),
                       "subject": item, "look": SUBJECTS[item].description(),
                       **{name: text for name, _, text in METRICS}}}


def register_metrics() -> None:
    for name, label, text in METRICS:
        register(Metric(name=name, label=label, scope="subject", description=text,
                        score=lambda inputs, name=name: _scores(inputs)[name], needs=("world",), provider=WORLD,
                        note=NOTE, applies_to=APPLIES_TO, describe=describe))
