"""The toy world's style judges as metrics of scope "style": three model-free scores per image of a toy style.

* style_acc: 1 when the style detector (styles.py, pixel statistics) finds the style, else 0.
* prompt_acc: the fraction of the prompt's attributes (world.parse_prompt) the oracle reads off the image.
* content_leak: of the references' content attributes (a red ball on the beach) that the prompt asks to be
  otherwise, the fraction the oracle reads off the image anyway; 0 = no copying.

A score some prompt does not define (a prompt naming no class, or asking for the references' own class,
colour and scene) is NaN for that image; the style evaluation then leaves the metric out. Registered from
`plugin.register` with needs=("world",): they run only for a style that is a toy world's (`toyworld:NAME`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from proxytune.metrics import Metric, ScoringInputs


@lru_cache(maxsize=1)
def _shipped_reader():
    from proxytune.toyworld.oracle import shipped_reader

    return shipped_reader()


def _texts(inputs: ScoringInputs) -> list[str]:
    return [prompt for prompt, group in zip(inputs.prompts, inputs.images) for _ in group]


def _readings(inputs: ScoringInputs) -> list[dict]:
    """The oracle's attribute readings of the images, read once per model (prompt_acc and content_leak share them)."""
    if "toy_readings" not in inputs.cache:
        inputs.cache["toy_readings"] = _shipped_reader()(inputs.flat)
    return inputs.cache["toy_readings"]


def _style_acc(inputs: ScoringInputs) -> np.ndarray:
    from proxytune.toyworld import styles

    return styles.detects(inputs.flat, inputs.item).astype(np.float64)


def _defined(values: list) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def _prompt_acc(inputs: ScoringInputs) -> np.ndarray:
    from proxytune.toyworld.oracle import prompt_accuracy
    from proxytune.toyworld.world import parse_prompt

    return _defined([prompt_accuracy(r, parse_prompt(p)) for r, p in zip(_readings(inputs), _texts(inputs))])


def _content_leak(inputs: ScoringInputs) -> np.ndarray:
    from proxytune.toyworld.styles import leakage

    return _defined([leakage(r, p) for r, p in zip(_readings(inputs), _texts(inputs))])


def _describe(world, style: str | None) -> dict:
    """encoders.json's "toy_style": the style's detector, the references' content and the oracle's weights."""
    from proxytune.toyworld import styles
    from proxytune.toyworld.builtins import manifest, oracle_folder

    return {"toy_style": {"style": style, "detector": styles.DESCRIPTIONS[style], "content": styles.CONTENT_CAPTION,
                          "oracle": str(oracle_folder()), "oracle_digest": manifest().get("toy-oracle", {}).get("digest")}}


TOY_STYLE_METRICS = (
    Metric("style_acc", "style acc. (detector)", "style",
           "1 when the toy world's style detector (proxytune.toyworld.styles, pixel statistics) finds the style",
           _style_acc, needs=("world",), plotted=False, gateable=False, provider="toyworld", describe=_describe),
    Metric("prompt_acc", "prompt acc. (oracle)", "style",
           "fraction of the prompt's attributes (parse_prompt) the toy oracle reads off the image",
           _prompt_acc, needs=("world",), plotted=False, gateable=False, provider="toyworld"),
    Metric("content_leak", "content leak (oracle)", "style",
           "fraction of the references' content attributes (class, colour, scene of a red ball on the beach) "
           "that the prompt asks to be otherwise and the oracle reads off the image anyway; 0 = no copying",
           _content_leak, needs=("world",), higher_is_better=False, plotted=False, gateable=False, provider="toyworld"),
)


def toy_style_scores(read, images: list, prompts: list[str], style_name: str) -> dict[str, np.ndarray]:
    """(N,) arrays of TOY_STYLE_METRICS for images of a toy style, image i drawn for prompts[i].

    Args:
        read: images -> the oracle's attribute readings (`oracle.shipped_reader()`).
        images: the generated images (PIL).
        prompts: each image's prompt, without identifier.
        style_name: one of proxytune.toyworld.styles.STYLES.

    A metric that some prompt does not define is left out.
    """
    inputs = ScoringInputs(images=[[image] for image in images], prompts=prompts, item=style_name,
                           cache={"toy_readings": read(images)})
    scores = {m.name: m.score(inputs) for m in TOY_STYLE_METRICS}
    return {name: values for name, values in scores.items() if not np.isnan(values).any()}
