"""DreamBench's evaluation prompts (Ruiz et al. 2023, dataset README) and the identifier-free text CLIP-T reads.

CLIP-T compares each generated image with its own prompt with the identifier token removed (the class
noun stays): `strip_identifier`. The 25 prompts of a subject depend on whether it is live (cats and
dogs: accessories, outfits) or an object: `dreambench_prompts`.
"""

from __future__ import annotations

import re

LIVE_CLASSES = frozenset({"dog", "cat"})

# DreamBench prompt templates (Ruiz et al. 2023, dataset README): {token} = identifier, {cls} = class noun.
OBJECT_TEMPLATES = (
    "a {token} {cls} in the jungle",
    "a {token} {cls} in the snow",
    "a {token} {cls} on the beach",
    "a {token} {cls} on a cobblestone street",
    "a {token} {cls} on top of pink fabric",
    "a {token} {cls} on top of a wooden floor",
    "a {token} {cls} with a city in the background",
    "a {token} {cls} with a mountain in the background",
    "a {token} {cls} with a blue house in the background",
    "a {token} {cls} on top of a purple rug in a forest",
    "a {token} {cls} with a wheat field in the background",
    "a {token} {cls} with a tree and autumn leaves in the background",
    "a {token} {cls} with the Eiffel Tower in the background",
    "a {token} {cls} floating on top of water",
    "a {token} {cls} floating in an ocean of milk",
    "a {token} {cls} on top of green grass with sunflowers around it",
    "a {token} {cls} on top of a mirror",
    "a {token} {cls} on top of the sidewalk in a crowded street",
    "a {token} {cls} on top of a dirt road",
    "a {token} {cls} on top of a white rug",
    "a red {token} {cls}",
    "a purple {token} {cls}",
    "a shiny {token} {cls}",
    "a wet {token} {cls}",
    "a cube shaped {token} {cls}",
)

# Live subjects share the object list's 10 scenes and 5 property edits; the 10 in between are outfits.
LIVE_TEMPLATES = OBJECT_TEMPLATES[:10] + (
    "a {token} {cls} wearing a red hat",
    "a {token} {cls} wearing a santa hat",
    "a {token} {cls} wearing a rainbow scarf",
    "a {token} {cls} wearing a black top hat and a monocle",
    "a {token} {cls} in a chef outfit",
    "a {token} {cls} in a firefighter outfit",
    "a {token} {cls} in a police outfit",
    "a {token} {cls} wearing pink glasses",
    "a {token} {cls} wearing a yellow shirt",
    "a {token} {cls} in a purple wizard outfit",
) + OBJECT_TEMPLATES[-5:]


def strip_identifier(prompt: str, token: str) -> str:
    """Remove the identifier token from a prompt, keeping the class noun.

    The token is removed only as a whole word (delimited by whitespace, or followed by
    punctuation), together with one adjacent space: ("a S* dog in the jungle", "S*") gives
    "a dog in the jungle".
    """
    if not token.strip():
        raise ValueError("empty identifier token")
    pattern = rf"(?<!\S){re.escape(token.strip())}(?![^\s.,;:!?])"
    stripped = re.sub(pattern, "", prompt)
    stripped = re.sub(r"\s+([.,;:!?])", r"\1", " ".join(stripped.split()))
    return stripped


def dreambench_prompts(token: str, cls: str, live: bool | None = None) -> list[str]:
    """The 25 DreamBench evaluation prompts for one subject.

    Args:
        token: the identifier token ("sks", "S*").
        cls: the class noun ("dog", "backpack").
        live: live-subject prompts (accessories, outfits) or object prompts; when None, live
            exactly for the DreamBench live classes (`LIVE_CLASSES`: cats and dogs).
    """
    if live is None:
        live = cls.strip().lower() in LIVE_CLASSES
    templates = LIVE_TEMPLATES if live else OBJECT_TEMPLATES
    return [template.format(token=token, cls=cls) for template in templates]
