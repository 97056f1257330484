"""Shared pieces of the spec schema: the strict base model and field types."""

from __future__ import annotations

import re
from typing import Annotated, Callable

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from proxytune import builtins
from proxytune.layout import VARIANT_SEP

# Built-in models, by role: proxytune's tiny random architectures and the pretrained models of installed plugins
# (the toy world's toy-*), as registered in the one table, proxytune.builtins.
TINY_TEACHERS = builtins.model_names("teacher")
TINY_CLIP = builtins.model_names("clip")
TINY_DINO = builtins.model_names("dino")

SAFE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class Strict(BaseModel):
    """Base for every spec section: unknown keys are errors, values are re-checked on assignment, and
    every float must be finite (NaN and +-inf are refused for every float field, constrained or not)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


def _safe_name(value: str) -> str:
    if not SAFE_NAME.match(value):
        raise ValueError(
            "must be 1-64 characters of lowercase letters, digits, '-' or '_', starting with a letter or "
            "digit (it becomes a folder and a registry name)"
        )
    return value


SafeName = Annotated[str, AfterValidator(_safe_name)]



def _unreserved(value: str) -> str:
    if VARIANT_SEP in value:
        raise ValueError(f"must not contain {VARIANT_SEP!r} (it joins an experiment and a student variant)")
    return value


PlainName = Annotated[SafeName, AfterValidator(_unreserved)]
PositiveInt = Annotated[int, Field(gt=0, strict=True)]
NonNegativeInt = Annotated[int, Field(ge=0, strict=True)]
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, le=1)]

# Seeds: stages derive further seeds from a spec seed (seed + i, seed + 1000 p + k, (seed + offset) * 1_000_003
# + step) and torch generators take at most 64 bits, so each spec seed is kept to 32 bits, which leaves
# every derived seed far inside torch's range.
MAX_SEED = 2**32 - 1


def _seed(value: int) -> int:
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"must be an integer from 0 to {MAX_SEED} (2**32 - 1): stages derive further seeds from it "
                         f"and torch generators take at most 64 bits")
    return value


Seed = Annotated[int, Field(strict=True), AfterValidator(_seed)]


def model_ref_checker(builtins: tuple[str, ...] | Callable[[], tuple[str, ...]]):
    """Validator for a model field: a built-in tiny name, a local path or a hub id ("org/name").

    `builtins` is the names, or a function giving them when a value is checked (a table filled on first use)."""

    def check(value: str) -> str:
        names = builtins() if callable(builtins) else builtins
        if value in names:
            return value
        if value.startswith(("/", ".", "~")):
            return value  # a local path: existence is checked when the spec is resolved
        if _HUB_ID.match(value):
            return value
        raise ValueError(
            f"unknown model {value!r}: use a built-in ({', '.join(names)}), a local path or a hub id 'org/name'"
        )

    return AfterValidator(check)


class ScoredCuration(Strict):
    """What every fidelity section shares: curation (`keep`) and its gate (`min_share`) read the scores."""

    @model_validator(mode="after")
    def _needs_scores(self):
        if (self.keep is not None or self.min_share is not None) and not self.enabled:
            raise ValueError("keep and min_share need the scores: set enabled: true")
        return self
