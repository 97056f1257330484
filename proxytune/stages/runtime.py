"""What every stage needs while it runs: the device, seeding, cache keys, how it names its base model,
and its tracked (MLflow) run with the tags that tie it to the spec and the DVC stage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from proxytune import layout
from proxytune.tracking import runs, store
from proxytune.stages.params import StageParams


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


GENERATION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def generation_dtype(choice: str) -> torch.dtype:
    """`synthesis.dtype` as a torch dtype: "auto" is bfloat16 on a CUDA GPU that supports it, else float32."""
    if choice == "auto":
        cuda = device().type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return GENERATION_DTYPES[choice]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch globally (accelerate's `set_seed`, for library internals), ask torch
    for deterministic kernels where it has them, and return the stage's own generator."""
    from accelerate.utils import set_seed

    set_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills every new tensor from torch.empty with NaN (a guard against reading
    # memory a kernel never wrote). It is not what makes results repeatable (the same-seed, same-artifacts
    # tests hold without it), and issue 27 measured it at about 1% of a student step and 2-5% of
    # synthesis (within the noise at benchmarks/'s tiny sizes).
    torch.utils.deterministic.fill_uninitialized_memory = False
    return torch.Generator("cpu").manual_seed(seed)


def base_model_tags(ref: str) -> dict[str, str]:
    """How a stage records its base model: the spec's reference and, for a built-in with shipped weights
    (the toy world's), the digest of those weights as its provider registered it (proxytune.builtins)."""
    from proxytune import builtins

    model = builtins.model(ref)
    digest = model.digest() if model is not None and model.digest is not None else None
    return {"base_model": ref, **({"base_model_digest": digest} if digest else {})}


def config_key(*parts: object) -> str:
    """A short digest of everything a checkpoint depends on, so a changed config never resumes it."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def remove_stale_staging(params: StageParams, stage: str) -> None:
    """Delete staging folders that a killed run of this stage left beside its output (never resumed)."""
    import shutil

    for leftover in params.subject_dir.glob(f".{layout.OUT_DIRS[stage]}.staging-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def stage_run(params: StageParams, stage: str, tags: dict[str, str] | None = None) -> runs.StageRun:
    root = Path.cwd()
    remove_stale_staging(params, stage)  # called right before the stage stages its output
    uri = store.resolve_uri(params.tracking.uri, root)
    joint = bool(params.joint_subjects)  # a joint student: named by its folder, not its first subject
    subject = params.subject_dir.name if joint else params.subject.name
    tags = {
        "spec_file": params.source.spec_file,
        "spec_digest": params.source.spec_digest,
        "dvc_stage": layout.joint_stage_name(params.experiment) if joint else layout.stage_name(
            stage if params.grow is None else layout.grow_group(stage, params.grow.index), params.experiment, subject),
        "project_root": str(root),
        **(tags or {}),
    }
    return runs.StageRun(
        experiment=params.experiment,
        subject=subject,
        stage=stage,
        uri=uri,
        root=root,
        tags=tags,
        mlflow_experiment=params.tracking.experiment,
    )
