"""Registry commands: registered adapters (`registry list/show/pull/promote`), `audit`, `lineage` and
`compare`. The work is in proxytune.tracking; these parse and print."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from proxytune.cli.common import tracking_uri, uri_option, user_errors


@click.group(name="registry")
def registry_group() -> None:
    """Registered adapters (teacher and student LoRAs) in the MLflow registry."""


@registry_group.command(name="list")
@uri_option
@user_errors
def registry_list(uri: str | None) -> None:
    """Every registered version with its aliases, role and base model."""
    from proxytune.tracking import registry

    rows = registry.list_versions(tracking_uri(uri))
    if not rows:
        click.echo("registry is empty")
        return
    width = max(len(f"{r['name']}@{r['version']}") for r in rows)
    for r in rows:
        click.echo(f"{r['name'] + '@' + r['version']:<{width}}  {r['role']:<8} {r['aliases'] or '-':<20} {r['base_model']}")


@registry_group.command(name="pull")
@click.argument("ref")
@click.option("-o", "--output", required=True, help="A new or empty folder to write the adapter to.")
@uri_option
@user_errors
def registry_pull(ref: str, output: str, uri: str | None) -> None:
    """Download NAME[@VERSION|@ALIAS]; the folder loads with diffusers / peft as it is."""
    from proxytune.tracking import registry

    path, resolved = registry.pull(tracking_uri(uri), ref, Path(output))
    click.echo(f"pulled {resolved} → {path} (every file matches its recorded sha256)")


@registry_group.command(name="show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@uri_option
@user_errors
def registry_show(ref: str, as_json: bool, uri: str | None) -> None:
    """One version (NAME@VERSION|@ALIAS): aliases, run, source, tags, files with their sha256."""
    from proxytune.tracking import registry

    info = registry.show(tracking_uri(uri), ref)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(info["ref"])
    click.echo(f"  aliases: {', '.join(info['aliases']) or '-'}")
    click.echo(f"  run:     {info['run_id']}")
    click.echo(f"  source:  {info['source']}")
    click.echo(f"  status:  {info['status']}")
    click.echo("  tags:")
    for key, value in info["tags"].items():
        click.echo(f"    {key}: {value}")
    click.echo("  files (sha256 recorded at registration):")
    for name, sha in info["files"].items():
        click.echo(f"    {name}  {sha}")


@registry_group.command(name="promote")
@click.argument("ref")
@click.argument("alias")
@uri_option
@user_errors
def registry_promote(ref: str, alias: str, uri: str | None) -> None:
    """Point ALIAS (e.g. champion) at NAME@VERSION (or at the version another alias names)."""
    from proxytune.tracking import registry

    resolved = registry.promote(tracking_uri(uri), ref, alias)
    click.echo(f"{resolved.rsplit('@', 1)[0]}@{alias} → {resolved}")


@click.command(name="audit")
@uri_option
@user_errors
def audit_cmd(uri: str | None) -> None:
    """Re-hash every registered version's files and check every lineage link; exit 1 on any problem."""
    from proxytune.tracking import audit

    result = audit.audit(tracking_uri(uri))
    for run in result["killed"]:
        click.echo(f"closed: {run}: its process is gone; marked KILLED")
    summary = f"{result['versions']} versions, {result['files']} files, {result['evaluations']} evaluation runs"
    if result["problems"]:
        for problem in result["problems"]:
            click.echo(f"problem: {problem}")
        click.echo(f"audit: {len(result['problems'])} problems ({summary} checked)")
        sys.exit(1)
    click.echo(f"audit: ok ({summary} checked; every file matches its recorded sha256, every link resolves)")


@click.command(name="lineage")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the chain as JSON.")
@click.option("--mermaid", is_flag=True, help="Print the chain as a mermaid flowchart.")
@uri_option
@user_errors
def lineage_cmd(ref: str, as_json: bool, mermaid: bool, uri: str | None) -> None:
    """References → teacher → proxy set → student → metrics behind NAME@VERSION|@ALIAS.

    Each node is marked stale when the spec or its inputs changed since (`dvc status` of the stage
    the run recorded, run in this project), or "unknown" when the project is not here.
    """
    from proxytune.tracking import lineage, provenance

    chain = provenance.mark_stale(lineage.lineage(tracking_uri(uri), ref), Path.cwd())
    if as_json:
        click.echo(json.dumps(chain, indent=2))
        return
    if mermaid:
        click.echo(provenance.to_mermaid(chain))
        return
    mark = provenance.mark
    click.echo(chain["ref"])
    refs = chain.get("references")
    if refs:
        click.echo(f"└─ references {refs['folder']}  digest {str(refs['digest'])[:16]}{mark(refs)}")
        for name, sha in refs["files"].items():
            click.echo(f"   ├─ {name}  sha256 {sha[:16]}")
    def _weights(node: dict) -> str:  # a toy world base model: the digest of its shipped weights
        return f" (weights {node['base_model_digest'][:16]})" if node.get("base_model_digest") else ""

    teacher = chain.get("teacher")
    if teacher:
        click.echo(f"   └─ teacher {teacher['version']}  run {teacher['run_id']}  base {teacher['base_model']}{_weights(teacher)}  adapter {str(teacher['adapter_digest'])[:16]}{mark(teacher)}")
    proxy = chain.get("proxy")
    if proxy:
        click.echo(f"      └─ {proxy.get('set', 'proxy')} set {proxy['num_images']} images  digest {str(proxy['digest'])[:16]}  prompts {str(proxy['prompts_digest'])[:16]}  run {proxy['synthesis_run_id']}{mark(proxy)}")
    student = chain.get("student")
    if student:
        click.echo(f"         └─ student {student['version']}  run {student['run_id']}  base {student['base_model']}{_weights(student)}  adapter {str(student['adapter_digest'])[:16]}{mark(student)}")
        for evaluation in chain.get("evaluations", []):
            metrics = "  ".join(f"{k} {v:.4f}" for k, v in evaluation["metrics"].items())
            kind = "style evaluation" if evaluation.get("kind") == "style" else "evaluation"
            click.echo(f"            └─ {kind} run {evaluation['run_id']}: {metrics}{mark(evaluation)}")


@click.command(name="compare")
@click.argument("a")
@click.argument("b")
@uri_option
@user_errors
def compare_cmd(a: str, b: str, uri: str | None) -> None:
    """Evaluation metrics of A and B side by side (student NAME@VERSION|ALIAS or evaluation run ids).

    Both subject evaluations or both style evaluations; A and B of different kinds exit 2."""
    from proxytune.tracking import lineage

    result = lineage.compare(tracking_uri(uri), a, b)
    width = max([len(k) for k in result["metrics"]] + [6])
    click.echo(f"{'metric':<{width}}  {a:>22}  {b:>22}  {'B - A':>9}  95% interval of B - A")
    for key, (va, vb) in result["metrics"].items():
        fmt = lambda v: f"{v:22.4f}" if v is not None else f"{'-':>22}"  # noqa: E731
        delta = f"{vb - va:+9.4f}" if va is not None and vb is not None else f"{'-':>9}"
        ci = result["intervals"].get(key)
        click.echo(f"{key:<{width}}  {fmt(va)}  {fmt(vb)}  {delta}  " + (f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "-"))
    legend = _legend(result["kind"], result["metrics"])
    if legend:
        click.echo(f"metrics: {legend}")
    how = "paired by prompt (same prompts)" if result["paired"] else "each run's prompts resampled on their own"
    click.echo(f"intervals: 95% bootstrap resampling prompts, {how}; {result['kind']} evaluations")
    click.echo(f"runs: A {result['runs'][a]}  B {result['runs'][b]}")


def _legend(kind: str, keys) -> str:
    """The registry's label (and direction, where lower is better) of each metric among MODEL.METRIC `keys`."""
    from proxytune import metrics

    known = {m.name: m for m in metrics.metrics(kind)}
    shown = dict.fromkeys(key.partition(".")[2] for key in keys)
    return ", ".join(f"{name} {known[name].label}" + ("" if known[name].higher_is_better else " (lower is better)")
                     for name in shown if name in known)
