"""The one seam between the stages and the toy world's model-free judges (issue 28 puts it behind an interface).

The evaluation (subject and prompt accuracy), the proxy scores of synthesis and the stylised-pair scores of
curation read toy-world images only through these functions, so the stages import no toy-world module.
"""

from __future__ import annotations

import numpy as np


def oracle_reader():
    """The shipped oracle (toy-oracle) as a function: images -> one attribute reading per image."""
    from proxytune.toyworld.metrics import oracle_reader

    return oracle_reader()


def toy_subject(name: str):
    """The toy world's held-out subject `name` (proxytune.toyworld.subjects.Subject)."""
    from proxytune.toyworld.subjects import SUBJECTS

    return SUBJECTS[name]


def oracle_scores(read, images: list[list], prompts: list[str], token: str, subject) -> dict:
    """The oracle's subject_acc, prompt_acc and subject_prompt_acc per image (proxytune.toyworld.metrics.oracle_scores)."""
    from proxytune.toyworld.metrics import oracle_scores

    return oracle_scores(read, images, prompts, token, subject)


def shows_subject(images: list, prompts: list[str], token: str, subject_name: str, read=None) -> np.ndarray:
    """(N,) 1.0 where the oracle reads the whole toy subject off image i (drawn for prompts[i]), else 0.0."""
    read = read or oracle_reader()
    scores = oracle_scores(read, [[image] for image in images], prompts, token, toy_subject(subject_name))
    return scores["subject_acc"]


def shows_style(images: list, style_name: str) -> np.ndarray:
    """(N,) 1.0 where the toy world's style detector finds style `style_name` in image i, else 0.0."""
    from proxytune.toyworld.styles import detects

    return detects(images, style_name).astype(np.float64)


def oracle_weights() -> dict:
    """Where the oracle's weights are and their digest (what a record says about the judge)."""
    from proxytune.toyworld.builtins import manifest, oracle_folder

    return {"path": str(oracle_folder()), "digest": manifest().get("toy-oracle", {}).get("digest")}
