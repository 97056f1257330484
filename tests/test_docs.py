"""The README and the documentation site show only commands and specs that work.

Every fenced ```bash / ```sh / ```console block of README.md and docs/*.md is read line by line:
a `proxytune ...` command must name a real command path with options it knows and no more arguments
than it takes; a spec file or script it names must exist. The cheap ones (`validate`, `schema`, `plan`
on an example spec) then run. Every ```yaml block whose keys are spec sections is validated as a spec
(merged over a minimal one; model names are not resolved, so hub ids need no download). A block that
cannot be checked says so in an HTML comment on the line before it: `<!-- docs-test: skip REASON -->`.
Finally the site builds with `mkdocs build --strict` (skipped only when mkdocs is not installed).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from proxytune.cli import main
from proxytune.spec import ExperimentSpec, dreambench_root, parse_spec

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "console", "shell"}
MARKER = re.compile(r"<!--\s*docs-test:\s*skip\s+(?P<reason>\S.*?)\s*-->")
# Commands cheap enough to run here (seconds, no network, nothing written outside the model cache).
RUN = {("validate",), ("schema",), ("plan",)}


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    skip: str | None  # the reason given in a docs-test marker

    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks() -> list[Block]:
    """Every fenced block of the pages, with the skip marker on the line before it (if any)."""
    found = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            opening = re.match(r"^```\s*(\w*)", lines[i])
            if not opening:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = MARKER.search(before)
            found.append(Block(str(page.relative_to(ROOT)), i + 1, opening.group(1).lower(),
                               "\n".join(lines[i + 1:end]), marker.group("reason") if marker else None))
            i = end + 1
    return found


BLOCKS = blocks()
SHELL_BLOCKS = [b for b in BLOCKS if b.lang in SHELL and not b.skip]
YAML_BLOCKS = [b for b in BLOCKS if b.lang == "yaml" and not b.skip]


def commands(block: Block) -> list[list[str]]:
    """The block's commands as argument lists: continuations joined, comments dropped, and each line
    split at `&&`, `;` and `|`; redirections, `$(...)` lines and shell keywords are left out."""
    text = re.sub(r"\\\n\s*", " ", block.text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("$ "):  # a console block's prompt
            line = line[2:]
        if not line or line.startswith("#"):
            continue
        command: list[str] = []
        redirected = False  # the tokens after > or < name a file, not an argument
        for token in shlex.split(line, comments=True) + ["&&"]:
            if token in {"&&", ";", "|", "||"}:
                if command:
                    out.append(command)
                command, redirected = [], False
            elif token in {">", ">>", "<", "2>", "&>"}:
                redirected = True
            elif not redirected:
                command.append(token)
    return out


def proxytune_commands(block: Block) -> list[list[str]]:
    found = []
    for command in commands(block):
        while command and re.match(r"^[A-Z_]+=", command[0]):  # VAR=value before the program
            command = command[1:]
        if command and Path(command[0]).name == "proxytune":
            # `[--opt VALUE]` in a usage line: the brackets only say it is optional
            found.append([t.strip("[]") for t in command[1:] if t.strip("[]")])
    return found


def resolve(args: list[str]) -> tuple[click.Command, list[str], tuple[str, ...]]:
    """The command that `proxytune ARGS` runs, the arguments left for it, and its path of names."""
    command: click.Command = main
    path: tuple[str, ...] = ()
    while isinstance(command, click.Group):
        if not args or args[0].startswith("-"):
            return command, args, path
        sub = command.get_command(click.Context(command), args[0])
        assert sub is not None, f"no command `proxytune {' '.join(path + (args[0],))}`"
        command, path, args = sub, path + (args[0],), args[1:]
    return command, args, path


def check_arguments(command: click.Command, args: list[str], shown: str) -> None:
    """Option names known, option values present, positional count within what the command takes."""
    options = {name: p for p in command.get_params(click.Context(command)) if isinstance(p, click.Option)
               for name in p.opts + p.secondary_opts}
    positional = 0
    i = 0
    while i < len(args):
        token = args[i]
        if token.startswith("-") and token != "-":
            name = token.split("=", 1)[0]
            assert name in options, f"`{shown}`: no option {name} (known: {', '.join(sorted(options))})"
            option = options[name]
            if not option.is_flag and not option.count and "=" not in token:
                assert i + 1 < len(args), f"`{shown}`: {name} needs a value"
                i += 1
        else:
            positional += 1
        i += 1
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    unbounded = any(p.nargs < 0 for p in arguments)
    most = sum(max(p.nargs, 0) for p in arguments)
    least = sum(max(p.nargs, 1) for p in arguments if p.required)
    assert unbounded or positional <= most, f"`{shown}`: {positional} arguments, the command takes {most}"
    assert positional >= least, f"`{shown}`: {positional} arguments, the command needs {least}"


def check_paths(command: list[str], shown: str) -> None:
    """Example specs, scripts and modules the command names exist in this tree."""
    for token in command:
        if re.match(r"^(specs|benchmarks)/[\w./-]+\.(ya?ml|py)$", token):
            assert (ROOT / token).exists(), f"`{shown}`: {token} does not exist"
    if command[:2] == ["python", "-m"] and command[2].startswith("proxytune"):
        assert importlib.util.find_spec(command[2]) is not None, f"`{shown}`: no module {command[2]}"


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=Block.where)
def test_shell_block_commands_parse(block):
    for command in commands(block):
        check_paths(command, " ".join(command))
    for args in proxytune_commands(block):
        shown = "proxytune " + " ".join(args)
        command, rest, _ = resolve(args)
        check_arguments(command, rest, shown)


def _runnable() -> list[tuple[str, list[str]]]:
    """The cheap commands the pages show, once each."""
    seen, found = set(), []
    for block in SHELL_BLOCKS:
        for args in proxytune_commands(block):
            _, _, path = resolve(args)
            if path not in RUN or tuple(args) in seen:
                continue
            specs = [ROOT / a for a in args if a.endswith((".yaml", ".yml"))]
            if not all(s.is_file() for s in specs):
                continue  # test_shell_block_commands_parse names the missing file
            seen.add(tuple(args))
            found.append((block.where(), args))
    return found


@pytest.mark.parametrize("where,args", _runnable(), ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_cheap_commands_run(where, args, monkeypatch, request):
    monkeypatch.chdir(ROOT)
    needed = {name for a in args if a.endswith((".yaml", ".yml"))
              for name in re.findall(r"dreambench:([\w-]+)", (ROOT / a).read_text(encoding="utf-8"))}
    if needed and not dreambench_root().is_dir():  # no DreamBench copy: the suite's stand-in photos, where it has them
        photos = request.getfixturevalue("photos")
        missing = sorted(needed - {folder.name for folder in photos.iterdir()})
        if missing:
            pytest.skip(f"needs DreamBench's {', '.join(missing)}: run `proxytune data dreambench` or set PROXYTUNE_DREAMBENCH")
        monkeypatch.setenv("PROXYTUNE_DREAMBENCH", str(photos))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, f"{where}: `proxytune {' '.join(args)}` exited {result.exit_code}: {result.output}"
    assert result.output.strip(), f"{where}: `proxytune {' '.join(args)}` printed nothing"


def test_the_readme_runs_something():
    """The extraction finds the README's first-run commands and runs the cheap ones (guards the parser)."""
    readme = [args for b in SHELL_BLOCKS if b.page == "README.md" for args in proxytune_commands(b)]
    assert ["apply", "specs/toy.yaml"] in readme and ["validate", "specs/dog.yaml"] in readme
    assert any(args[0] == "plan" for _, args in _runnable())


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


# What a fragment is merged over: one subject (its images are not read) and nothing else.
MINIMAL = {"name": "docs-check", "subjects": [{"name": "dog", "class": "dog", "images": "photos/dog"}]}


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=Block.where)
def test_yaml_blocks_are_valid_specs(block):
    data = yaml.safe_load(block.text)
    assert isinstance(data, dict), f"{block.where()}: a yaml block that is not a mapping (mark it docs-test: skip)"
    unknown = set(data) - set(ExperimentSpec.model_fields)
    assert not unknown, f"{block.where()}: keys {sorted(unknown)} are no spec section (mark it docs-test: skip REASON)"
    spec = _merge(MINIMAL, data)
    if "styles" in data and "subjects" not in data:
        spec.pop("subjects")
    parse_spec(spec, block.where())


def test_site_builds_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (it is in the dev extra: pip install -e '.[dev]' -c constraints.txt)")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "spec" / "index.html").is_file()


def test_ci_runs_the_readmes_setup_and_test_commands():
    """`.ci/run` says it runs the README's setup and test commands: the two must stay the same lines."""
    readme = [b for b in SHELL_BLOCKS if b.page == "README.md"]
    setup = next(b.text for b in readme if b.text.startswith("pip install torch"))
    tests = next(b.text for b in readme if b.text.startswith("python -m pytest"))
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert setup in ci and tests in ci, f".ci/run lacks the README's `{setup}` or `{tests}`"
    assert any(line.startswith("mkdocs build --strict") for line in ci), ".ci/run does not build the site"


def test_readme_links_into_docs_exist():
    """The README is outside the site (mkdocs checks the pages' links): its links into docs/ are checked here."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)\s]*)?\)", readme)
    assert links, "the README links no page of the documentation site"
    missing = sorted({link for link in links if not (ROOT / link).is_file()})
    assert not missing, f"README.md links to missing pages: {missing}"


def test_every_command_is_documented():
    """Each command of the CLI has its line on the Commands page (the toy world's on its own page)."""

    def paths(command: click.Command, path: tuple[str, ...] = ()):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from paths(sub, path + (name,))
        else:
            yield path

    shown = (ROOT / "docs" / "commands.md").read_text(encoding="utf-8") + (ROOT / "docs" / "toyworld.md").read_text(encoding="utf-8")
    missing = [" ".join(p) for p in paths(main) if f"`proxytune {' '.join(p)}" not in shown]
    assert not missing, f"commands without a line in docs/commands.md: {missing}"
