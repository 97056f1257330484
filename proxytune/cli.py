"""The `proxytune` command. Commands import their heavy dependencies lazily so that `validate`,
`schema` and a no-op `apply` stay fast."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from proxytune.errors import ProxytuneError, disk_full_message
from proxytune import layout



def user_errors(func):
    """Print ProxytuneError, and a full disk anywhere, as one line on stderr and exit 2; no traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ProxytuneError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: re-run the same command to resume", err=True)
            sys.exit(130)
        except Exception as err:
            message = disk_full_message(err)
            if message is None:
                raise
            click.echo(f"error: {message}", err=True)
            sys.exit(2)

    return wrapper


uri_option = click.option("--uri", help="Tracking URI (default: $MLFLOW_TRACKING_URI or ./registry).")


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


@main.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path(dir_okay=False))
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


@main.command()
def schema() -> None:
    """Print the spec's JSON Schema (for editor completion)."""
    from proxytune.spec import ExperimentSpec

    click.echo(json.dumps(ExperimentSpec.model_json_schema(by_alias=True), indent=2))


def _resolve(specs: tuple[str, ...]):
    from proxytune.project import resolve_spec

    root = Path.cwd()
    return root, [resolve_spec(path, root) for path in specs]


def _waiting() -> None:
    click.echo("waiting for another proxytune apply in this project…", err=True)


def _close_interrupted(root: Path) -> None:
    """When an earlier apply in this project was killed, close what it left open (its entries in DVC's
    stage lock file, its MLflow runs still RUNNING) and say so in one line. Runs under the project lock."""
    from proxytune import project, tracking

    previous = project.unfinished_apply(root)
    dead = project.release_dead_dvc_locks(root)  # else DVC warns "Process ... had been killed"
    if previous is None and not dead:
        return
    closed = 0
    for uri in (previous or {}).get("uris", []):
        try:
            closed += len(tracking.close_ghost_runs(uri)[0])
        except Exception:  # that store is unreachable now: `audit` reports the runs later
            pass
    pid = (previous or {}).get("pid") or dead[0]
    note = f"; {closed} of its MLflow runs marked KILLED" if closed else ""
    click.echo(f"resuming after an interrupted run (process {pid} was killed): finished stages are kept{note}")
    project.end_apply(root)


def _check_servers(paths: tuple[str, ...], resolved) -> None:
    """Fail fast (one line, before anything is written) when a spec's MLflow server does not answer."""
    from proxytune import tracking

    checked: set[str] = set()
    for path, item in zip(paths, resolved):
        uri = tracking.remote_uri(item.spec.tracking.uri)
        if uri is None or uri in checked:
            continue
        key = "tracking.uri" if item.spec.tracking.uri else "tracking.uri (unset; from $MLFLOW_TRACKING_URI)"
        try:
            tracking.check_reachable(uri)
        except ProxytuneError as err:
            raise ProxytuneError(f"{path}: {key}: {err}") from None
        checked.add(uri)


def _check_models(paths: tuple[str, ...], resolved, root: Path) -> None:
    """Resolve every model a spec names (teacher, student, encoders) before anything is written: a local
    folder must hold what its loader reads, a hub id must be cached or reachable (see proxytune.preflight)."""
    from proxytune.preflight import check_spec_models

    seen: dict = {}
    for path, item in zip(paths, resolved):
        check_spec_models(item.spec, path, root, seen)


@main.command(name="compile")
@click.argument("specs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@user_errors
def compile_cmd(specs: tuple[str, ...]) -> None:
    """Write dvc.yaml (and runs/EXPERIMENT/SUBJECT/params.yaml) for the specs."""
    from proxytune import project

    root, resolved = _resolve(specs)
    with project.project_lock(root, _waiting):
        project.write_compiled(resolved, root)
    for item in resolved:
        for subject in item.spec.subjects:
            names = [layout.joint_stage_name(item.spec.name) if step == "student" and item.spec.student.multi_subject
                     else layout.stage_name(step, item.spec.name, subject.name) for step in layout.STEPS]
            click.echo(" → ".join(names))
            for variant in item.spec.student.variants:
                name = layout.variant_experiment(item.spec.name, variant)
                click.echo(f"  {names[2]} → " + " → ".join(layout.stage_name(s, name, subject.name) for s in ("student", "evaluate")))
        for style in item.spec.styles:
            click.echo(" → ".join(layout.stage_name(step, item.spec.name, style.name)
                                  for step in ("teacher", *layout.STYLE_STEPS)))
    click.echo("wrote dvc.yaml")


@main.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--subject", "subjects", multiple=True, help="Only these subjects (repeatable).")
@click.option("--dry-run", is_flag=True, help="Compile and list the stages that would run; run nothing.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: one `dvc repro` here, a stage at a time; ray: every stale stage as a Ray task, started as "
                   "soon as its inputs are ready, with the spec's resources (pip install \"proxytune[ray]\").")
@click.option("--address", default=None,
              help="With --executor ray: the Ray cluster (its head's HOST:PORT, or auto); default $RAY_ADDRESS, "
                   "else a new Ray instance on this machine.")
@user_errors
def apply(specs: tuple[str, ...], subjects: tuple[str, ...], dry_run: bool, executor: str, address: str | None) -> None:
    """Validate, compile and run the specs' stages with `dvc repro` (resumes after a crash).

    One apply runs at a time per project: a second one waits for the first (project lock).
    """
    from proxytune import compile as compiler
    from proxytune import project, tracking

    if address is not None and executor != "ray":
        raise ProxytuneError("--address: only with --executor ray")
    if executor == "ray":
        from proxytune.executors import require_ray

        require_ray()  # before anything is written
    root, resolved = _resolve(specs)
    known = {s.name for item in resolved for s in item.spec.subjects}
    unknown = sorted(set(subjects) - known)
    if unknown:
        raise ProxytuneError(f"--subject: no subject named {', '.join(unknown)} in {', '.join(specs)}")
    if not dry_run:
        _check_servers(specs, resolved)
    _check_models(specs, resolved, root)
    with project.project_lock(root, _waiting):
        if not dry_run:
            _close_interrupted(root)
        project.write_compiled(resolved, root)
        project.ensure_dvc(root)
        targets = compiler.targets(resolved, set(subjects) or None)
        stale = project.stale_stages(root, targets)
        if not stale:
            click.echo("up to date: no stage to run")
            return
        click.echo(f"stages to run: {', '.join(stale)}")
        if dry_run:
            click.echo("dry run: nothing was run")
            return
        uris = {item.spec.name: tracking.resolve_uri(item.spec.tracking.uri, root) for item in resolved}
        project.record_apply(root, list(uris.values()))  # until end_apply: a killed apply is seen next time
        parents, code = {}, None
        try:
            for item in resolved:
                experiment = item.spec.tracking.experiment or item.spec.name
                tags = {"spec_file": item.spec_path, "spec_digest": item.spec_digest, "stages": ",".join(stale)}
                parents[item.spec.name] = tracking.start_parent_run(experiment, uris[item.spec.name], root, tags)
            env_parents = dict(parents)
            for item in resolved:  # a student variant's stages are children of its spec's run
                for variant in item.spec.student.variants:
                    env_parents[layout.variant_experiment(item.spec.name, variant)] = parents[item.spec.name]
            stage_env = {tracking.PARENT_RUNS_ENV: json.dumps(env_parents)}
            if executor == "ray":
                code, failure = _run_on_ray(root, targets, stale, specs, resolved, address, stage_env)
            else:
                code, failure = project.repro(root, targets, stage_env), None
        finally:
            for name, run_id in parents.items():
                status = "FINISHED" if code == 0 else "KILLED" if code is None else "FAILED"  # None: interrupted
                tracking.end_parent_run(run_id, uris[name], status)
            if code != 0:  # a stage process killed hard (out of memory, SIGKILL) left its run RUNNING
                for uri in set(uris.values()):
                    tracking.close_ghost_runs(uri)
            project.end_apply(root)
    if code != 0:
        raise ProxytuneError(failure or f"dvc repro failed (exit {code}); fix the error above and re-run apply: finished stages are kept")
    click.echo("done")


def _run_on_ray(root: Path, targets: list[str], stale: list[str], paths: tuple[str, ...], resolved, address: str | None,
                env: dict[str, str]) -> tuple[int, str | None]:
    """--executor ray: plan from DVC's graph, run on the cluster with a progress bar, print the summary.
    Returns (exit code, the error line when a subject failed)."""
    from tqdm.auto import tqdm

    from proxytune import executors

    plan = executors.plan(root, targets, stale, {item.spec.name: (path, item.spec.resources)
                                                 for path, item in zip(paths, resolved)})
    ray = executors.connect(address)
    try:
        total = ray.cluster_resources()
        nodes = len(executors.alive_nodes(ray))
        click.echo(f"ray: {len(plan)} stages on {nodes} node{'s' * (nodes != 1)} ({total.get('CPU', 0):g} CPUs, "
                   f"{total.get('GPU', 0):g} GPUs); stage logs in {executors.LOG_DIR}/")
        bar = tqdm(total=len(plan), desc="stages", unit="stage")
        running: set[str] = set()
        # "started" is a submission: Ray starts it when a node has its CPUs and GPUs free
        marks = {"started": "queued ", "ran": "done   ", "current": "current", "failed": "FAILED ", "skipped": "skipped"}

        def on_event(event: str, stage, detail: str) -> None:
            if event == "started":
                running.add(stage.name)
            elif event != "waiting":
                running.discard(stage.name)
                bar.update(1)
            if event in marks:
                note = {"current": "up to date after its upstream ran", "skipped": f"{detail} failed"}.get(event, detail)
                tqdm.write(f"{marks[event]} {stage.name}" + (f": {note}" if note else ""))
            bar.set_postfix_str(f"{len(running)} queued or running" if running else "", refresh=True)

        try:
            outcome = executors.execute(root, plan, executors.forwarded_env(env), on_event)
        finally:
            bar.close()
    finally:
        ray.shutdown()
    units = sorted({stage.unit for stage in plan})
    failed = outcome.failed_units(plan)
    retried = sorted(name for name, tries in outcome.attempts.items() if tries > 1)
    click.echo(f"summary: {len(units) - len(failed)} of {len(units)} subjects done, {len(outcome.ran)} stages ran"
               + (f", {len(outcome.current)} found up to date" if outcome.current else "")
               + (f"; retried after a lost worker: {', '.join(retried)}" if retried else ""))
    for unit, why in sorted(failed.items()):
        click.echo(f"failed: {unit}: {why}")
    if not failed:
        return 0, None
    return 1, (f"{len(failed)} of {len(units)} subjects failed ({', '.join(sorted(failed))}); the others are done and "
               f"in dvc.lock: fix the error above and re-run apply (finished stages are kept)")


@main.command(hidden=True)
@click.argument("step", type=click.Choice(layout.STEPS + layout.STYLE_STEPS))
@click.option("--params", "params_path", required=True, type=click.Path(dir_okay=False))
@user_errors
def stage(step: str, params_path: str) -> None:
    """Run one stage (DVC calls this; see dvc.yaml)."""
    import importlib
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep stage logs to progress and results
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

    module = importlib.import_module(f"proxytune.stages.{step}")
    processes = module.processes(params_path) if hasattr(module, "processes") else 1
    if processes > 1 and "PROXYTUNE_LAUNCHED" not in os.environ:
        raise SystemExit(_launch(step, params_path, processes))
    try:
        module.run(params_path)
    except Exception as err:  # a full disk: name the subject's folder when the error names no file
        message = disk_full_message(err, fallback=str(Path(params_path).parent))
        if message is None:
            raise
        raise ProxytuneError(message) from None


def _launch(step: str, params_path: str, processes: int) -> int:
    """Re-run this stage under `accelerate launch` with `processes` data-parallel processes.

    The stage module says how many (from its spec section); CPU processes use the gloo backend.
    """
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    # --multi_gpu means "torchrun, one process per rank"; without GPUs the stage asks accelerate for
    # CPU processes (PartialState(cpu=True): gloo). `--cpu` would start a single process.
    command += ["--multi_gpu"]
    command += ["-m", "proxytune.cli", "stage", step, "--params", params_path]
    click.echo(f"{step}: launching {processes} processes with accelerate", err=True)
    return subprocess.call(command, env={**os.environ, "PROXYTUNE_LAUNCHED": "1"})


@main.group()
def convert() -> None:
    """Convert original checkpoints into proxytune student folders."""


@convert.command(name="llamagen")
@click.argument("gpt_checkpoint", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--vq", "vq", required=True, type=click.Path(),
              help="The VQ tokenizer: the original vq_ds16_t2i.pt (converted here) or a diffusers VQModel folder.")
@click.option("--text-encoder", default="google/flan-t5-xl", show_default=True,
              help="T5 caption encoder: hub id or folder (a folder is recorded as an absolute path).")
@click.option("--image-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Pixels per side (a multiple of the VQ's downsampling): 256 for t2i_XL_stage1_256.pt, 512 for "
                   "t2i_XL_stage2_512.pt.")
@click.option("--cond-len", type=click.IntRange(min=1), default=120, show_default=True,
              help="Caption slots the checkpoint was trained with (LlamaGen's --cls-token-num).")
@click.option("--heads", type=click.IntRange(min=1), default=None,
              help="Attention heads; default: the original GPT preset of the checkpoint's width (XL: 20).")
@user_errors
def convert_llamagen(gpt_checkpoint: str, out_dir: str, vq: str, text_encoder: str, image_size: int, cond_len: int,
                     heads: int | None) -> None:
    """A LlamaGen T2I GPT checkpoint (original keys) -> a student folder for `student.model`.

    The architecture (width, depth, vocabulary, caption width, FFN width) is read from the checkpoint."""
    import tempfile

    from proxytune.backends import llamagen_convert, vqgan

    with tempfile.TemporaryDirectory(dir=Path(out_dir).resolve().parent) as scratch:
        vq_folder = Path(vq)
        if vq_folder.is_file():  # the original tokenizer checkpoint: convert it first
            vq_folder = vqgan.convert_file(vq, Path(scratch) / "vqvae", layout="llamagen", image_size=image_size)
        folder = llamagen_convert.convert_to_student_folder(gpt_checkpoint, out_dir, vq_folder=vq_folder, image_size=image_size,
                                                    cond_len=cond_len, num_heads=heads, text_encoder=text_encoder)
    click.echo(f"wrote {folder} (backend llamagen, {image_size} px); use it as student.model")


@convert.command(name="vqgan")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--layout", type=click.Choice(["llamagen", "taming"]), required=True,
              help="llamagen: vq_ds16_t2i.pt and other LlamaGen VQ checkpoints; taming: Chameleon's vqgan.ckpt "
                   "(Lumina-mGPT's tokenizer) and other taming-transformers VQGANs.")
@click.option("--image-size", type=click.IntRange(min=8), default=256, show_default=True,
              help="Pixels per side the tokenizer is used at (recorded as sample_size).")
@user_errors
def convert_vqgan(checkpoint: str, out_dir: str, layout: str, image_size: int) -> None:
    """An original VQGAN image tokenizer -> a diffusers VQModel folder (encoder, codebook, decoder)."""
    from proxytune.backends import vqgan

    folder = vqgan.convert_file(checkpoint, out_dir, layout=layout, image_size=image_size)
    click.echo(f"wrote {folder} (diffusers VQModel, {layout} layout)")


@convert.command(name="lumina-mgpt")
@click.argument("model")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--vqgan", "vqgan_checkpoint", required=True, type=click.Path(dir_okay=False),
              help="Chameleon's tokenizer checkpoint (vqgan.ckpt, or a .safetensors with its keys).")
@click.option("--image-size", type=click.IntRange(min=16), default=512, show_default=True,
              help="Pixels per side the checkpoint generates (a multiple of 32: Lumina-mGPT's size tokens count 32 px steps).")
@click.option("--tokenizer", default=None, help="Text tokenizer (hub id or folder) when MODEL has none; default MODEL.")
@user_errors
def convert_lumina(model: str, out_dir: str, vqgan_checkpoint: str, image_size: int, tokenizer: str | None) -> None:
    """A Lumina-mGPT (Chameleon-format) MODEL, hub id or folder, + Chameleon's VQGAN -> a student folder.

    The folder holds the converted VQGAN and names MODEL; the Chameleon weights are not copied."""
    from proxytune.backends import vqgan
    from proxytune.files import staged_dir

    if image_size % 32:
        raise ProxytuneError(f"--image-size {image_size}: must be a multiple of 32 (Lumina-mGPT's size tokens count 32 px steps)")
    out = Path(out_dir)
    if out.exists():
        raise ProxytuneError(f"{out}: already exists; choose a new folder")
    source = str(Path(model).resolve()) if Path(model).exists() else model
    meta = {"backend": "lumina-mgpt", "model": source, "vq_decoder": "vq_decoder", "image_size": image_size}
    if tokenizer:
        meta["tokenizer"] = str(Path(tokenizer).resolve()) if Path(tokenizer).exists() else tokenizer
    with staged_dir(out) as tmp:
        vqgan.convert_file(vqgan_checkpoint, tmp / "vq_decoder", layout="taming", image_size=image_size)
        (tmp / "proxytune_student.json").write_text(json.dumps(meta, indent=2) + "\n")
    click.echo(f"wrote {out} (backend lumina-mgpt, {image_size} px, weights from {source}); use it as student.model")


@convert.command(name="stylear")
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--base-model", default="Alpha-VLLM/Lumina-mGPT-7B-768", show_default=True,
              help="The Lumina-mGPT (Chameleon) model the LoRA belongs to, recorded in the adapter config.")
@click.option("--dim-head", type=click.IntRange(min=1), default=64, show_default=True,
              help="Resampler attention head width (the weights only give heads x dim_head; StyleAR: 12 x 64).")
@user_errors
def convert_stylear(model_dir: str, out_dir: str, base_model: str, dim_head: int) -> None:
    """StyleAR's released MODEL_DIR (model.safetensors + image_proj.pth) -> a peft adapter, the style
    resampler (safetensors) and its inference settings, in OUT_DIR.

    The folder loads with proxytune.backends.style_student.StyleStudent.load (a style student's layout)."""
    from proxytune.backends import stylear_convert

    meta = stylear_convert.convert_released(model_dir, out_dir, base_model=base_model, dim_head=dim_head)
    click.echo(f"wrote {out_dir} (StyleAR: LoRA rank {meta['lora_rank']} on {meta['lora_modules']} modules of "
               f"{base_model}, resampler of {meta['num_style_tokens']} style tokens"
               + (f"; {meta['ignored_keys']} non-LoRA keys ignored" if meta["ignored_keys"] else "") + ")")


@main.command(name="report")
@click.argument("spec", type=click.Path(dir_okay=False))
@user_errors
def report_cmd(spec: str) -> None:
    """Write runs/EXPERIMENT/report.html (self-contained) and report.md; log both to MLflow."""
    from proxytune import report, tracking

    root = Path.cwd()
    written = report.write_report(spec, root)
    uri = tracking.resolve_uri(written.report.tracking_uri, root)
    run_id = tracking.log_report(uri, written.report.mlflow_experiment, root, [written.html, written.md], written.report.tags())
    click.echo(f"wrote {written.html.relative_to(root)} and {written.md.relative_to(root)}; logged as MLflow run {run_id}")


@main.group()
def registry() -> None:
    """Registered adapters (teacher and student LoRAs) in the MLflow registry."""


def _uri(uri: str | None) -> str:
    from proxytune import tracking

    return tracking.resolve_uri(uri, Path.cwd())


@registry.command(name="list")
@uri_option
@user_errors
def registry_list(uri: str | None) -> None:
    """Every registered version with its aliases, role and base model."""
    from proxytune import tracking

    rows = tracking.list_versions(_uri(uri))
    if not rows:
        click.echo("registry is empty")
        return
    width = max(len(f"{r['name']}@{r['version']}") for r in rows)
    for r in rows:
        click.echo(f"{r['name'] + '@' + r['version']:<{width}}  {r['role']:<8} {r['aliases'] or '-':<20} {r['base_model']}")


@registry.command(name="pull")
@click.argument("ref")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Folder to write the adapter to.")
@uri_option
@user_errors
def registry_pull(ref: str, output: str, uri: str | None) -> None:
    """Download NAME[@VERSION|@ALIAS]; the folder loads with diffusers / peft as it is."""
    from proxytune import tracking

    path, resolved = tracking.pull(_uri(uri), ref, Path(output))
    click.echo(f"pulled {resolved} → {path} (every file matches its recorded sha256)")


@registry.command(name="show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@uri_option
@user_errors
def registry_show(ref: str, as_json: bool, uri: str | None) -> None:
    """One version (NAME@VERSION|@ALIAS): aliases, run, source, tags, files with their sha256."""
    from proxytune import tracking

    info = tracking.show(_uri(uri), ref)
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


@registry.command(name="promote")
@click.argument("ref")
@click.argument("alias")
@uri_option
@user_errors
def registry_promote(ref: str, alias: str, uri: str | None) -> None:
    """Point ALIAS (e.g. champion) at NAME@VERSION (or at the version another alias names)."""
    from proxytune import tracking

    resolved = tracking.promote(_uri(uri), ref, alias)
    click.echo(f"{resolved.rsplit('@', 1)[0]}@{alias} → {resolved}")


@main.command()
@uri_option
@user_errors
def audit(uri: str | None) -> None:
    """Re-hash every registered version's files and check every lineage link; exit 1 on any problem."""
    from proxytune import tracking

    result = tracking.audit(_uri(uri))
    for run in result["killed"]:
        click.echo(f"closed: {run}: its process is gone; marked KILLED")
    summary = f"{result['versions']} versions, {result['files']} files, {result['evaluations']} evaluation runs"
    if result["problems"]:
        for problem in result["problems"]:
            click.echo(f"problem: {problem}")
        click.echo(f"audit: {len(result['problems'])} problems ({summary} checked)")
        sys.exit(1)
    click.echo(f"audit: ok ({summary} checked; every file matches its recorded sha256, every link resolves)")


@main.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the chain as JSON.")
@click.option("--mermaid", is_flag=True, help="Print the chain as a mermaid flowchart.")
@uri_option
@user_errors
def lineage(ref: str, as_json: bool, mermaid: bool, uri: str | None) -> None:
    """References → teacher → proxy set → student → metrics behind NAME@VERSION|@ALIAS.

    Each node is marked stale when the spec or its inputs changed since (`dvc status` of the stage
    the run recorded, run in this project), or "unknown" when the project is not here.
    """
    from proxytune import provenance, tracking

    chain = provenance.mark_stale(tracking.lineage(_uri(uri), ref), Path.cwd())
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


@main.command()
@click.argument("a")
@click.argument("b")
@uri_option
@user_errors
def compare(a: str, b: str, uri: str | None) -> None:
    """Evaluation metrics of A and B side by side (student NAME@VERSION|ALIAS or evaluation run ids).

    Both subject evaluations or both style evaluations; A and B of different kinds exit 2."""
    from proxytune import tracking

    result = tracking.compare(_uri(uri), a, b)
    width = max([len(k) for k in result["metrics"]] + [6])
    click.echo(f"{'metric':<{width}}  {a:>22}  {b:>22}  {'B - A':>9}  95% interval of B - A")
    for key, (va, vb) in result["metrics"].items():
        fmt = lambda v: f"{v:22.4f}" if v is not None else f"{'-':>22}"  # noqa: E731
        delta = f"{vb - va:+9.4f}" if va is not None and vb is not None else f"{'-':>9}"
        ci = result["intervals"].get(key)
        click.echo(f"{key:<{width}}  {fmt(va)}  {fmt(vb)}  {delta}  " + (f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "-"))
    how = "paired by prompt (same prompts)" if result["paired"] else "each run's prompts resampled on their own"
    click.echo(f"intervals: 95% bootstrap resampling prompts, {how}; {result['kind']} evaluations")
    click.echo(f"runs: A {result['runs'][a]}  B {result['runs'][b]}")


@main.group()
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



@main.command()
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


@main.group()
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


if __name__ == "__main__":
    main()
