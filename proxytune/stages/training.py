"""What the training stages (teacher, student, style student) share, on top of accelerate: the
accelerator with its precision, the prepared model and optimiser, custom checkpoint state (step,
curves, per-process generators), crash-safe checkpoints and resume, and the curves file.

The stage modules keep one readable training loop each (a `...Trainer` class with setup, train_step,
train and save); what they would otherwise repeat lives here as small functions, not a base class.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from proxytune import layout
from proxytune.files import write_text_atomic
from proxytune.stages.runtime import device

TRAINED_WEIGHTS = "trained.safetensors"  # a checkpoint's trained weights (the rest is accelerate's layout)
CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # checkpoint-STEP folders in a trainer's work folder


def dtype_of(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


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
    # a stage builds one, but a process that runs several trainers (tests, notebooks) builds one each.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    acc = Accelerator(mixed_precision=mixed_precision, cpu=device().type == "cpu")
    if mixed_precision == "fp16" and acc.scaler is None and acc.device.type == "cpu":
        acc.scaler = torch.amp.GradScaler("cpu")
        acc.native_amp = True  # so clip_grad_norm_ unscales the gradients first
    return acc


class TrainingForward(torch.nn.Module):
    """The modules a trainer trains, as one module whose forward runs one of its micro-batches.

    This is what a trainer gives `accelerator.prepare`. Over several processes accelerate wraps it in
    DDP, which averages gradients only for a forward that goes through its wrapper; the trainers reach
    their models through a diffusers pipeline or a student backend instead of one module's forward. So
    `model(self._micro_batch_loss)` runs that method inside the wrapper (and inside accelerate's
    autocast, under mixed precision): the backward that follows leaves every process the mean gradient.
    """

    def __init__(self, **trained: torch.nn.Module):
        super().__init__()
        self.trained = torch.nn.ModuleDict(trained)  # registered, so DDP finds their trainable parameters

    def forward(self, micro_batch: Callable[[], Any]) -> Any:
        return micro_batch()


def adamw(groups, **settings) -> torch.optim.AdamW:
    """torch's AdamW over `groups` (parameters or parameter groups; `settings` as AdamW takes them), fused
    where every parameter is a CPU or CUDA float tensor: one kernel then updates every tensor, where
    the default on CPU is a Python loop of about a dozen small ops per tensor (LlamaGen's own
    train_t2i.py asks for fused=True as well). Same update up to float rounding."""
    groups = list(groups)
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, fused=fused or None, **settings)


COMPILE_BACKEND = "inductor"  # torch.compile's default; tests may swap in "aot_eager" (no code generation)


def compiled(fn: Callable) -> Callable:
    """`fn` (a trainer's forward and loss) through `torch.compile` with static shapes.

    A trainer's micro-batches all have one shape (batch size, sequence length, caption slots), so
    `dynamic=False` compiles once and never for a shape again. The modules are not wrapped (the function
    is), so their state dicts, peft's adapter saving and eager sampling see the plain modules; a
    checkpoint written with compile on resumes with it off and the other way round.
    """
    return torch.compile(fn, dynamic=False, backend=COMPILE_BACKEND)


def prepare_training(acc, trained: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, *,
                     weights: Callable[[], dict[str, torch.Tensor]],
                     load_weights: Callable[[dict[str, torch.Tensor]], None]):
    """`accelerator.prepare` of a trainer's trained modules (as a `TrainingForward`) and optimiser.

    The prepared optimiser steps through the GradScaler under fp16 (and skips a step whose gradients
    overflowed). `save_state` then writes only `weights()` (LoRA, resampler, or a full fine-tune's
    weights) as one safetensors file instead of the prepared module's whole state dict, frozen base
    model included; `load_state` gives that file to `load_weights`.

    Returns:
        (prepared module, prepared optimiser).
    """
    from safetensors.torch import load_file, save_file

    def save_hook(models, state_dicts, output_dir):
        state_dicts.clear()  # accelerate writes no model file of its own
        if acc.is_main_process:
            save_file({k: v.detach().cpu().contiguous() for k, v in weights().items()}, Path(output_dir) / TRAINED_WEIGHTS)

    def load_hook(models, input_dir):
        models.clear()  # accelerate loads nothing into the prepared module itself
        load_weights(load_file(Path(input_dir) / TRAINED_WEIGHTS))

    acc.register_save_state_pre_hook(save_hook)
    acc.register_load_state_pre_hook(load_hook)
    return acc.prepare(TrainingForward(**trained), optimizer)


@dataclass
class TrainingProgress:
    """What a resumed run needs beyond weights, optimiser and RNGs: optimiser updates done and the
    per-step curves. Custom state for `accelerator.register_for_checkpointing`."""

    series: dict[str, list[float]]
    step: int = 0

    @classmethod
    def of(cls, names: tuple[str, ...]) -> TrainingProgress:
        return cls({name: [] for name in names})

    @property
    def losses(self) -> list[float]:
        return self.series["loss"]

    def record(self, values: dict[str, float]) -> None:
        """One optimiser update done, with its value of every series."""
        self.step += 1
        for name, curve in self.series.items():
            curve.append(values[name])

    def state_dict(self) -> dict:
        return {"step": self.step, "series": self.series}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.series = {name: list(state["series"].get(name, [])) for name in self.series}


class ProcessGenerators:
    """Every process's data/noise generator, as custom state for `accelerator.register_for_checkpointing`.

    accelerate checkpoints the global RNGs of each process but not a trainer's own `torch.Generator`:
    `state_dict` gathers every process's (every process calls it inside `save_state`; the main one
    writes), `load_state_dict` gives each process its own back.
    """

    def __init__(self, acc, generator: torch.Generator):
        self.acc, self.generator = acc, generator

    def state_dict(self) -> dict:
        from accelerate.utils import gather

        state = self.generator.get_state()  # uint8, the same length in every process
        states = gather(state.to(self.acc.device)).cpu() if self.acc.num_processes > 1 else state
        return {"states": states.view(self.acc.num_processes, -1)}  # (processes, state bytes), by rank

    def load_state_dict(self, state: dict) -> None:
        from proxytune.errors import ProxytuneError

        saved = len(state["states"])
        if saved != self.acc.num_processes:
            raise ProxytuneError(f"written by {saved} processes and this run has {self.acc.num_processes} "
                                 f"(run with as many)")
        self.generator.set_state(state["states"][self.acc.process_index].clone())


def resume_training(acc, folder: Path, stage: str, series: tuple[str, ...], generator: torch.Generator,
                    *state) -> TrainingProgress:
    """Register a trainer's custom checkpoint state (step and curves, every process's `generator`, and
    any `state` such as an LR scheduler), then restore the newest checkpoint in `folder`, if any.

    Returns:
        The progress: step 0 with empty curves, or where the checkpoint left off.
    """
    progress = TrainingProgress.of(series)
    acc.register_for_checkpointing(progress, ProcessGenerators(acc, generator), *state)
    if load_state(acc, folder, stage):
        tqdm.write(f"{stage}: resuming from step {progress.step} ({folder})")
    return progress


def save_state(acc, folder: Path, step: int) -> Path:
    """`accelerator.save_state` into `folder/checkpoint-STEP`, crash-safe; every process calls it.

    Every process writes into a staging folder; once all are done the main process renames it into
    place and then deletes the older checkpoints. A run killed while writing leaves only the staging
    folder, which is never loaded (and is deleted by the next save).
    """
    import shutil

    final, staging = folder / f"checkpoint-{step}", folder / f".checkpoint-{step}.partial"
    if acc.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(staging))
    acc.wait_for_everyone()  # every process's files (its RNG states) are in
    if acc.is_main_process:
        if final.exists():  # this step saved again: the older copy goes aside first
            final.rename(folder / f".checkpoint-{step}.replaced")
        staging.rename(final)
        # then the older checkpoints and what killed saves left (every dot folder: the staging one is renamed)
        for old in [*(p for p in _checkpoints(folder) if p != final), *folder.glob(".checkpoint-*")]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load_state(acc, folder: Path, stage: str) -> Path | None:
    """Restore the newest checkpoint in `folder` with `accelerator.load_state`: trained weights (through
    `prepare_training`'s hook), optimiser, fp16 loss scale, every process's global RNGs and the
    registered custom state. Returns the checkpoint, or None when there is none (training starts at 0).

    Raises:
        ProxytuneError: the checkpoint cannot be restored (another number of processes, or unreadable).
    """
    from proxytune.errors import ProxytuneError

    found = _checkpoints(folder)
    if not found:
        if (folder / "state.pt").exists():  # written before checkpoints were accelerate's
            tqdm.write(f"{stage}: {folder} holds a checkpoint in an older layout (state.pt); not resumed, "
                       f"training starts over")
        return None
    try:
        acc.load_state(str(found[-1]))
    except Exception as err:
        reason = err if isinstance(err, ProxytuneError) else f"cannot resume from it ({type(err).__name__}: {err})"
        raise ProxytuneError(f"{found[-1]}: {reason}; delete the folder to start over") from None
    return found[-1]


def _checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoint folders in `folder`, oldest first."""
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and CHECKPOINT.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT.fullmatch(p.name).group(1)))


def write_curves(folder: Path, series: dict[str, list[float]]) -> None:
    """Write `folder/loss.csv`: a `step` column (0-based, as logged to MLflow) and one column per series
    that has a value for every step (a series a run did not compute, e.g. prior_loss without prior
    preservation, stays empty and is left out)."""
    steps = max((len(values) for values in series.values()), default=0)
    columns = [name for name, values in series.items() if len(values) == steps]
    lines = [",".join(["step", *columns])]
    lines += [",".join([str(i), *(repr(float(series[name][i])) for name in columns)]) for i in range(steps)]
    write_text_atomic(folder / layout.CURVES_FILE, "\n".join(lines) + "\n")
