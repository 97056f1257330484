"""The shipped toy-world models and the built-in names that resolve to them.

`proxytune toyworld pretrain` writes full-precision folders; `export` stores them in the package
(proxytune/toyworld/weights/NAME/, float tensors as fp16, the pretraining record beside them) with
a manifest of digests. A built-in name (toy-sd, toy-llamagen, toy-clip, toy-dino) resolves to a
float32 copy of the shipped folder in the model cache, keyed by its digest, which loads through
the same `from_pretrained` calls as a hub checkpoint. The copy carries TOY_MARKER, so reports say
"toy world" where tiny models say "random init".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from proxytune.builtins import WORLD_MARKER
from proxytune.backends import tiny_cache
from proxytune.errors import ProxytuneError

WEIGHTS = Path(__file__).parent / "weights"
MANIFEST = "manifest.json"
TOY_MARKER = WORLD_MARKER  # proxytune.builtins.from_world reads it
TRAINING_RECORD = "training.json"

# built-in name -> folder of the pretraining output it is exported from
SOURCES = {"toy-sd": "sd", "toy-llamagen": "llamagen", "toy-clip": "clip", "toy-dino": "dino", "toy-oracle": "oracle"}


def manifest() -> dict:
    path = WEIGHTS / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}


def shipped(name: str) -> Path:
    """The packaged folder of a toy model.

    Raises:
        ProxytuneError: the package holds no weights for it (run `proxytune toyworld pretrain` and
            `proxytune toyworld export`).
    """
    entry = manifest().get(name)
    if entry is None or not (WEIGHTS / name).is_dir():
        raise ProxytuneError(f"toy model {name!r}: no weights in {WEIGHTS} (run `proxytune toyworld pretrain --out DIR` "
                             "then `proxytune toyworld export DIR`)")
    return WEIGHTS / name


def _copy_fp32(source: Path, target: Path) -> None:
    """Copy a folder, rewriting every safetensors file with floating tensors in float32."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if path.is_dir():
            (target / rel).mkdir(parents=True, exist_ok=True)
            continue
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata()
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
            tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
            save_file(tensors, target / rel, metadata=metadata)
        else:
            shutil.copy2(path, target / rel)


def materialize(name: str) -> Path:
    """The cache folder (float32) of a shipped toy model, made on first use."""
    entry = manifest().get(name)
    source = shipped(name)
    key = f"{name}-{entry['digest'][:16]}"

    def build(folder: Path) -> None:
        _copy_fp32(source, folder)
        (folder / TOY_MARKER).write_text(json.dumps({"name": name, "toy_world": True, "digest": entry["digest"]}) + "\n")

    return tiny_cache.materialize(key, build, random_init=False)


def builtin(name: str):
    """The folder maker of a toy model, as plugin.py registers it in proxytune.builtins."""
    return lambda: materialize(name)


def oracle_folder() -> Path:
    return materialize("toy-oracle")


# -----------------------------------------------------------------------------
# export


def export(pretrained: Path, dest: Path = WEIGHTS, only: list[str] | None = None) -> dict:
    """Store the finished models of a pretraining folder as the package's toy weights (fp16).

    Models not finished there (or not in `only`, built-in names) keep what the package has, or
    stay absent: their names then say "no weights" when used. Returns the new manifest.

    Raises:
        ProxytuneError: no model of SOURCES (of `only`) is finished in `pretrained`; `only` names
            an unknown model.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from proxytune.files import digest_dir, staged_dir

    pretrained = Path(pretrained)
    unknown = sorted(set(only or ()) - set(SOURCES))
    if unknown:
        raise ProxytuneError(f"--only {unknown[0]!r}: not a toy model ({', '.join(SOURCES)})")
    finished = {name: src for name, src in SOURCES.items()
                if (pretrained / src / "done.json").exists() and (only is None or name in only)}
    if not finished:
        raise ProxytuneError(f"{pretrained}: no finished model to export ({', '.join(SOURCES.values())})")
    config = json.loads((pretrained / "config.json").read_text())
    entries = {k: v for k, v in manifest().items() if k in SOURCES and k not in finished and (dest / k).is_dir()}
    for name, src in finished.items():
        with staged_dir(dest / name) as tmp:
            for path in sorted((pretrained / src).rglob("*")):
                rel = path.relative_to(pretrained / src)
                if path.is_dir():
                    continue
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                if path.name == "done.json":
                    shutil.copy2(path, tmp / TRAINING_RECORD)
                elif path.suffix == ".safetensors":
                    with safe_open(str(path), framework="pt") as handle:
                        metadata = handle.metadata()
                        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
                    half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}
                    save_file(half, tmp / rel, metadata=metadata)
                else:
                    shutil.copy2(path, tmp / rel)
        size = sum(p.stat().st_size for p in (dest / name).rglob("*") if p.is_file())
        entries[name] = {"digest": digest_dir(dest / name), "bytes": size, "source": src}
    data = {**entries, "_pretrain_config": config}
    (dest / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data
