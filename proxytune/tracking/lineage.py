"""The chain behind a registered version (references → teacher → proxy set → student → evaluations),
read from run and version tags; evaluation runs of a version, and two evaluations compared.
`provenance` checks the chain against the project."""

from __future__ import annotations

import re

from proxytune.errors import ProxytuneError
from proxytune.tracking.registry import get_version
from proxytune.tracking.store import TAG, connect, find_run, load_json_artifact, run_tag

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def lineage(uri: str, ref: str) -> dict:
    """The chain behind a registered version: references → teacher → proxy set → student → metrics."""
    client = connect(uri)
    version = get_version(client, ref)
    role = version.tags.get(f"{TAG}role")
    run = client.get_run(version.run_id)
    if role == "student":
        student_version, student_run = version, run
        teacher_ref = run_tag(run, "teacher_version")
        if teacher_ref and "," in teacher_ref:
            raise ProxytuneError(f"{ref}: a multi-subject student learned from several teachers ({teacher_ref}); "
                                 "run lineage on one of them")
        teacher_version = get_version(client, teacher_ref) if teacher_ref else None
    elif role == "teacher":
        teacher_version, student_version, student_run = version, None, None
    else:
        raise ProxytuneError(f"{ref}: not a proxytune adapter (no role tag)")
    chain: dict = {"ref": f"{version.name}@{version.version}"}
    if teacher_version is not None:
        teacher_run = client.get_run(teacher_version.run_id)
        chain["references"] = {
            "folder": run_tag(teacher_run, "references_dir"),
            "digest": run_tag(teacher_run, "references_digest"),
            "files": load_json_artifact(uri, teacher_run.info.run_id, "references.json") or {},
        }
        chain["teacher"] = {
            "version": f"{teacher_version.name}@{teacher_version.version}",
            "run_id": teacher_run.info.run_id,
            "base_model": teacher_version.tags.get(f"{TAG}base_model"),
            "base_model_digest": teacher_version.tags.get(f"{TAG}base_model_digest"),  # toy world built-ins
            "adapter_digest": teacher_version.tags.get(f"{TAG}adapter_digest"),
            **_origin(teacher_run),
        }
    if student_run is not None:
        synthesis_id = run_tag(student_run, "synthesis_run_id")
        chain["proxy"] = {
            "set": "curated" if student_version.tags.get(f"{TAG}recipe") == "stylear" else "proxy",  # a style's curation
            "digest": run_tag(student_run, "proxy_digest"),
            "num_images": run_tag(student_run, "proxy_images"),
            "prompts_digest": run_tag(student_run, "proxy_prompts_digest"),
            "synthesis_run_id": synthesis_id,
            **_origin(find_run(client, synthesis_id)),
        }
        chain["student"] = {
            "version": f"{student_version.name}@{student_version.version}",
            "run_id": student_run.info.run_id,
            "base_model": student_version.tags.get(f"{TAG}base_model"),
            "base_model_digest": student_version.tags.get(f"{TAG}base_model_digest"),  # toy world built-ins
            "adapter_digest": student_version.tags.get(f"{TAG}adapter_digest"),
            **_origin(student_run),
        }
        key = f"{student_version.name}@{student_version.version}"
        evaluations = client.search_runs(
            [student_run.info.experiment_id],
            filter_string=f"tags.`{TAG}student_version` = '{key}'",
            order_by=["attributes.start_time DESC"],
        )
        chain["evaluations"] = [
            {"run_id": e.info.run_id, "kind": evaluation_kind(e), "metrics": dict(sorted(e.data.metrics.items())), **_origin(e)}
            for e in evaluations if evaluation_kind(e) is not None
        ]
    return chain


def _origin(run) -> dict:
    """Where a stage run came from (DVC stage, project folder, spec): `lineage` checks staleness with it."""
    if run is None:
        return {}
    return {key: run_tag(run, key) for key in ("dvc_stage", "project_root", "spec_file", "spec_digest")}


EVALUATION_STAGES = {"subject": "evaluate", "style": "style_evaluate"}  # evaluation kind -> proxytune.stage tag


def evaluation_kind(run) -> str | None:
    """'subject' or 'style' for an evaluation run (its `proxytune.stage` tag), None for any other run.

    A style evaluation logged before style evaluations had a stage of their own carries stage
    'evaluate' and a `proxytune.style` tag: it is a style evaluation too."""
    stage = run_tag(run, "stage")
    if stage == EVALUATION_STAGES["subject"]:
        return "style" if run_tag(run, "style") else "subject"
    return "style" if stage == EVALUATION_STAGES["style"] else None


def evaluation_run(uri: str, ref: str):
    """The newest evaluation run (subject or style) of a registered student version, or the run with that id.

    Raises:
        ProxytuneError: no such run or version, the run is not an evaluation, or no evaluation records the version.
    """
    client = connect(uri)
    if RUN_ID.match(ref):
        try:
            run = client.get_run(ref)
        except ProxytuneError:
            raise
        except Exception:
            raise ProxytuneError(f"{ref}: no such run") from None
        if evaluation_kind(run) is None:
            raise ProxytuneError(f"run {ref}: not an evaluation run (tag {TAG}stage is {run_tag(run, 'stage')!r}, "
                                 f"expected one of {', '.join(EVALUATION_STAGES.values())})")
        return run
    version = get_version(client, ref)
    key = f"{version.name}@{version.version}"
    run = client.get_run(version.run_id)
    found = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`{TAG}student_version` = '{key}'",
        order_by=["attributes.start_time DESC"],
    )
    found = [one for one in found if evaluation_kind(one) is not None]
    if not found:
        raise ProxytuneError(f"{key}: no evaluation run records this version")
    return found[0]


def compare(uri: str, a: str, b: str) -> dict:
    """Metrics of two evaluation runs (given as student versions or run ids), side by side, with the 95%
    interval of B - A for every MODEL.METRIC mean, resampling prompts (from each run's eval/per_prompt.json;
    paired prompt by prompt when both runs used the same prompts).

    Both must be evaluations of one kind: two subject evaluations (CLIP-I, CLIP-T, DINO, ...) or two style
    evaluations (style CLIP, style Gram, CLIP-T, leakage, ...); their metrics mean different things.

    Raises:
        ProxytuneError: A and B are evaluations of different kinds (the line names the `proxytune.stage` tags).
    """
    from proxytune import stats

    runs = {a: evaluation_run(uri, a), b: evaluation_run(uri, b)}
    kinds = {label: evaluation_kind(run) for label, run in runs.items()}
    if kinds[a] != kinds[b]:
        raise ProxytuneError(
            f"{a} is a {kinds[a]} evaluation (run {runs[a].info.run_id}) and {b} a {kinds[b]} evaluation "
            f"(run {runs[b].info.run_id}): tag {TAG}stage {EVALUATION_STAGES[kinds[a]]} vs {EVALUATION_STAGES[kinds[b]]}; "
            f"compare two evaluations of one kind")
    keys = sorted(set(runs[a].data.metrics) | set(runs[b].data.metrics))
    per_prompt = {label: load_json_artifact(uri, run.info.run_id, "eval/per_prompt.json") for label, run in runs.items()}
    prompts = {label: load_json_artifact(uri, run.info.run_id, "eval/prompts.json") for label, run in runs.items()}
    paired = prompts[a] is not None and prompts[a] == prompts[b]
    intervals = {}
    for key in keys:
        model, _, metric = key.partition(".")
        sides = [(per_prompt[label] or {}).get(model) if isinstance(per_prompt[label], dict) else None for label in (a, b)]
        if all(isinstance(side, list) and side and metric in side[0] for side in sides):
            values = [[row.get(metric) for row in side] for side in sides]
            intervals[key] = stats.prompt_difference_ci(values[0], values[1], paired)
        else:
            intervals[key] = None  # not a per-prompt mean (total_variance, gate_passed), or an older run
    return {
        "kind": kinds[a],
        "runs": {label: run.info.run_id for label, run in runs.items()},
        "metrics": {k: [runs[a].data.metrics.get(k), runs[b].data.metrics.get(k)] for k in keys},
        "intervals": intervals,
        "paired": paired,
    }
