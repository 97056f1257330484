"""`proxytune toyworld ...`: the toy world's held-out subjects and styles, pretraining its models,
shipping them as the package's weights, and checking them against their floors."""

from __future__ import annotations

import json

import click

from proxytune.cli.common import user_errors
from proxytune.errors import ProxytuneError


@click.group()
def toyworld() -> None:
    """The toy world: procedural scenes, held-out subjects, small pretrained models and an oracle."""


@toyworld.command(name="subjects")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder; one reference folder per subject.")
@click.option("--subject", "names", multiple=True, help="Only these subjects (repeatable); default all.")
@user_errors
def toyworld_subjects(out: str, names: tuple[str, ...]) -> None:
    """Write each held-out subject's reference photos (5 PNGs) into OUT/NAME/."""
    from pathlib import Path

    from proxytune.toyworld.subjects import SUBJECTS, write_subjects

    unknown = [n for n in names if n not in SUBJECTS]
    if unknown:
        raise ProxytuneError(f"--subject {unknown[0]!r}: unknown toy subject (known: {', '.join(SUBJECTS)})")
    for folder in write_subjects(Path(out), list(names) or None):
        click.echo(f"{folder}: {SUBJECTS[folder.name].description()}")


@toyworld.command(name="styles")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder; one reference folder per style.")
@click.option("--style", "names", multiple=True, help="Only these styles (repeatable); default all.")
@user_errors
def toyworld_styles(out: str, names: tuple[str, ...]) -> None:
    """Write each rendering style's references (4 PNGs of a red ball on the beach, styled) into OUT/NAME/."""
    from pathlib import Path

    from proxytune.toyworld.styles import CONTENT_CAPTION, DESCRIPTIONS, STYLES, write_references

    unknown = [n for n in names if n not in STYLES]
    if unknown:
        raise ProxytuneError(f"--style {unknown[0]!r}: unknown toy style (known: {', '.join(STYLES)})")
    for folder in write_references(Path(out), list(names) or None):
        click.echo(f"{folder}: {CONTENT_CAPTION}, {folder.name} style (detector: {DESCRIPTIONS[folder.name]})")


@toyworld.command(name="pretrain")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Working folder (data, checkpoints, models).")
@click.option("--only", multiple=True, help="Only these models (repeatable): oracle clip dino vae sd vq llamagen.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--jobs", type=click.IntRange(1, 2), default=2, show_default=True,
              help="Parallel single-threaded lanes (2 = one per core of a 2-core machine).")
@user_errors
def toyworld_pretrain(out: str, only: tuple[str, ...], seed: int, jobs: int) -> None:
    """Pretrain the toy models (resumable: run it again after an interruption)."""
    from pathlib import Path

    from proxytune.toyworld.pretrain import MODELS, PretrainConfig, pretrain

    bad = [m for m in only if m not in MODELS]
    if bad:
        raise ProxytuneError(f"--only {bad[0]!r}: unknown model (known: {', '.join(MODELS)})")
    for name, seconds in pretrain(Path(out), PretrainConfig(seed=seed, jobs=jobs), list(only) or None).items():
        click.echo(f"{name}: {seconds / 60:.1f} min")


@toyworld.command(name="export")
@click.argument("pretrained", type=click.Path(exists=True, file_okay=False))
@click.option("--only", multiple=True, help="Only these toy models (repeatable), e.g. toy-sd; default: every finished one.")
@user_errors
def toyworld_export(pretrained: str, only: tuple[str, ...]) -> None:
    """Ship the finished models of PRETRAINED as the package's toy weights (fp16, with digests)."""
    from pathlib import Path

    from proxytune.toyworld.builtins import WEIGHTS, export

    entries = export(Path(pretrained), only=list(only) or None)
    total = sum(e["bytes"] for k, e in entries.items() if not k.startswith("_"))
    click.echo(f"{WEIGHTS}: {total / 2**20:.1f} MiB")


@toyworld.command(name="check")
@click.option("--samples", type=click.IntRange(min=1), default=200, show_default=True, help="Generations per model.")
@click.option("--pretrained", type=click.Path(exists=True, file_okay=False),
              help="Measure the models of this pretraining folder instead of the shipped ones (before export).")
@user_errors
def toyworld_check(samples: int, pretrained: str | None) -> None:
    """Measure the shipped models against their floors (oracle accuracy, generators' prompt accuracy)."""
    from pathlib import Path

    from proxytune.toyworld.floors import measure

    click.echo(json.dumps(measure(samples, pretrained=Path(pretrained) if pretrained else None), indent=2))
