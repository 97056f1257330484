"""Model pre-flight: every model a spec names is resolved and checked before `apply` writes anything.

A stage finds out that its model is not what the spec says only once it loads it, after dvc.yaml, the
params files and the registry were written. This module looks at files only (no torch, no weights read)
and refuses, as one line naming the spec file and key:
- a local folder without the files its loader needs: a teacher's diffusers pipeline (model_index.json and
  the component folders it lists), a student of a family `backends.students` detects with the parts its
  record's `check_folder` names, a CLIP or DINO encoder (config.json and weights);
- a hub id that is neither in the local Hugging Face cache nor reachable on the hub (HF_HUB_OFFLINE set,
  no network, no such repository or file);
- a name that is no built-in of its role. Built-in names (tiny-*, toy-*) always pass;
- what a model's own config files say that its loader cannot run, read from the folder or, for a hub id, from
  the local Hugging Face cache (never downloaded): a diffusers folder named as a student or a transformers
  model named as a teacher, a pipeline class with no proxytune family, Janus-Pro as deepseek-ai releases it
  (model_type multi_modality: `proxytune convert janus`), a Lumina-mGPT release not yet converted or a
  Chameleon config whose fields `backends.lumina` cannot load, a CLIP / DINO config of another model type than
  CLIPModel / ViTModel read, and a declared dtype proxytune does not run (checks: `model_configs`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from proxytune.backends.students.meta import STUDENT_META, StudentMeta
from proxytune.model_configs import (ModelProblem, check_dtype, check_encoder_config, check_pipeline_index,
                                     check_family_config, student_backend)
from proxytune.errors import SpecError, first_line
from proxytune.spec.common import TINY_CLIP, TINY_DINO, TINY_TEACHERS, _HUB_ID

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model")
HUB_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ModelRef:
    key: str  # key path in the spec, e.g. "teacher.model"
    ref: str
    role: str  # teacher, student, clip, dino
    revision: str | None = None


BUILTINS = {"teacher": TINY_TEACHERS, "clip": TINY_CLIP, "dino": TINY_DINO}


def builtin_names(role: str) -> tuple[str, ...]:
    """The built-in names of a role (students: every family's tiny ones and the plugins', `proxytune.builtins`)."""
    if role == "student":
        from proxytune import builtins

        return builtins.model_names("student")
    return BUILTINS[role]
# Files whose presence says a hub repository holds a model of the role (any one of them will do).
HUB_FILES = {"teacher": ("model_index.json",), "student": (STUDENT_META, "config.json"), "clip": ("config.json",),
             "dino": ("config.json",)}


def model_refs(spec) -> list[ModelRef]:
    """Every model reference of a spec that a stage loads, with its key."""
    refs = [ModelRef("teacher.model", spec.teacher.model, "teacher", spec.teacher.revision),
            ModelRef("student.model", spec.student.model, "student"),
            ModelRef("evaluation.clip_model", spec.evaluation.clip_model, "clip"),
            ModelRef("evaluation.dino_model", spec.evaluation.dino_model, "dino")]
    quality = spec.synthesis.filter
    if quality.enabled:
        refs.append(ModelRef("synthesis.filter.model", quality.model, quality.metric))
    if spec.styles:  # the style students' image encoder
        refs.append(ModelRef("style_student.clip_model", spec.style_student.clip_model, "clip"))
    return refs


def check_spec_models(spec, source: str, root: Path, seen: dict | None = None) -> None:
    """Check every model reference of `spec` (see the module docstring).

    Args:
        source: the spec file as the user named it (starts the error line).
        root: the project root, which relative model paths are relative to (stages run there).
        seen: results shared between specs, so that a model is looked up once per apply.
    Raises:
        SpecError: `source: key: problem`, for the first reference that fails.
    """
    seen = {} if seen is None else seen
    for item in model_refs(spec):
        cache_key = (item.role, item.ref, item.revision)
        if cache_key not in seen:
            try:
                check_model(item.ref, item.role, root, item.revision)
                seen[cache_key] = None
            except ModelProblem as problem:
                seen[cache_key] = str(problem)
        if seen[cache_key] is not None:
            raise SpecError(f"{source}: {item.key}: {seen[cache_key]}")


def check_model(ref: str, role: str, root: Path, revision: str | None = None) -> None:
    """Raises ModelProblem when `ref` cannot be the `role` model a stage will load."""
    if ref in builtin_names(role):
        return
    local = root / Path(ref).expanduser()  # an absolute path stays itself
    if local.is_dir():
        try:
            LOCAL_CHECKS[role](local.resolve(strict=True), root)
        except ModelProblem:
            raise
        except (OSError, RuntimeError) as err:  # a folder we may not enter, a symlink loop inside
            raise ModelProblem(f"{local}: cannot read ({getattr(err, 'strerror', None) or err})") from None
        except Exception as err:  # a config field of a type no check foresaw: still one line
            raise ModelProblem(f"{local}: {_unexpected(err)}") from None
        return
    if ref.startswith(("/", ".", "~")):
        if local.is_symlink() and not local.exists():
            what = "a broken symlink or a symlink loop"
        else:
            what = "a file, not a model folder" if local.exists() else "no such folder"
            if role == "student" and local.suffix in (".pt", ".pth", ".bin", ".ckpt"):
                what += (" (an original LlamaGen checkpoint? convert it first: proxytune convert llamagen "
                         f"{ref} OUT --vq VQ.pt, and name OUT as student.model)")
        raise ModelProblem(f"{local}: {what}")
    if _HUB_ID.match(ref):
        problem = hub_problem(ref, HUB_FILES[role], revision)
        if problem:
            raise ModelProblem(f"hub id {ref!r}{f' (revision {revision})' if revision else ''} {problem}")
        try:
            HUB_CHECKS[role](ref, revision)
        except ModelProblem:
            raise
        except Exception as err:
            raise ModelProblem(f"hub id {ref!r} (local cache): {_unexpected(err)}") from None
        return
    other = sorted(r for r in (*BUILTINS, "student") if ref in builtin_names(r) and r != role)
    named = f" ({ref!r} is a {other[0]} model)" if other else ""
    raise ModelProblem(f"unknown {role} model {ref!r}{named}: use a built-in ({', '.join(builtin_names(role))}), "
                       "a local folder or a hub id 'org/name'")


def _unexpected(err: Exception) -> str:
    return f"its config files hold a field proxytune cannot read ({first_line(err)})"


# -- local folders ---------------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    """A JSON object file, None when absent; ModelProblem when unreadable or not an object."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelProblem(f"{path}: not valid JSON ({err.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ModelProblem(f"{path}: not a JSON object")
    return data


def _has_weights(folder: Path) -> bool:
    return any(p.name.endswith(WEIGHT_SUFFIXES) and p.is_file() for p in folder.iterdir())


def _check_weights_folder(folder: Path, what: str) -> None:
    """A transformers / diffusers model folder: config.json and a weights file (or a shard index)."""
    if not folder.is_dir():
        raise ModelProblem(f"{folder}: no such folder ({what})")
    if not (folder / "config.json").is_file():
        raise ModelProblem(f"{folder} has no config.json: not a {what} folder")
    _read_json(folder / "config.json")
    if not _has_weights(folder):
        raise ModelProblem(f"{folder} has config.json but no weights (*.safetensors, *.bin): not a {what} folder")


def _check_tokenizer_folder(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise ModelProblem(f"{folder}: no such folder ({what})")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelProblem(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): not a {what} folder")


def check_pipeline_folder(folder: Path, root: Path) -> None:
    """A diffusers pipeline: model_index.json and every component folder it lists, each with its files."""
    index = _read_json(folder / "model_index.json")
    if index is None:
        raise ModelProblem(f"{folder} has no model_index.json: not a diffusers pipeline folder{_what_it_is(folder)} "
                           "(save one with `pipeline.save_pretrained`)")
    check_pipeline_index(index, str(folder / "model_index.json"))
    for name, value in sorted(index.items()):
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or None in value:
            continue  # metadata, or an optional component the pipeline goes without
        part = folder / name
        if not part.is_dir() or not any(part.iterdir()):
            raise ModelProblem(f"{folder}: model_index.json lists {name} ({value[1]}) but {name}/ is missing or empty")
        if (part / "config.json").is_file() and not _has_weights(part):
            raise ModelProblem(f"{part} has config.json but no weights (*.safetensors, *.bin)")
        config = _read_json(part / "config.json")
        if config is not None:
            check_dtype(config, str(part / "config.json"))


def _what_it_is(folder: Path) -> str:
    """What a folder without model_index.json holds instead, when its files say (for the teacher's error)."""
    if (folder / STUDENT_META).is_file():
        return f" ({STUDENT_META}: an AR student, name it as student.model)"
    config = _read_json(folder / "config.json")
    if config is not None and config.get("model_type"):
        return f" (config.json: a transformers {config['model_type']!r} model, not a text-to-image pipeline)"
    return ""


def _check_part(folder: Path, meta: dict, name: str, kind: str, root: Path) -> None:
    """A part of a llamagen student: its subfolder, or the folder / hub id proxytune_student.json names."""
    source = meta.get(name)
    if source is None:
        target = folder / name
    else:
        if not isinstance(source, str) or not source:
            raise ModelProblem(f"{folder / STUDENT_META}: {name} must be a folder or hub id, not {source!r}")
        target = folder / source
        if not target.is_dir():
            target = Path(source).expanduser()
            if not target.is_absolute() and _HUB_ID.match(source):
                files = ("config.json",) if kind == "weights" else ("tokenizer_config.json", "tokenizer.json")
                problem = hub_problem(source, files, None)
                if problem:
                    raise ModelProblem(f"{folder / STUDENT_META}: {name}: hub id {source!r} {problem}")
                return
    what = f"student {name}"
    if kind == "weights":
        _check_weights_folder(target, what)
    else:
        _check_tokenizer_folder(target, what)


def _read_meta(path: Path) -> StudentMeta | None:
    data = _read_json(path)
    return None if data is None else StudentMeta.parse(data)


class StudentFolderChecks:
    """The file checks a student family's `check_folder` uses (`students.FolderChecks`)."""

    def __init__(self, root: Path, record):
        self.root, self.record = root, record

    def weights(self, folder: Path, what: str) -> None:
        _check_weights_folder(folder, what)

    def tokenizer(self, folder: Path, what: str) -> None:
        _check_tokenizer_folder(folder, what)

    def part(self, folder: Path, meta, name: str, kind: str) -> None:
        _check_part(folder, meta, name, kind, self.root)

    def problem(self, message: str) -> Exception:
        return ModelProblem(message)

    def config(self, config: dict, label: str, meta: StudentMeta | None) -> None:
        check_dtype(config, label)
        check_family_config(self.record, config, label, meta)

    def cached_json(self, repo: str, name: str) -> tuple[dict | None, str]:
        return _cached_json(repo, name, None)

    def read_json(self, path: Path) -> dict | None:
        return _read_json(path)


def check_student_folder(folder: Path, root: Path) -> None:
    """A student folder of a family `backends.students.detect` recognises, with the parts its loader reads
    (the family's `check_folder`)."""
    from proxytune.backends import students

    meta = _read_meta(folder / STUDENT_META)
    config = _read_json(folder / "config.json")
    if meta is None and config is None and (folder / "model_index.json").is_file():
        raise ModelProblem(f"{folder / 'model_index.json'}: a diffusers pipeline (a teacher), not an AR student: "
                           "name it as teacher.model")
    backend = student_backend(meta, config, str(folder), str(folder / STUDENT_META), str(folder / "config.json"))
    if backend is None:
        raise ModelProblem(f"{folder} has neither {STUDENT_META} nor config.json: not a student model folder")
    record = students.family(backend)
    if record.check_folder is not None:
        record.check_folder(folder, meta or StudentMeta(), config, StudentFolderChecks(root, record))


def check_clip_folder(folder: Path, root: Path) -> None:
    _check_weights_folder(folder, "transformers encoder")
    check_encoder_config(_read_json(folder / "config.json") or {}, str(folder / "config.json"), "clip")


def check_dino_folder(folder: Path, root: Path) -> None:
    _check_weights_folder(folder, "transformers encoder")
    check_encoder_config(_read_json(folder / "config.json") or {}, str(folder / "config.json"), "dino")


LOCAL_CHECKS = {"teacher": check_pipeline_folder, "student": check_student_folder, "clip": check_clip_folder,
                "dino": check_dino_folder}


# -- hub ids: what the local cache holds (never downloaded) ------------------------------------------
def _cached_json(repo: str, name: str, revision: str | None) -> tuple[dict | None, str]:
    """A hub repository's JSON file when the local cache holds it (else None), and how to name it in an error."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of diffusers and transformers
        return None, name
    if not _HUB_ID.match(repo):
        return None, name
    path = try_to_load_from_cache(repo, name, cache_dir=hub_cache_dir(), revision=revision)
    label = f"hub id {repo!r}: {name} (cached at {path})"
    if not isinstance(path, str):
        return None, label
    try:
        return _read_json(Path(path)), label
    except ModelProblem as problem:
        raise ModelProblem(f"hub id {repo!r}: {problem}") from None


def check_hub_teacher(repo: str, revision: str | None) -> None:
    index, label = _cached_json(repo, "model_index.json", revision)
    if index is not None:
        check_pipeline_index(index, label)


def check_hub_student(repo: str, revision: str | None) -> None:
    meta_data, meta_label = _cached_json(repo, STUDENT_META, revision)
    meta = None if meta_data is None else StudentMeta.parse(meta_data)
    config, config_label = _cached_json(repo, "config.json", revision)
    if meta is None and config is None:
        if _cached_json(repo, "model_index.json", revision)[0] is not None:
            raise ModelProblem(f"hub id {repo!r}: model_index.json: a diffusers pipeline (a teacher), not an AR student: "
                               "name it as teacher.model")
        return  # reachable on the hub but not cached: the stage downloads and checks it
    if config is not None and meta is None and config.get("_class_name"):
        raise ModelProblem(f"{config_label}: a diffusers model, not an AR student")
    student_backend(meta, config, repo, meta_label, config_label)


def _hub_encoder_check(role: str):
    def check(repo: str, revision: str | None) -> None:
        config, label = _cached_json(repo, "config.json", revision)
        if config is not None:
            check_encoder_config(config, label, role)

    return check


HUB_CHECKS = {"teacher": check_hub_teacher, "student": check_hub_student, "clip": _hub_encoder_check("clip"),
              "dino": _hub_encoder_check("dino")}


# -- hub ids ---------------------------------------------------------------------------------------
def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> str:
    """The Hugging Face hub cache, as the stage processes will see it (read from the environment now)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hub_problem(repo: str, files: tuple[str, ...], revision: str | None) -> str | None:
    """None when one of `files` of hub repository `repo` is in the local cache or can be fetched; else why not.

    The hub is asked (one HEAD request per file, HUB_TIMEOUT_S each) only when the cache has none of them and
    HF_HUB_OFFLINE is not set.
    """
    try:
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
        from huggingface_hub import errors as hub_errors
    except ImportError:  # pragma: no cover - a dependency of diffusers and transformers
        return None
    cache = hub_cache_dir()
    for name in files:
        if isinstance(try_to_load_from_cache(repo, name, cache_dir=cache, revision=revision), str):
            return None
    wanted = " or ".join(files)
    offline = _env_flag("HF_HUB_OFFLINE") if "HF_HUB_OFFLINE" in os.environ else constants.HF_HUB_OFFLINE
    if offline:
        return f"is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: download it first"
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    for name in files:
        try:
            url = hf_hub_url(repo, name, revision=revision, endpoint=endpoint)
            get_hf_file_metadata(url, timeout=HUB_TIMEOUT_S, endpoint=endpoint)
            return None
        except hub_errors.GatedRepoError:
            return "is gated: accept its licence on the hub and log in (`hf auth login`)"
        except hub_errors.RepositoryNotFoundError:
            return f"was not found on {endpoint} (no such repository, or a private one: log in with `hf auth login`)"
        except hub_errors.RevisionNotFoundError:
            return f"has no revision {revision!r} on {endpoint}"
        except hub_errors.EntryNotFoundError:
            continue  # try the next file
        except Exception as err:  # no network, DNS, proxy, timeout, server error
            reason = err.__class__.__name__
            return (f"is not in the local Hugging Face cache ({cache}) and {endpoint} cannot be reached ({reason}): "
                    "download it first, or check the network")
    return f"has no {wanted} on {endpoint}"
