"""From spec to results: `validate`, `schema`, `compile`, `apply`, `stage` (what DVC runs) and `report`.
`apply` and `stage` do their work in proxytune.apply and proxytune.launch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from proxytune import layout
from proxytune.cli.common import user_errors


@click.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path())
@user_errors
def validate(specs: tuple[str, ...]) -> None:
    """Check spec files (schema, reference folders and images); write nothing."""
    from proxytune.project import resolve_spec

    for path in specs:
        resolved = resolve_spec(path, Path.cwd())
        names = ", ".join(s.name for s in resolved.spec.subjects)
        styles = ", ".join(s.name for s in resolved.spec.styles)
        click.echo(f"{path}: ok (experiment {resolved.spec.name}; "
                   + "; ".join(([f"subjects {names}"] if names else []) + ([f"styles {styles}"] if styles else [])) + ")")


@click.command()
def schema() -> None:
    """Print the spec's JSON Schema (for editor completion)."""
    from proxytune.spec import ExperimentSpec

    click.echo(json.dumps(ExperimentSpec.model_json_schema(by_alias=True), indent=2))


def _waiting() -> None:
    click.echo("waiting for another proxytune apply in this project…", err=True)


@click.command(name="compile")
@click.argument("specs", nargs=-1, required=True, type=click.Path())
@user_errors
def compile_cmd(specs: tuple[str, ...]) -> None:
    """Write dvc.yaml (and runs/EXPERIMENT/SUBJECT/params.yaml) for the specs."""
    from proxytune import project

    root = Path.cwd()
    resolved = project.resolve_specs(specs, root)
    project.check_writable(root)
    with project.project_lock(root, _waiting):
        project.write_compiled(resolved, root)
    for item in resolved:
        for subject in item.spec.subjects:
            student = "grow_select" if item.spec.student.proxy_count else "student"  # a growing proxy count's choice
            names = [layout.joint_stage_name(item.spec.name) if step == "student" and item.spec.student.multi_subject
                     else layout.stage_name(student if step == "student" else step, item.spec.name, subject.name)
                     for step in layout.STEPS]
            click.echo(" → ".join(names))
            for variant in item.spec.student.variants:
                name = layout.variant_experiment(item.spec.name, variant)
                click.echo(f"  {names[2]} → " + " → ".join(layout.stage_name(s, name, subject.name) for s in ("student", "evaluate")))
            for count in item.spec.student.proxy_count.grow if item.spec.student.proxy_count else []:
                name = layout.grow_experiment(item.spec.name, count)
                click.echo(f"  {names[2]} → " + " → ".join(layout.stage_name(g, name, subject.name)
                                                          for g in ("grow_student", "grow_evaluate")) + f" → {names[3]}")
        for style in item.spec.styles:
            click.echo(" → ".join(layout.stage_name(step, item.spec.name, style.name)
                                  for step in ("teacher", *layout.STYLE_STEPS)))
    click.echo("wrote dvc.yaml")


@click.command(name="apply")
@click.argument("specs", nargs=-1, required=True, type=click.Path())
@click.option("--subject", "subjects", multiple=True, help="Only these subjects (repeatable).")
@click.option("--dry-run", is_flag=True, help="Compile and list the stages that would run; run nothing.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: one `dvc repro` here, a stage at a time; ray: every stale stage as a Ray task, started as "
                   "soon as its inputs are ready, with the spec's resources (pip install \"proxytune[ray]\").")
@click.option("--address", default=None,
              help="With --executor ray: the Ray cluster (its head's HOST:PORT, or auto); default $RAY_ADDRESS, "
                   "else a new Ray instance on this machine.")
@click.option("--no-fit-check", "no_fit_check", is_flag=True,
              help="Run stages the plan says do not fit the GPU anyway (one warning line instead of the refusal).")
@click.option("--gpu", "gpu_name", default=None,
              help="Check the fit (and choose memory: auto's options) for this card of plan's table instead of the one "
                   "found (RTX4090, L4, A100-40GB, A100-80GB, H100-80GB, H200): a Ray cluster's, or a CPU dry run's.")
@click.option("--memory", type=click.FloatRange(min=0, min_open=True), default=None,
              help="As --gpu, for a card of this many GiB.")
@user_errors
def apply_cmd(specs: tuple[str, ...], subjects: tuple[str, ...], dry_run: bool, executor: str, address: str | None,
              no_fit_check: bool, gpu_name: str | None, memory: float | None) -> None:
    """Validate, compile and run the specs' stages with `dvc repro` (resumes after a crash).

    One apply runs at a time per project: a second one waits for the first (project lock).

    On a CUDA GPU, apply first plans every stage for the card it finds (the estimate of `proxytune plan`),
    applies the spec's `memory:` mode, and refuses, before anything is written, a stage that is to run and
    cannot fit (stages DVC finds up to date are not checked). On CPU, and with --executor ray, nothing is
    checked unless --gpu or --memory names a card.
    """
    from proxytune import apply
    from proxytune.fitcheck import Request

    apply.apply(specs, subjects, dry_run=dry_run, executor=executor, address=address, root=Path.cwd(), echo=click.echo,
                on_wait=_waiting, fit=Request(gpu=gpu_name, memory=memory, enforce=not no_fit_check))


@click.command(hidden=True)
@click.argument("step", type=click.Choice(layout.STEPS + layout.STYLE_STEPS))
@click.option("--params", "params_path", required=True, type=click.Path())
@user_errors
def stage(step: str, params_path: str) -> None:
    """Run one stage (DVC calls this; see dvc.yaml)."""
    from proxytune import launch

    code = launch.run_stage(step, params_path, lambda line: click.echo(line, err=True))
    if code:
        sys.exit(code)


@click.command(name="report")
@click.argument("spec", type=click.Path())
@user_errors
def report_cmd(spec: str) -> None:
    """Write runs/EXPERIMENT/report.html (self-contained) and report.md; log both to MLflow."""
    from proxytune import report
    from proxytune.tracking import runs, store

    root = Path.cwd()
    written = report.write_report(spec, root)
    uri = store.resolve_uri(written.report.tracking_uri, root)
    run_id = runs.log_report(uri, written.report.mlflow_experiment, root, [written.html, written.md], written.report.tags())
    click.echo(f"wrote {written.html.relative_to(root)} and {written.md.relative_to(root)}; logged as MLflow run {run_id}")
