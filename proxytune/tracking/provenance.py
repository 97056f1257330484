"""Staleness and drawing of a lineage chain (what `proxytune lineage` prints).

`lineage.lineage` reads the chain from the registry; this module asks the project whether each
node still matches it: `dvc status` of the stage the run recorded (`proxytune.dvc_stage`), whether
the stage's output in the project is still this run's, and whether the spec was edited since (and
not compiled yet). Each node gets `stale`: True, False, or "unknown" when the project is not here.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from proxytune import compile as compiler
from proxytune import layout, outputs
from proxytune.errors import ProxytuneError
from proxytune.files import digest_files, sha256_file

STAGE_OF = {"teacher": "teacher", "proxy": "synthesis", "student": "student", "evaluation": "evaluate"}
READS_REFERENCES = ("teacher", "evaluate", "style_evaluate")  # stages whose input is the reference folder too
UNKNOWN = "unknown"


def _stage_nodes(chain: dict) -> list[tuple[str, dict]]:
    nodes = [(key, chain[key]) for key in ("teacher", "proxy", "student") if key in chain]
    return nodes + [("evaluation", e) for e in chain.get("evaluations", [])]


def _split_stage(name: str) -> tuple[str, str, str]:
    """'teacher@exp.subject' -> ('teacher', 'exp', 'subject'); ('', '', '') for a stage proxytune did not compile."""
    return layout.parse_stage_name(name) or ("", "", "")


def _defines(root: Path, stage: str) -> bool:
    try:
        stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return False
    if stage.startswith(layout.JOINT_PREFIX):  # a plain stage, not a foreach item
        return stage in stages
    step, experiment, subject = _split_stage(stage)
    return layout.item_key(experiment, subject) in (stages.get(step) or {}).get("foreach", {})


def find_project(chain: dict, cwd: Path) -> Path | None:
    """The project folder holding the chain's stages: the current folder, else the recorded one."""
    nodes = [node for _, node in _stage_nodes(chain) if node.get("dvc_stage")]
    if not nodes:
        return None
    candidates = [cwd] + [Path(n["project_root"]) for n in nodes if n.get("project_root")]
    for root in candidates:
        if _defines(root, nodes[0]["dvc_stage"]):
            return root
    return None


def _describe(change) -> list[str]:
    """`dvc status --json` entries -> readable reasons."""
    if not isinstance(change, dict):
        return [str(change)]
    reasons = []
    for kind, entries in change.items():
        kind = kind.replace("changed ", "")
        if not isinstance(entries, dict):
            reasons.append(f"{kind} {entries}")
            continue
        for path, what in entries.items():
            if isinstance(what, dict):
                what = ", ".join(f"{k} {v}" for k, v in what.items())
            reasons.append(f"{kind} {path}: {what}")
    return reasons


def _get(data: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _superseded(node: dict, kind: str, root: Path) -> list[str]:
    """Whether the stage's output in the project still is this node's."""
    step, experiment, subject = _split_stage(node["dvc_stage"])
    folder = root / layout.subject_dir(experiment, subject) / layout.OUT_DIRS[step]
    try:
        record = outputs.read_record(folder, outputs.RECORDS[step])
    except ProxytuneError:  # missing or malformed
        return [f"output {folder.relative_to(root)} missing in the project"]
    if kind in ("teacher", "student"):
        current = record.registered
        return [] if current == node.get("version") else [f"superseded: the project's output is {current}"]
    if kind == "proxy":
        same = record.digest == node.get("digest")
        return [] if same else [f"superseded: the project's proxy set has digest {str(record.digest)[:12]}"]
    same = record.run_id == node.get("run_id")
    return [] if same else [f"superseded: the project's evaluation is run {record.run_id}"]


def _spec_changed(node: dict, root: Path, cache: dict) -> list[str]:
    """Spec edits not compiled yet: the stage's params as the spec reads now vs the params file."""
    from proxytune.project import resolve_spec

    spec_file = node.get("spec_file")
    if not spec_file:
        return []
    path = Path(spec_file) if Path(spec_file).is_absolute() else root / spec_file
    if not path.is_file():
        return [f"spec file {spec_file} is gone"]
    if sha256_file(path) == node.get("spec_digest"):
        return []
    step, experiment, subject = _split_stage(node["dvc_stage"])
    if path not in cache:
        try:
            cache[path] = resolve_spec(path, root, check_images=False)
        except ProxytuneError as err:
            cache[path] = err
    resolved = cache[path]
    if isinstance(resolved, ProxytuneError):
        return [f"spec file {spec_file} no longer valid ({resolved})"]
    styles = {s.name for s in resolved.spec.styles}
    if resolved.spec.name != experiment or subject not in {s.name for s in resolved.spec.subjects} | styles:
        return [f"spec file {spec_file} no longer defines {experiment}.{subject}"]
    try:
        current = yaml.safe_load((root / layout.subject_dir(experiment, subject) / "params.yaml").read_text())
    except (OSError, yaml.YAMLError):
        current = {}
    # a style's params file (its teacher's too) is compiled by style_params_for
    wanted = (compiler.style_params_for if subject in styles else compiler.params_for)(resolved, subject)
    keys = list(compiler.STAGE_PARAMS[step]) + (["source.references"] if step in READS_REFERENCES else [])
    changed = [key for key in keys if _get(wanted, key) != _get(current or {}, key)]
    return [f"spec {spec_file} edited since: {', '.join(changed)} (not compiled yet)"] if changed else []


def _references_status(refs: dict) -> tuple[object, list[str]]:
    from proxytune.images import list_images

    folder = refs.get("folder")
    if not folder or not Path(folder).is_dir():
        return UNKNOWN, [f"reference folder {folder} not found here"]
    try:
        files = list_images(folder)
    except ProxytuneError as err:
        return True, [str(err)]
    digest = digest_files([(p.name, sha256_file(p)) for p in files])
    return (False, []) if digest == refs.get("digest") else (True, ["reference images changed"])


def mark_stale(chain: dict, cwd: Path) -> dict:
    """Set `stale` (True, False or "unknown") and `stale_reasons` on every node of `chain`, in place."""
    from proxytune.project import dvc_status

    root = find_project(chain, cwd)
    nodes = _stage_nodes(chain)
    status = None
    if root is not None:
        status = dvc_status(root, sorted({n["dvc_stage"] for _, n in nodes if n.get("dvc_stage")}))
    upstream: object = False
    if "references" in chain:
        stale, reasons = _references_status(chain["references"])
        chain["references"].update(stale=stale, stale_reasons=reasons)
        upstream = stale
    cache: dict = {}
    for kind, node in nodes:
        if kind == "evaluation":
            base = chain.get("student", {}).get("stale", upstream)
        else:
            base = upstream
        if root is None or status is None or not node.get("dvc_stage"):
            why = "project not found here (run lineage in the project folder)" if root is None else "dvc status failed"
            own, reasons = UNKNOWN, [why]
        else:
            reasons = [r for change in status.get(node["dvc_stage"], []) for r in _describe(change)]
            reasons += _superseded(node, kind, root) + _spec_changed(node, root, cache)
            own = bool(reasons)
        if own is True:
            stale = True
        elif base is True:
            stale, reasons = True, reasons + ["an upstream node is stale"]
        elif UNKNOWN in (own, base):
            stale = UNKNOWN
        else:
            stale = False
        node.update(stale=stale, stale_reasons=reasons)
        if kind != "evaluation":
            upstream = stale
    return chain


def mark(node: dict) -> str:
    """' [fresh]', ' [STALE: reason; ...]' or ' [stale: unknown]' for the text view ('' when unmarked)."""
    stale = node.get("stale")
    if stale is None:
        return ""
    if stale == UNKNOWN:
        return " [stale: unknown]"
    return f" [STALE: {'; '.join(node.get('stale_reasons', []))}]" if stale else " [fresh]"


def _label(*lines: str) -> str:
    text = "<br/>".join(lines)
    for char, code in (("&", "#amp;"), ('"', "#quot;"), ("<br/>", "\0"), ("<", "#lt;"), (">", "#gt;"), ("\0", "<br/>")):
        text = text.replace(char, code)
    return f'["{text}"]'


def _base(node: dict) -> str:
    """'base MODEL', with the shipped weights' digest for a toy world model."""
    digest = node.get("base_model_digest")
    return f"base {node.get('base_model')}" + (f" (weights {digest[:12]})" if digest else "")


def to_mermaid(chain: dict) -> str:
    """A mermaid flowchart: references → teacher → proxy set → student → evaluations, stale nodes marked."""
    lines = ["flowchart LR"]
    nodes: list[tuple[str, dict]] = []

    def add(node_id: str, node: dict, *label: str) -> None:
        stale = node.get("stale")
        status = {True: "STALE", False: "fresh", UNKNOWN: "stale: unknown"}.get(stale, "") if stale is not None else ""
        lines.append(f"  {node_id}{_label(*label, *([status] if status else []))}")
        nodes.append((node_id, node))

    refs = chain.get("references")
    if refs:
        add("references", refs, f"references ({len(refs.get('files') or {})} images)", f"digest {str(refs.get('digest'))[:12]}")
    teacher = chain.get("teacher")
    if teacher:
        add("teacher", teacher, f"teacher {teacher['version']}", _base(teacher),
            f"adapter {str(teacher.get('adapter_digest'))[:12]}")
    proxy = chain.get("proxy")
    if proxy:
        add("proxy", proxy, f"{proxy.get('set', 'proxy')} set: {proxy.get('num_images')} images", f"digest {str(proxy.get('digest'))[:12]}")
    student = chain.get("student")
    if student:
        add("student", student, f"student {student['version']}", _base(student),
            f"adapter {str(student.get('adapter_digest'))[:12]}")
    evaluations = chain.get("evaluations", [])
    for i, evaluation in enumerate(evaluations):
        metrics = [f"{k} {v:.4f}" for k, v in evaluation.get("metrics", {}).items() if k.startswith(("teacher.", "student."))]
        add(f"evaluation{i}", evaluation, f"evaluation run {evaluation['run_id'][:12]}", *metrics[:6])
    ids = [node_id for node_id, _ in nodes if not node_id.startswith("evaluation")]
    lines += [f"  {a} --> {b}" for a, b in zip(ids, ids[1:])]
    if student:
        lines += [f"  student --> evaluation{i}" for i in range(len(evaluations))]
    stale = [node_id for node_id, node in nodes if node.get("stale") is True]
    unknown = [node_id for node_id, node in nodes if node.get("stale") == UNKNOWN]
    lines += ["  classDef stale fill:#fde2e2,stroke:#c62828,stroke-width:2px",
              "  classDef unknown stroke-dasharray:4 4"]
    if stale:
        lines.append(f"  class {','.join(stale)} stale")
    if unknown:
        lines.append(f"  class {','.join(unknown)} unknown")
    return "\n".join(lines)
