"""The `proxytune` command: a thin click group. Each module below holds a group of commands, and each
command imports what it needs when it runs, so that `--help`, `validate`, `schema` and a no-op `apply`
stay fast (nothing here imports mlflow, torch or DVC).

    pipeline     validate, schema, compile, apply, stage (DVC's), report
    registry     registry list/show/pull/promote, audit, lineage, compare
    convert      original checkpoints -> student folders
    toyworld     the toy world's references, pretraining, export and check
    environment  data (reference datasets), doctor (installed versions)
    plan         plan (peak GPU memory and time of each stage, before running)
"""

from __future__ import annotations

import click

from proxytune.cli import convert, environment, pipeline, plan, registry, toyworld


def _print_versions(ctx: click.Context, _param, value: bool) -> None:
    """--version: proxytune's and its key dependencies' versions, the lock and any known incompatibility."""
    if not value or ctx.resilient_parsing:
        return
    from proxytune import versions

    click.echo("\n".join(versions.report().lines()))
    ctx.exit(0)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_versions,
              help="Print the versions of proxytune, torch, diffusers, transformers, peft, accelerate and the lock.")
def main() -> None:
    """Proxy-Tuning: personalise autoregressive image generators through a diffusion teacher."""


for _command in (pipeline.validate, pipeline.schema, pipeline.compile_cmd, pipeline.apply_cmd, pipeline.stage,
                 pipeline.report_cmd, registry.registry_group, registry.audit_cmd, registry.lineage_cmd,
                 registry.compare_cmd, convert.convert, toyworld.toyworld, environment.data, environment.doctor, plan.plan_cmd):
    main.add_command(_command)
