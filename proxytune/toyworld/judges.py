"""The toy world's judges: the oracle's subject and prompt accuracy, and the style detector, as (N,) arrays.

Stages reach them through the world (`proxytune.builtins.world("toyworld")`, see toy_world.py), never by
importing this module.
"""

from __future__ import annotations

import numpy as np

from proxytune.backends import dreambench_prompts


def oracle_reader():
    """The shipped oracle (toy-oracle) as a function: images -> one attribute reading per image."""
    from proxytune.toyworld.oracle import shipped_reader

    return shipped_reader()


def toy_subject(name: str):
    """The toy world's held-out subject `name` (proxytune.toyworld.subjects.Subject)."""
    from proxytune.toyworld.subjects import SUBJECTS

    return SUBJECTS[name]


def oracle_scores(read, images: list[list], prompts: list[str], token: str, subject) -> dict:
    """(N,) arrays of the oracle's subject and prompt accuracy per generated image, prompt-major order.

    Args:
        read: images -> attribute readings ({"cls": "box", "colour": ...} per image), e.g. `oracle_reader()`.
        images: per prompt, its generated images.
        prompts: the prompts, identifier included.
        token: the identifier, removed before the prompt is parsed.
        subject: the toy subject (`toy_subject(name)`).
    Returns:
        {"subject_acc": 1.0 where the image shows all of distinctive(subject, prompt) else 0.0,
         "prompt_acc": fraction of the prompt's attributes shown (NaN where the prompt names none),
         "subject_prompt_acc": 1.0 where the image shows the subject and every attribute the prompt asks
         for, else 0.0 (what personalisation is for: a model that copies its references scores on
         subject_acc but not here)}.
    """
    from proxytune.toyworld import oracle as oracle_lib
    from proxytune.toyworld.subjects import distinctive
    from proxytune.toyworld.world import parse_prompt

    seen = iter(read([image for group in images for image in group]))
    subject_acc, prompt_acc, both = [], [], []
    for prompt, group in zip(prompts, images):
        text = dreambench_prompts.strip_identifier(prompt, token)
        look, asked = distinctive(subject, text), parse_prompt(text)
        for _ in group:
            reading = next(seen)
            subject_acc.append(float(oracle_lib.shows_subject(reading, look)))
            accuracy = oracle_lib.prompt_accuracy(reading, asked)
            prompt_acc.append(np.nan if accuracy is None else accuracy)
            both.append(float(subject_acc[-1] == 1.0 and accuracy in (None, 1.0)))
    return {"subject_acc": np.asarray(subject_acc), "prompt_acc": np.asarray(prompt_acc),
            "subject_prompt_acc": np.asarray(both)}


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
