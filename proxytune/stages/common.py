"""Helpers every stage uses: device choice, seeding, the stage record, the tracking run.

Stages import this module and the backends; never each other.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from proxytune import tracking
from proxytune.files import sha256_file, write_bytes_atomic, write_json_atomic
from proxytune.stages.params import StageParams

RECORD = "record.json"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dtype_of(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch globally (for library internals) and return the stage's own generator."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator("cpu").manual_seed(seed)


def config_key(*parts: object) -> str:
    """A short digest of everything a checkpoint depends on, so a changed config never resumes it."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_record(folder: Path) -> dict:
    path = folder / RECORD
    if not path.exists():
        from proxytune.errors import ProxytuneError

        raise ProxytuneError(f"{path}: missing upstream record (run the upstream stage first)")
    return json.loads(path.read_text())


def write_record(folder: Path, record: dict) -> None:
    write_json_atomic(folder / RECORD, record)


def file_digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def remove_stale_staging(params: StageParams, stage: str) -> None:
    """Delete staging folders that a killed run of this stage left beside its output (never resumed)."""
    import shutil

    from proxytune.compile import OUT_DIRS

    for leftover in params.subject_dir.glob(f".{OUT_DIRS[stage]}.staging-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def stage_run(params: StageParams, stage: str, tags: dict[str, str] | None = None) -> tracking.StageRun:
    root = Path.cwd()
    remove_stale_staging(params, stage)  # called right before the stage stages its output
    uri = tracking.resolve_uri(params.tracking.uri, root)
    tags = {
        "spec_file": params.source.spec_file,
        "spec_digest": params.source.spec_digest,
        "dvc_stage": f"{stage}@{params.experiment}.{params.subject.name}",
        "project_root": str(root),
        **(tags or {}),
    }
    return tracking.StageRun(
        experiment=params.experiment,
        subject=params.subject.name,
        stage=stage,
        uri=uri,
        root=root,
        tags=tags,
        mlflow_experiment=params.tracking.experiment,
    )


def save_checkpoint(folder: Path, lora: dict[str, torch.Tensor], state: dict) -> None:
    """Write a resumable checkpoint: LoRA weights (safetensors), then the training state.

    Each file is written atomically, weights first, so a state file always sits next to weights at
    least as new. `state` holds only tensors, numbers, lists and dicts (optimizer and scheduler
    state dicts, RNG state, step) so it loads with `torch.load(weights_only=True)`.
    """
    import io

    from safetensors.torch import save

    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(folder / "lora.safetensors", save({k: v.detach().cpu().contiguous() for k, v in lora.items()}))
    write_bytes_atomic(folder / "state.pt", buffer.getvalue())


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The (LoRA weights, training state) of `save_checkpoint`, or None when there is none."""
    if not (folder / "state.pt").exists():
        return None
    from safetensors.torch import load_file

    return load_file(folder / "lora.safetensors"), torch.load(folder / "state.pt", weights_only=True)
