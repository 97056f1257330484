"""Reading a spec file's YAML defensively: what the file holds before the schema sees it.

A spec is plain data (mappings, lists, strings, numbers, booleans, null). Refused, each as one line naming
the file, the key where the problem sits (when the YAML got that far) and the line:
- a file that is not UTF-8 text, or larger than MAX_SPEC_BYTES;
- explicit YAML tags other than the plain-data ones (`!!python/object...`, `!custom`, `!!binary`, `!!set`);
- aliases that expand to more than MAX_NODES nodes (a "billion laughs" bomb: a few lines that expand to
  millions of values once anything walks them) or that refer to themselves;
- nesting deeper than the YAML parser's recursion allows.
"""

from __future__ import annotations

import errno
from pathlib import Path

import yaml

from proxytune.errors import SpecError

MAX_SPEC_BYTES = 1 << 20  # 1 MiB; the largest shipped spec is a few KB
MAX_NODES = 100_000  # values after alias expansion; dreambench9.yaml has a few hundred
_PLAIN = "tag:yaml.org,2002:"
PLAIN_TAGS = {_PLAIN + name for name in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp", "merge")}


def read_spec_data(path: Path) -> object:
    """The YAML data of a spec file (before schema validation).

    Raises:
        SpecError: see the module docstring; also a missing or unreadable file and malformed YAML.
    """
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        before = raw[: err.start]
        line, column = before.count(b"\n"), len(before) - (before.rfind(b"\n") + 1)
        key = _key_in_text(raw.decode("utf-8", errors="replace"), line, column)
        raise SpecError(f"{path}: {key}line {line + 1}, column {column + 1}: not UTF-8 text (byte "
                        f"0x{raw[err.start]:02x}); save the spec as UTF-8") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise SpecError(_yaml_error(path, err, None)) from None
    except RecursionError:
        raise SpecError(f"{path}: malformed YAML: nested too deeply for a spec") from None
    if root is None:
        return None
    _check_tags(path, root)
    _check_size(path, root)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:  # a value of a plain tag that does not construct (e.g. an impossible date)
        raise SpecError(_yaml_error(path, err, root)) from None


def _read_bytes(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise SpecError(f"{path}: cannot read spec (a folder, not a file)")
        if size > MAX_SPEC_BYTES:
            raise SpecError(f"{path}: cannot read spec ({size / 2**20:.1f} MiB; a spec is a few KB, at most "
                            f"{MAX_SPEC_BYTES // 2**20} MiB)")
        return path.read_bytes()
    except FileNotFoundError:
        if path.is_symlink():
            raise SpecError(f"{path}: cannot read spec (a broken symlink)") from None
        raise SpecError(f"{path}: no such spec file") from None
    except OSError as err:
        reason = "a symlink loop" if err.errno == errno.ELOOP else err.strerror or err.__class__.__name__
        raise SpecError(f"{path}: cannot read spec ({reason})") from None


# -- where in the document ---------------------------------------------------------------------------
def _contains(node: yaml.Node, line: int, column: int) -> bool:
    start, end = node.start_mark, node.end_mark
    return (start.line, start.column) <= (line, column) and ((line, column) < (end.line, end.column) or
                                                            (start.line, start.column) == (line, column))


def _key_path(root: yaml.Node, line: int, column: int) -> str:
    """The key path (`teacher.lora.rank`, `subjects[0].images`) of the innermost node at line/column; ''
    when the position is outside every value, or at the top level."""
    parts: list[str] = []
    node, seen = root, set()
    while id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if _contains(key, line, column) or id(value) not in seen and _contains(value, line, column):
                    name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                    parts.append(("." if parts else "") + str(name))
                    if _contains(key, line, column):
                        return "".join(parts)
                    node = value
                    break
            else:
                break
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                if id(item) not in seen and _contains(item, line, column):  # an alias of an outer value: not it
                    parts.append(f"[{index}]")
                    node = item
                    break
            else:
                break
        else:
            break
    return "".join(parts)


def _key_in_text(text: str, line: int, column: int) -> str:
    """`key: ` of a position in text that may not parse; '' when it does not, or names no key."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return ""
    key = _key_path(root, line, column) if root is not None else ""
    return f"{key}: " if key else ""


def _where(root: yaml.Node | None, node_or_mark) -> str:
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    key = _key_path(root, mark.line, mark.column) if root is not None else ""
    return f"{key}: " if key else ""


def _yaml_error(path: Path, err: yaml.YAMLError, root: yaml.Node | None) -> str:
    mark = getattr(err, "problem_mark", None)
    key = _where(root, mark) if mark is not None else ""
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{path}: {key}{where}malformed YAML: {problem}"


# -- what the document holds -------------------------------------------------------------------------
def _walk(root: yaml.Node):
    """Every distinct node once (aliases are the same node object), depth first, without recursion."""
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        if isinstance(node, yaml.MappingNode):
            for key, value in reversed(node.value):
                stack += [value, key]
        elif isinstance(node, yaml.SequenceNode):
            stack += reversed(node.value)


def _check_tags(path: Path, root: yaml.Node) -> None:
    for node in _walk(root):
        if node.tag not in PLAIN_TAGS:
            shown = "!!" + node.tag[len(_PLAIN):] if node.tag.startswith(_PLAIN) else node.tag
            mark = node.start_mark
            raise SpecError(f"{path}: {_where(root, node)}line {mark.line + 1}, column {mark.column + 1}: YAML tag "
                            f"{shown} is not allowed (a spec holds plain mappings, lists, strings and numbers)")


def _check_size(path: Path, root: yaml.Node) -> None:
    """Count the nodes the document expands to (each alias counted as what it stands for), bottom-up."""
    size: dict[int, int] = {}
    order = list(_walk(root))
    children = {id(n): ([c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else
                        list(n.value) if isinstance(n, yaml.SequenceNode) else []) for n in order}
    # A node that (through aliases) contains itself never finishes: find one with a depth-first colouring.
    state: dict[int, int] = {}
    for start in order:
        if id(start) in state:
            continue
        stack = [(start, iter(children[id(start)]))]
        state[id(start)] = 1
        while stack:
            node, rest = stack[-1]
            child = next(rest, None)
            if child is None:
                state[id(node)] = 2
                size[id(node)] = 1 + sum(size[id(c)] for c in children[id(node)])
                if size[id(node)] > MAX_NODES:
                    raise SpecError(f"{path}: {_where(root, node)}line {node.start_mark.line + 1}: YAML aliases expand "
                                    f"to more than {MAX_NODES} values (an alias bomb?); write the values out")
                stack.pop()
            elif state.get(id(child)) == 1:
                raise SpecError(f"{path}: {_where(root, child)}line {child.start_mark.line + 1}: a YAML alias refers "
                                "to a value that contains it (a recursive structure)")
            elif id(child) not in state:
                state[id(child)] = 1
                stack.append((child, iter(children[id(child)])))
