"""The toy world oracle's scores as proxytune metrics (registered by `plugin.register`): subject accuracy,
prompt accuracy and both at once, per image, for the world's subjects (`images: toyworld:NAME`).

The oracle reads every image's attributes once per model; the three metrics share that reading.
"""

from __future__ import annotations

import numpy as np

from proxytune.metrics import Metric, ScoringInputs, register

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


def oracle_reader():
    """The shipped oracle (toy-oracle) as a function: images -> one attribute reading per image."""
    from proxytune.toyworld.oracle import shipped_reader

    return shipped_reader()


def oracle_scores(read, images: list[list], prompts: list[str], token: str, subject) -> dict:
    """(N,) arrays of the oracle's subject and prompt accuracy per generated image, prompt-major order.

    Args:
        read: images -> attribute readings ({"cls": "box", "colour": ...} per image), e.g. `oracle_reader()`.
        images: per prompt, its generated images.
        prompts: the prompts, identifier included.
        token: the identifier, removed before the prompt is parsed.
        subject: the toy subject (`proxytune.toyworld.subjects.SUBJECTS[name]`).
    Returns:
        {"subject_acc": 1.0 where the image shows all of distinctive(subject, prompt) else 0.0,
         "prompt_acc": fraction of the prompt's attributes shown (NaN where the prompt names none),
         "subject_prompt_acc": 1.0 where the image shows the subject and every attribute the prompt asks
         for, else 0.0 (a model that copies its references scores on subject_acc but not here)}.
    """
    from proxytune.backends.dreambench_prompts import strip_identifier
    from proxytune.toyworld import oracle as oracle_lib
    from proxytune.toyworld.subjects import distinctive
    from proxytune.toyworld.world import parse_prompt

    seen = iter(read([image for group in images for image in group]))
    subject_acc, prompt_acc, both = [], [], []
    for prompt, group in zip(prompts, images):
        text = strip_identifier(prompt, token)
        look, asked = distinctive(subject, text), parse_prompt(text)
        for _ in group:
            reading = next(seen)
            subject_acc.append(float(oracle_lib.shows_subject(reading, look)))
            accuracy = oracle_lib.prompt_accuracy(reading, asked)
            prompt_acc.append(np.nan if accuracy is None else accuracy)
            both.append(float(subject_acc[-1] == 1.0 and accuracy in (None, 1.0)))
    return {"subject_acc": np.asarray(subject_acc), "prompt_acc": np.asarray(prompt_acc),
            "subject_prompt_acc": np.asarray(both)}


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
