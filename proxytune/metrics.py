"""One registry of metrics: name -> label, direction, scorer, what it needs, whether it is plotted and gateable.

Spec validation (gate rules), the evaluation stages' scoring and tables, compile's DVC plots, the report and
`compare` all read this table. proxytune registers the encoder metrics (CLIP-I, CLIP-T, DINO, the style
scores); a plugin registers its own (the toy world's oracle scores) from its entry point, like any other.

Import-light on purpose (no torch): the spec reads the names; a scorer imports what it needs when called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

Scope = Literal["subject", "style"]  # a subject's evaluation, or a style's
Need = Literal["clip", "dino", "world"]  # encoders it reads; "world": a built-in world's judge (proxytune.builtins)


@dataclass
class ScoringInputs:
    """What a scorer reads: one model's images for the evaluation's prompts, and what they are compared with.

    Attributes:
        images: per prompt, its generated images (PIL), prompt-major.
        prompts: the prompts as sampled (identifier included).
        token: the subject's identifier (removed before text scores), or None for a style.
        encoders: "clip" / "dino" -> loaded encoder, for the metrics that need them.
        references: reference embeddings by name ("clip", "dino", ...), computed once per evaluation.
        world: the built-in world the subject or style comes from, or None.
        item: the subject's or style's name in that world.
        content: a style's content caption (`styles[i].content`), or None.
        cache: per-model scratch shared by scorers (e.g. the images' CLIP embeddings, computed once).
        session: scratch shared by every model's scoring in one evaluation (e.g. a judge loaded once).
    """

    images: list[list]
    prompts: list[str]
    token: str | None = None
    encoders: dict[str, Any] = field(default_factory=dict)
    references: dict[str, Any] = field(default_factory=dict)
    world: Any = None
    item: str | None = None
    content: str | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    session: dict[str, Any] = field(default_factory=dict)

    @property
    def flat(self) -> list:
        """Every image, prompt-major (the order of a scorer's result)."""
        return [image for group in self.images for image in group]


@dataclass(frozen=True)
class Metric:
    """One metric.

    Attributes:
        name: the key in metrics.json, gate rules and plots.
        label: the column header in tables and the report.
        scope: which evaluation computes it.
        description: one sentence: what is compared with what (tables' notes, encoders.json, docs).
        score: ScoringInputs -> (N,) float array, one value per image, prompt-major (NaN: does not apply).
        needs: encoders or the world's judge it reads; a metric needing "world" runs only for a world's item.
        higher_is_better: the direction (False: lower is better, e.g. content leakage).
        plotted: DVC plots and the report's charts show it.
        gateable: gate rules may name it.
        provider: "proxytune" or the plugin's name (for a metric needing "world": the world's name).
        note: the sentence a results table prints under its columns (metrics sharing one give the same text,
            printed once); "" for none.
        applies_to: which subjects or styles it is measured for, as error messages name them.
        describe: (world, item) -> what encoders.json records about the judge behind it ({key: entry}); None for
            a metric whose encoders are already recorded.
    """

    name: str
    label: str
    scope: Scope
    description: str
    score: Callable[[ScoringInputs], Any]
    needs: tuple[Need, ...] = ()
    higher_is_better: bool = True
    plotted: bool = True
    gateable: bool = True
    provider: str = "proxytune"
    note: str = ""
    applies_to: str = "every subject"
    describe: Callable[[Any, str | None], dict] | None = None

    def applies(self, world: Any) -> bool:
        """True when its needs are met for an item of `world` (None: not a world's item)."""
        return "world" not in self.needs or (world is not None and world.name == self.provider)


_METRICS: dict[tuple[Scope, str], Metric] = {}


def register(metric: Metric) -> None:
    """Add a metric; one name per scope (a second provider for the same name is an error)."""
    known = _METRICS.get((metric.scope, metric.name))
    if known is not None and known.provider != metric.provider:
        raise ValueError(f"metric {metric.scope}.{metric.name}: registered by {known.provider} and by {metric.provider}")
    _METRICS[(metric.scope, metric.name)] = metric


def _load() -> None:
    from proxytune import builtins

    builtins.model_names("teacher")  # fills every table, plugins' metrics included, once


def metrics(scope: Scope) -> tuple[Metric, ...]:
    """Every metric of a scope, in registration order."""
    _load()
    return tuple(m for (s, _), m in _METRICS.items() if s == scope)


def get(scope: Scope, name: str) -> Metric:
    """The metric `name` of `scope`.

    Raises:
        KeyError: no such metric (the message lists the known ones).
    """
    _load()
    try:
        return _METRICS[(scope, name)]
    except KeyError:
        known = ", ".join(m.name for m in metrics(scope))
        raise KeyError(f"unknown {scope} metric {name!r} (known: {known})") from None


def applicable(scope: Scope, world: Any = None) -> tuple[Metric, ...]:
    """The metrics of a scope that run for an item of `world` (None: a subject or style of no world)."""
    return tuple(m for m in metrics(scope) if m.applies(world))


def gateable(scope: Scope) -> tuple[str, ...]:
    """Names gate rules (and held-out scores) may read."""
    return tuple(m.name for m in metrics(scope) if m.gateable)
