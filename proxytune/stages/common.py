"""Helpers every stage uses: device choice, seeding, the stage record, the tracking run.

Stages import this module and the backends; never each other.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from proxytune import compile as compiler
from proxytune import tracking
from proxytune.files import sha256_file, write_bytes_atomic, write_json_atomic
from proxytune.stages.params import StageParams

RECORD = "record.json"
CODES_FILE = "codes.safetensors"  # the codes stage's output, the student stage's input


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dtype_of(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch globally (accelerate's `set_seed`, for library internals), ask torch
    for deterministic kernels where it has them, and return the stage's own generator."""
    from accelerate.utils import set_seed

    set_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator("cpu").manual_seed(seed)


def accelerator(mixed_precision: str):
    """The stage's `accelerate.Accelerator`: process group (when `accelerate launch` started several,
    gloo on CPU), mixed precision and, for fp16, the GradScaler that `accelerator.backward`,
    `accelerator.clip_grad_norm_` and the prepared optimizer use.

    accelerate makes no GradScaler for fp16 on CPU (torch autocasts to fp16 there all the same), so one
    is supplied: fp16 training then scales its loss on every device, and CPU tests exercise that path.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps its state per process and refuses a second Accelerator with another precision;
    # a stage builds one, but a process that runs several recipes (tests, notebooks) builds one each.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    acc = Accelerator(mixed_precision=mixed_precision, cpu=device().type == "cpu")
    if mixed_precision == "fp16" and acc.scaler is None and acc.device.type == "cpu":
        acc.scaler = torch.amp.GradScaler("cpu")
        acc.native_amp = True  # so clip_grad_norm_ unscales the gradients first
    return acc


def mean_gradients(acc, parameters: list[torch.nn.Parameter]) -> None:
    """All-reduce the gradients to their mean over processes (one flat buffer, one collective).

    The denoiser is called through its pipeline rather than a DDP wrapper, so the recipes average
    their (few, LoRA) gradients themselves, with accelerate's `reduce`."""
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = acc.reduce(torch.cat([g.reshape(-1) for g in grads]), "mean")
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def gather_states(acc, state: torch.Tensor) -> list[torch.Tensor]:
    """Every process's RNG state (a uint8 tensor), rank-ordered, for a checkpoint that resumes them all."""
    if acc.num_processes == 1:
        return [state]
    from accelerate.utils import gather

    return list(gather(state.to(acc.device)).cpu().view(acc.num_processes, -1))


def training_state(acc, optimizer, generator: torch.Generator, step: int, series: dict[str, list[float]],
                   lr_scheduler=None) -> dict:
    """The state a resumed run needs beside the weights: optimiser, LR schedule, fp16 loss scale, every
    process's data/noise generator (rank-ordered), step and curves. Every process must call it (the
    generators are gathered); only the main one writes it (`save_checkpoint`)."""
    return {
        "optimizer": optimizer.state_dict(),
        **({"lr_scheduler": lr_scheduler.state_dict()} if lr_scheduler is not None else {}),
        "scaler": acc.scaler.state_dict() if acc.scaler is not None else {},
        "generators": gather_states(acc, generator.get_state()),
        "step": step,
        "series": series,
    }


def restore_training_state(acc, state: dict, optimizer, generator: torch.Generator, lr_scheduler=None) -> None:
    """Load what `training_state` saved into this process's optimiser, schedule, scaler and generator
    (a checkpoint without a loss scale, from a run without fp16, leaves the scaler at its start)."""
    optimizer.load_state_dict(state["optimizer"])
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    if acc.scaler is not None and state.get("scaler"):
        acc.scaler.load_state_dict(state["scaler"])
    generator.set_state(state["generators"][acc.process_index])


def base_model_tags(ref: str) -> dict[str, str]:
    """How a stage records its base model: the spec's reference and, for a toy world built-in (whose
    weights ship with the package), the digest of those weights from the package manifest."""
    from proxytune.toyworld.builtins import SOURCES, manifest

    entry = manifest().get(ref) if ref in SOURCES else None
    return {"base_model": ref, **({"base_model_digest": entry["digest"]} if entry else {})}


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


CURVES_FILE = compiler.CURVES_FILE  # step-by-step training curves in a stage's output: DVC plots read them


def write_curves(folder: Path, series: dict[str, list[float]]) -> None:
    """Write `folder/loss.csv`: a `step` column (0-based, as logged to MLflow) and one column per series
    that has a value for every step (a series a run did not compute, e.g. prior_loss without prior
    preservation, stays empty and is left out)."""
    from proxytune.files import write_text_atomic

    steps = max((len(values) for values in series.values()), default=0)
    columns = [name for name, values in series.items() if len(values) == steps]
    lines = [",".join(["step", *columns])]
    lines += [",".join([str(i), *(repr(float(series[name][i])) for name in columns)]) for i in range(steps)]
    write_text_atomic(folder / CURVES_FILE, "\n".join(lines) + "\n")


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
    joint = bool(params.members)  # a multi-subject student: named by its folder, not its first subject
    subject = params.subject_dir.name if joint else params.subject.name
    tags = {
        "spec_file": params.source.spec_file,
        "spec_digest": params.source.spec_digest,
        "dvc_stage": f"student-joint.{params.experiment}" if joint else f"{stage}@{params.experiment}.{subject}",
        "project_root": str(root),
        **(tags or {}),
    }
    return tracking.StageRun(
        experiment=params.experiment,
        subject=subject,
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


def load_codes(folder: Path, *, model: str, proxy_digest: str) -> dict[str, torch.Tensor]:
    """The codes stage's tensors, checked against the model and proxy set the caller trains on.

    Raises:
        ProxytuneError: missing, or made for another model or proxy set (re-run `proxytune apply`).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from proxytune.errors import ProxytuneError

    path = folder / CODES_FILE
    if not path.exists():
        raise ProxytuneError(f"{path}: missing (run the codes stage first: proxytune apply)")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("model") != model or meta.get("proxy_digest") != proxy_digest:
        raise ProxytuneError(f"{path}: made for model {meta.get('model')!r} and another proxy set; re-run `proxytune apply`")
    return load_file(path)
