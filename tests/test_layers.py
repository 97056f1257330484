"""The import rules of docs/architecture.md, read from the source: every import of every module under
proxytune/, lazy ones inside functions included (AST only; nothing is imported, so this runs in a second)."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("teacher", "synthesis", "codes", "student", "evaluate", "curation", "style_student", "style_evaluate")
MAX_FUNCTION_LINES = 80

# Modules that still import the toy world until issue 28's other slices land; each entry names who removes it.
# The test fails once an entry no longer imports it, so the list only shrinks.
TOYWORLD_PENDING: dict[str, str] = {}
# Package edges that may close a cycle, with the reason.
ALLOWED_EDGES: dict[tuple[str, str], str] = {}
LONG_FUNCTIONS: dict[str, str] = {}  # module.function -> why it may be over MAX_FUNCTION_LINES


@cache
def modules() -> dict[str, Path]:
    """Dotted name -> file of every module under proxytune/ (a package is its __init__.py)."""
    found = {}
    for path in sorted((ROOT / "proxytune").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


@cache
def imports(name: str) -> frozenset[str]:
    """Every proxytune module `name` imports, anywhere in the file: `from proxytune import x` counts as
    proxytune.x when x is a module, relative imports are resolved."""
    path = modules()[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules() else base)
    return frozenset(m for m in found if m == "proxytune" or m.startswith(("proxytune.", "mlflow")))


def package(name: str) -> str | None:
    """proxytune.X for any module under proxytune/X (a top-level module is a package of its own)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[0] == "proxytune" else None


def is_toyworld_client(name: str) -> bool:
    return name == "proxytune.toyworld" or name.startswith("proxytune.toyworld.") or name == "proxytune.cli.toyworld"


def importers_of(prefix: str, among=None) -> dict[str, list[str]]:
    """Module -> the modules under `prefix` it imports, for every module (of `among`) that imports one."""
    hits = {}
    for name in among if among is not None else modules():
        targets = sorted(t for t in imports(name) if t == prefix or t.startswith(prefix + "."))
        if targets:
            hits[name] = targets
    return hits


def test_the_parser_sees_lazy_and_relative_imports():
    """The checks below are only as good as the reader: it finds imports inside functions and `from . import`."""
    assert "proxytune.errors" in imports("proxytune.builtins")  # inside _load
    assert "proxytune.toyworld.builtins" in imports("proxytune.toyworld.plugin")  # inside register
    assert "proxytune.builtins" in imports("proxytune.stages.runtime")  # inside base_model_tags
    assert {"proxytune.stages.proxy_scores", "proxytune.stages.params"} <= imports("proxytune.stages.synthesis")
    assert len(modules()) > 100


def test_only_the_toy_world_imports_the_toy_world():
    offenders = {name: targets for name, targets in importers_of("proxytune.toyworld").items()
                 if not is_toyworld_client(name)}
    unexpected = {name: targets for name, targets in offenders.items() if name not in TOYWORLD_PENDING}
    assert not unexpected, f"production code imports the toy world (use proxytune.builtins): {unexpected}"
    stale = sorted(set(TOYWORLD_PENDING) - set(offenders))
    assert not stale, f"no longer imports proxytune.toyworld: remove it from TOYWORLD_PENDING: {stale}"


def test_no_import_cycle_between_packages():
    edges: dict[str, set[str]] = {}
    for name in modules():
        if name in TOYWORLD_PENDING:
            targets = {t for t in imports(name) if not is_toyworld_client(t)}
        else:
            targets = imports(name)
        for target in targets:
            a, b = package(name), package(target)
            if a and b and a != b and (a, b) not in ALLOWED_EDGES:
                edges.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str) -> list[str] | None:
        """A path start -> ... -> goal over `edges`, or None."""
        stack, seen = [[start]], {start}
        while stack:
            path = stack.pop()
            for nxt in sorted(edges.get(path[-1], ())):
                if nxt == goal:
                    return [*path, nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append([*path, nxt])
        return None

    cycles = []
    for a in sorted(edges):
        for b in sorted(edges[a]):
            back = reaches(b, a)
            if back:
                cycles.append(" -> ".join([a, *back]))
    assert not cycles, f"import cycles between packages: {cycles}"


def test_stages_never_import_each_other():
    stages = {f"proxytune.stages.{s}" for s in STAGES}
    assert stages <= set(modules()), sorted(stages - set(modules()))
    crossing = {name: sorted(imports(name) & (stages - {name})) for name in stages}
    assert not {k: v for k, v in crossing.items() if v}, crossing


def test_backends_never_import_mlflow_stages_or_tracking():
    backends = [name for name in modules() if name.startswith("proxytune.backends")]
    assert len(backends) > 10
    bad = {name: sorted(t for t in imports(name)
                        if t.startswith(("mlflow", "proxytune.stages", "proxytune.tracking")))
           for name in backends}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_only_tracking_imports_mlflow():
    bad = sorted(name for name in modules() if any(t.startswith("mlflow") for t in imports(name))
                 and package(name) != "proxytune.tracking")
    assert not bad, f"mlflow outside proxytune/tracking/: {bad}"


def long_functions() -> dict[str, int]:
    """module.function (module.Class.method) -> lines, for every function over MAX_FUNCTION_LINES."""
    found = {}
    for name, path in modules().items():
        def visit(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    qualified = f"{prefix}.{child.name}"
                    if not isinstance(child, ast.ClassDef) and child.end_lineno - child.lineno + 1 > MAX_FUNCTION_LINES:
                        found[qualified] = child.end_lineno - child.lineno + 1
                    visit(child, qualified)
        visit(ast.parse(path.read_text(), str(path)), name)
    return found


def test_functions_stay_under_80_lines_or_say_why():
    found = long_functions()
    unexplained = {name: lines for name, lines in found.items() if name not in LONG_FUNCTIONS}
    assert not unexplained, f"functions over {MAX_FUNCTION_LINES} lines (split them, or allow-list with a reason): {unexplained}"
    stale = sorted(set(LONG_FUNCTIONS) - set(found))
    assert not stale, f"now under {MAX_FUNCTION_LINES} lines or gone: remove from LONG_FUNCTIONS: {stale}"
