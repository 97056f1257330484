"""Student families: one typed record per AR student backend, and the one place that picks and loads one.

A family is a package here (`llamagen/`, `lumina/`, `janus/`: model, loader, converter, tiny built-in,
sampler defaults) whose `__init__` defines its `StudentFamily` record; `_BUILT_IN` names the three. The
spec's choices, dispatch, the pre-flight and `proxytune convert` read the records, so adding a family is
one folder and one line (or one `register` call, as tests/test_student_registry.py does).

A student folder (or hub repo) says which family it is through its own files, never its name:
- proxytune_student.json's "backend" (proxytune's own layouts; meta.py), else
- config.json's model_type (a transformers checkpoint), matched against each family's `model_types`;
  a model type a family `refuses` (Janus-Pro as released, `multi_modality`) is an error with the fix;
- a proxytune_student.json without "backend" and no config.json is a llamagen folder (older folders).

Torch-free at import: the spec and the pre-flight import this; `load` and the tiny builders import their
backend (and torch) when called.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from proxytune.backends.students.meta import STUDENT_META, StudentMeta
from proxytune.errors import ProxytuneError

if TYPE_CHECKING:  # pragma: no cover
    import click

    from proxytune.backends.students.api import StudentBackend

LEGACY_FAMILY = "llamagen"  # a proxytune_student.json without "backend" and no config.json


@dataclass(frozen=True)
class SamplerDefaults:
    """A family's sampler settings as its authors ship them: what a spec field left unset (null) means.

    The spec's descriptions, each backend's `generate` defaults and `api.sampling_settings` read these.

    Attributes:
        cfg_scale: classifier-free guidance scale.
        top_k: sample among the k most likely codes; None: every code.
        temperature: softmax temperature (0: greedy).
        source: where the authors ship them (file and function), for the reader who checks.
    """

    cfg_scale: float
    top_k: int | None
    temperature: float
    source: str = ""

    def settings(self) -> dict[str, Any]:
        return {"cfg_scale": self.cfg_scale, "top_k": self.top_k, "temperature": self.temperature}


# A StyleAR style student (on lumina-mgpt) samples with StyleAR's own settings, not its base's: its
# inference.py passes create_logits_processor(cfg=4.0, image_top_k=2000) and temperature 1.0.
STYLEAR_SAMPLING = SamplerDefaults(cfg_scale=4.0, top_k=2000, temperature=1.0, source="StyleAR inference.py")


def _resolve(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def lazy(target: str) -> Callable[..., Any]:
    """The function `target` ("package.module:name") as a callable that imports its module on the first call:
    a family's record names its backend's loader and tiny builder without importing torch."""
    def call(*args: Any, **kwargs: Any) -> Any:
        return _resolve(target)(*args, **kwargs)

    call.__name__ = call.__qualname__ = target
    return call


def lazy_attribute(target: str) -> Callable[[], Any]:
    """A callable that imports and returns `target` ("package.module:name"), e.g. a click command."""
    def get() -> Any:
        return _resolve(target)

    get.__name__ = get.__qualname__ = target
    return get


@dataclass(frozen=True)
class TinyStudent:
    """A built-in tiny student: random weights in the family's real layout, made once into the model cache.

    Attributes:
        key: the cache folder's name; must change whenever `build`'s output would.
        build: writes the folder (imports torch itself); `tiny_cache.materialize` runs it once.
    """

    key: str
    build: Callable[[Path], None]

    def folder(self) -> Path:
        from proxytune.backends import tiny_cache

        return tiny_cache.materialize(self.key, self.build)


class FolderChecks(Protocol):
    """What the pre-flight lends a family's `check_folder` (preflight.StudentFolderChecks implements it):
    file checks that raise the pre-flight's one-line problems, so the family's check stays torch-free and
    needs no pre-flight import."""

    def weights(self, folder: Path, what: str) -> None:
        """`folder` holds config.json and a weights file (or a shard index)."""

    def tokenizer(self, folder: Path, what: str) -> None:
        """`folder` holds tokenizer files."""

    def part(self, folder: Path, meta: Any, name: str, kind: str) -> None:
        """Part `name` ("weights" or "tokenizer" `kind`): `folder`/name, or the folder / hub id meta names."""

    def problem(self, message: str) -> Exception:
        """The pre-flight's exception for `message` (one line, starting with the file)."""

    def config(self, config: dict, label: str, meta: StudentMeta | None) -> None:
        """A config.json of this family: a dtype proxytune runs, and the record's `check_config`."""

    def cached_json(self, repo: str, name: str) -> tuple[dict | None, str]:
        """A hub repository's JSON file when the local cache holds it (never downloaded), and its label."""

    def read_json(self, path: Path) -> dict | None:
        """A local JSON object file, None when absent."""


@dataclass(frozen=True)
class StudentFamily:
    """One AR student backend.

    Attributes:
        name: what proxytune_student.json's "backend" says and records name ("llamagen").
        label: the family as users know it ("LlamaGen"), for help texts and descriptions.
        load: (path, ref, device) -> StudentBackend: a resolved folder or hub id, frozen, in eval mode.
        sampling: the sampler defaults its authors ship.
        model_types: config.json model_types that are this family (a transformers checkpoint).
        refused: config.json model_type -> why it is not loaded and the fix ({src}: the model as named).
        convert: makes the click command `proxytune convert NAME` runs (None: nothing to convert); its
            docstring is the help text.
        tiny: built-in tiny names -> how each is made.
        check_folder: (folder, meta, config, checks) -> None: the torch-free pre-flight of a local folder
            of this family, beyond detection: that the parts its loader reads are there.
        check_config: (config, meta) -> str | None: what is wrong with a config.json of this family for its
            loader (also for a cached hub id), or None.
        needs_meta: the fix text when a config.json of this family without proxytune_student.json cannot
            load ({src}: the model as named); None when it can.
        dropout: the dropout the family trains with by default, settable with `student.dropout`; None: the
            model has no dropout option (a non-zero `student.dropout` is refused).
        decoder_layers: class names of the model's repeated decoder layers; `student.sharding: fsdp` makes
            each one a shard group of its own (gathered whole only while it runs).
    """

    name: str
    label: str
    load: Callable[..., "StudentBackend"]
    sampling: SamplerDefaults
    model_types: tuple[str, ...] = ()
    refused: dict[str, str] = field(default_factory=dict)
    convert: Callable[[], "click.Command"] | None = None
    tiny: dict[str, TinyStudent] = field(default_factory=dict)
    check_folder: Callable[..., None] | None = None
    check_config: Callable[[dict, StudentMeta | None], str | None] | None = None
    needs_meta: str | None = None
    dropout: float | None = None
    decoder_layers: tuple[str, ...] = ()


_FAMILIES: dict[str, StudentFamily] = {}
_built_in_loaded = False


def _load_built_in() -> None:
    global _built_in_loaded
    if _built_in_loaded:
        return
    _built_in_loaded = True
    from proxytune.backends.students import janus, llamagen, lumina  # the one line a new family adds to

    for record in (llamagen.FAMILY, janus.FAMILY, lumina.FAMILY):
        register(record)


def register(family: StudentFamily) -> None:
    """Add a family (and its tiny built-ins to `proxytune.builtins`); a name taken by another record is an error."""
    from proxytune.builtins import BuiltinModel, register_model

    _load_built_in()
    known = _FAMILIES.get(family.name)
    if known is not None and known is not family:
        raise ValueError(f"student family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    for name, tiny in family.tiny.items():
        register_model(BuiltinModel(name=name, role="student", build=tiny.folder))


def families() -> dict[str, StudentFamily]:
    """name -> record, in registration order (the built-in three first)."""
    _load_built_in()
    return dict(_FAMILIES)


def family(name: str) -> StudentFamily:
    """The record of family `name`.

    Raises:
        ProxytuneError: no such family (the known ones listed).
    """
    known = families()
    if name not in known:
        raise ProxytuneError(f"unknown student backend {name!r} (known: {', '.join(known)})")
    return known[name]


def tiny_names() -> tuple[str, ...]:
    """Every family's built-in tiny names."""
    return tuple(name for record in families().values() for name in record.tiny)


# -- detection: the one reading of a folder's files ------------------------------------------------------
class Unrecognised(Exception):
    """A folder's files name no family proxytune loads. `file` is "meta" or "config": which file says so."""

    def __init__(self, file: str, message: str):
        super().__init__(message)
        self.file = file


def detect_files(meta: StudentMeta | None, config: dict | None, src: str) -> str | None:
    """The family named by a student's proxytune_student.json and config.json (either may be None).

    Args:
        src: the model as the user named it (for the fix text of a refused model type).
    Returns:
        the family's name, or None when there is neither file.
    Raises:
        Unrecognised: an unknown backend, a refused or unknown model type.
    """
    known = families()
    backend = meta.backend if meta is not None else None
    if backend is not None and backend not in known:
        raise Unrecognised("meta", f"unknown backend {backend!r} (known: {', '.join(known)})")
    model_type = (config or {}).get("model_type")
    for record in known.values():
        if isinstance(model_type, str) and model_type in record.refused:  # whatever a proxytune_student.json says
            raise Unrecognised("config", record.refused[model_type].format(src=src))
    if backend is not None:
        return backend
    if config is not None:
        for record in known.values():
            if model_type in record.model_types:
                return record.name
        types = ", ".join(t for record in known.values() for t in record.model_types)
        raise Unrecognised("config", f"model_type {model_type!r} is not an AR student proxytune trains ({types}), "
                                     f"and there is no {STUDENT_META} naming a backend")
    return LEGACY_FAMILY if meta is not None else None


def _read_config(path: str) -> dict | None:
    import json

    if Path(path).is_dir():
        file = Path(path) / "config.json"
        return json.loads(file.read_text()) if file.exists() else None
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(path, "config.json")).read_text())
    except Exception:  # not in the repo, or the hub is unreachable: the caller says what is missing
        return None


def _read_meta(path: str) -> StudentMeta | None:
    from proxytune.backends.students import meta as student_meta

    if Path(path).is_dir():
        return student_meta.read(path)
    try:
        return student_meta.read(path)
    except Exception:  # the hub is unreachable: the caller says what is missing
        return None


def detect(path: str, ref: str) -> str:
    """The family of the student at `path` (a resolved folder or hub id), from its files (module docstring).

    Raises:
        ProxytuneError: unreadable files, or files that name no family: one line naming `ref` and the file.
    """
    try:
        meta = _read_meta(path)
    except (OSError, ValueError) as err:  # unreadable, or not JSON: one line naming the file
        raise ProxytuneError(f"{Path(path) / STUDENT_META}: cannot read it ({err})") from None
    try:
        config = _read_config(path)
    except (OSError, ValueError) as err:
        raise ProxytuneError(f"{Path(path) / 'config.json'}: cannot read it ({err})") from None
    try:
        name = detect_files(meta, config, ref)
    except Unrecognised as err:
        where = STUDENT_META if err.file == "meta" else "config.json"
        raise ProxytuneError(f"student model {ref!r}: {where}: {err}") from None
    if name is None:
        raise ProxytuneError(f"student model {ref!r}: neither {STUDENT_META} nor config.json found: not a student checkpoint")
    return name


def resolve(ref: str) -> str:
    """A spec's student.model as a folder or hub id (a built-in name is made on first use)."""
    from proxytune import builtins
    from proxytune.backends import tiny_cache

    return tiny_cache.resolve(ref, builtins.builders("student"), what="student model")


def load_student(ref: str, *, device: str = "cpu") -> "StudentBackend":
    """Load a student (built-in name, local folder or hub id), frozen, in eval mode, by its family's loader."""
    path = resolve(ref)
    return family(detect(path, ref)).load(path, ref=ref, device=device)
