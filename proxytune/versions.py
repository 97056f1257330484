"""What is installed: the versions every stage run records and `proxytune doctor` checks.

Reads package metadata only (importlib.metadata): nothing here imports torch, mlflow or a model
library, so the CLI and every stage can call it cheaply. Every check takes an `Installed` snapshot,
so tests can hand it any combination.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

from proxytune import lockfile
from proxytune.errors import ProxytuneError
from proxytune.lockfile import normalize, public

KEY_PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate")


@dataclass(frozen=True)
class Break:
    """A known-bad combination: it holds when every package is installed in its range."""

    when: dict[str, str]  # package -> PEP 440 specifier
    why: str


KNOWN_BREAKS = (
    Break(
        {"transformers": ">=5.24", "peft": "<0.22"},
        "transformers 5.24 requires peft>=0.22 in its PEFT integration (add_adapter and the other adapter "
        "methods raise 'The version of PEFT you are using is not compatible'); proxytune is tested with "
        "transformers<5.24",
    ),
)


@dataclass
class Installed:
    """A snapshot of an environment: {normalized name: version} and each one's Requires-Dist lines."""

    versions: dict[str, str]
    requires: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def current(cls) -> "Installed":
        from importlib import metadata

        versions: dict[str, str] = {}
        requires: dict[str, list[str]] = {}
        for dist in metadata.distributions():
            name = dist.metadata["Name"]
            if name and normalize(name) not in versions:  # the first on sys.path is the one imported
                versions[normalize(name)] = dist.version
                requires[normalize(name)] = list(dist.requires or [])
        return cls(versions, requires)

    def version(self, name: str) -> str | None:
        return self.versions.get(normalize(name))


def known_breaks(env: Installed) -> list[str]:
    """One line per known-bad combination that this environment holds."""
    from packaging.specifiers import SpecifierSet

    found = []
    for rule in KNOWN_BREAKS:
        have = {name: env.version(name) for name in rule.when}
        if all(v is not None and SpecifierSet(spec).contains(public(v), prereleases=True)
               for (name, spec), v in zip(rule.when.items(), have.values())):
            pair = " with ".join(f"{name} {v}" for name, v in have.items())
            found.append(f"{pair}: {rule.why}")
    return found


def unmet_requirements(env: Installed, project: str = "proxytune") -> list[str]:
    """proxytune's own runtime requirements that the installed versions do not satisfy."""
    from packaging.requirements import Requirement

    problems = []
    for line in env.requires.get(normalize(project), []):
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra's (dev) or another platform's requirement
        have = env.version(req.name)
        if have is None:
            problems.append(f"{req.name} is not installed ({project} requires {req.name}{req.specifier})")
        elif not req.specifier.contains(public(have), prereleases=True):
            problems.append(f"{req.name} {have} does not satisfy {project}'s requirement {req.name}{req.specifier}")
    return problems


def dependency_closure(env: Installed, root: str = "proxytune", extras: tuple[str, ...] = ("dev",)) -> set[str]:
    """Installed distributions that `root[extras]` pulls in, transitively (markers evaluated here)."""
    from packaging.requirements import InvalidRequirement, Requirement

    seen: set[tuple[str, str]] = set()
    todo = [(normalize(root), extra) for extra in ("", *extras)]
    names: set[str] = set()
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen or name not in env.versions:
            continue
        seen.add((name, extra))
        names.add(name)
        for line in env.requires.get(name, []):
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                continue
            todo += [(normalize(req.name), e) for e in ("", *req.extras)]
    return names - {normalize(root)}


def lock_differences(env: Installed, pins: dict[str, str]) -> list[str]:
    """Where the installed dependencies of proxytune[dev] leave the lock, one line each."""
    problems = []
    for name in sorted(dependency_closure(env)):
        have = env.versions[name]
        if name not in pins:
            problems.append(f"{name} {have} is not in the lock")
        elif public(have) != pins[name]:
            problems.append(f"{name} {have} (lock {pins[name]})")
    return problems


@dataclass
class Report:
    versions: dict[str, str]  # python, proxytune and KEY_PACKAGES ("not installed" when absent)
    lock: Path | None  # None: an installed wheel (no lock to compare with)
    lock_digest: str | None  # None: no lock, or lock_error
    lock_error: str | None  # the lock of a source checkout is missing or malformed
    lock_differences: list[str]
    problems: list[str]  # known breaks and unmet requirements: each makes `doctor` fail

    def tags(self) -> dict[str, str]:
        """Run tags (after the `proxytune.` prefix): version.NAME, lock_digest, lock_status."""
        tags = {f"version.{name}": v for name, v in self.versions.items()}
        tags["lock_digest"] = self.lock_digest or "none"
        tags["lock_status"] = self.lock_status()[:4000]
        if self.problems:
            tags["version_problems"] = " | ".join(self.problems)[:4000]
        return tags

    def lock_status(self) -> str:
        if self.lock is None:
            return "none (not a source checkout)"
        if self.lock_error:
            return self.lock_error
        if not self.lock_differences:
            return "matches"
        shown = "; ".join(self.lock_differences[:5])
        more = f"; and {len(self.lock_differences) - 5} more" if len(self.lock_differences) > 5 else ""
        return f"{len(self.lock_differences)} differ: {shown}{more}"

    def lines(self) -> list[str]:
        width = max(len(name) for name in self.versions)
        out = [f"{name:<{width}}  {v}" for name, v in self.versions.items()]
        if self.lock_digest is None:
            out.append(f"{'lock':<{width}}  {self.lock_status()}")
        else:
            state = "the installed set matches it" if not self.lock_differences else \
                f"{len(self.lock_differences)} installed dependencies differ from it"
            out.append(f"{'lock':<{width}}  {self.lock.name} sha256 {self.lock_digest[:16]}: {state}")
            out += [f"{'':<{width}}    {line}" for line in self.lock_differences]
        out += [f"incompatible: {p}" for p in self.problems]
        return out


def report(env: Installed | None = None, lock: Path | None | str = "auto") -> Report:
    """Versions, the lock ("auto": the source tree's constraints.txt, if any) and every known problem."""
    env = env or Installed.current()
    lock = lockfile.lock_path() if lock == "auto" else lock
    versions = {"python": platform.python_version(), "proxytune": env.version("proxytune") or "not installed"}
    versions |= {name: env.version(name) or "not installed" for name in KEY_PACKAGES}
    pins, error = None, None
    if lock is not None:
        try:
            pins = lockfile.read(lock)
        except ProxytuneError as err:
            error = str(err)
    return Report(
        versions=versions,
        lock=lock,
        lock_digest=lockfile.digest(pins) if pins is not None else None,
        lock_error=error,
        lock_differences=lock_differences(env, pins) if pins is not None else [],
        problems=known_breaks(env) + unmet_requirements(env),
    )
