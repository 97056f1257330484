"""What a project needs from outside: reference datasets (`proxytune data ...`) and a working set of
installed packages (`proxytune doctor`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from proxytune.cli.common import user_errors


@click.group()
def data() -> None:
    """Reference datasets."""


@data.command(name="dreambench")
@click.option("--dest", default="data/dreambench", show_default=True, type=click.Path(file_okay=False))
@click.option("--subject", "subjects", multiple=True, help="Subjects to fetch (default: all 30).")
@user_errors
def data_dreambench(dest: str, subjects: tuple[str, ...]) -> None:
    """Download DreamBench subjects (CC-BY-4.0) from the dataset's public repository.

    Point PROXYTUNE_DREAMBENCH at a local copy instead to skip the download.
    """
    from proxytune import dreambench

    for name, count in dreambench.download(Path(dest), list(subjects) or None):
        click.echo(f"{name}: {count} images")
    click.echo(f"done: set PROXYTUNE_DREAMBENCH={Path(dest).resolve()} or keep the default ./data/dreambench")


@click.command()
@click.option("--strict", is_flag=True, help="Also fail when an installed dependency differs from the lock (CI).")
@user_errors
def doctor(strict: bool) -> None:
    """Versions to report with a bug, and known incompatibilities: exit 1 when there is one.

    Checks proxytune's requirements against what is installed, known-bad combinations (transformers>=5.24
    with peft<0.22) and, in a source checkout, the installed set against constraints.txt.
    """
    from proxytune import versions

    result = versions.report()
    click.echo("\n".join(result.lines()))
    failed = bool(result.problems)  # each is printed above as "incompatible: ..."
    if strict and (result.lock is None or result.lock_error or result.lock_differences):
        click.echo(f"doctor --strict: the installed set is not the lock ({result.lock_status()})", err=True)
        failed = True
    if failed:
        fix = " -c constraints.txt" if result.lock is not None else ""
        click.echo(f"doctor: failed; install the tested set: pip install -e \".[dev]\"{fix}", err=True)
        sys.exit(1)
    untested = " (differences from the lock are untested)" if result.lock_differences else ""
    click.echo(f"doctor: ok, no known incompatibility{untested}")
