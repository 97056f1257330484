"""plan: each stage's expected peak GPU memory and time, from the spec alone (no weights, no GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from proxytune.cli.common import user_errors


@click.command("plan")
@click.argument("spec_file", type=click.Path(path_type=Path))
@click.option("--gpu", "gpu_name", default=None, help="GPU to plan for: RTX4090, L4, A100-40GB, A100-80GB, H100-80GB, H200 (default A100-80GB).")
@click.option("--memory", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Plan for a card of this many GiB instead (throughput of --gpu, else an A100's).")
@click.option("--gpus", type=click.IntRange(min=1), default=1, show_default=True, help="GPUs available; sampling stages split their images over them.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (bytes, seconds, fits per stage).")
@user_errors
def plan_cmd(spec_file: Path, gpu_name: str | None, memory: float | None, gpus: int, as_json: bool) -> None:
    """Expected peak memory (weights, gradients, optimiser, activations) and time of every stage of SPEC_FILE.

    The stages are planned as `apply` would run them on that card: after the spec's `memory:` mode
    (checkpointing by default; auto; manual), whose changes the last line names.
    """
    from proxytune.plan import auto, report
    from proxytune.plan.gpus import custom_gpu, find_gpu
    from proxytune.spec import load_spec

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casting a meta model warns about modules kept in fp32
    gpu = find_gpu(gpu_name or "A100-80GB")
    if memory is not None:
        gpu = custom_gpu(memory, find_gpu(gpu_name) if gpu_name else None)
    spec = load_spec(spec_file)
    adapted = auto.adapt(spec, str(spec_file), spec_file.parent.resolve(), gpu, gpus)  # the spec's memory: mode
    plan = adapted.plan
    if as_json:
        click.echo(json.dumps({**report.as_json(plan), "memory": adapted.record()}, indent=2))
    else:
        shown = adapted.changes or spec.memory == "auto"
        click.echo("\n".join(report.lines(plan) + ([adapted.line()] if shown else [])))
