"""Sharded training (`student.sharding: fsdp`): the trained model's weights, gradients and AdamW state
split over the stage's processes with torch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

Why torch's FSDP2 directly and not accelerate's `FullyShardedDataParallelPlugin`: accelerate 1.15 turns
FSDP on only for GPU-type process groups; with CPU processes (gloo) it keeps `MULTI_CPU` and would wrap
the model in DDP, so the CPU tests could not run the sharded path at all. With `fully_shard` called here
one code path runs on CPU (gloo) and on GPUs (NCCL); the stage's `Accelerator` still sets up the process
group, the device, autocast and the checkpoint folders.

What every process holds: 1/N of every parameter (a DTensor sharded on dim 0), of its gradient (FSDP2
reduce-scatters them in the backward) and of the optimiser's states; each decoder layer is all-gathered
whole only while it runs, the rest of the model (embeddings, head, norms) for the whole micro-batch.

Checkpoints stay as unsharded ones are: the trained weights gathered to the main process and written as
one safetensors file, the optimiser's state gathered likewise (full, by parameter name), so a resumed run
and the saved student read whole tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch


def shard(root: torch.nn.Module, layer_classes: Iterable[str]) -> torch.nn.Module:
    """`fully_shard` every module of `root` whose class is named in `layer_classes`, then `root` itself
    (which then owns the parameters outside those layers). Returns `root`, now an FSDP module.

    Raises:
        ProxytuneError: `root` has no module of those classes (the family's record names none that exists).
    """
    from torch.distributed.fsdp import fully_shard

    names = set(layer_classes)
    layers = [m for m in root.modules() if type(m).__name__ in names]
    if not layers:
        from proxytune.errors import ProxytuneError

        found = sorted({type(m).__name__ for m in root.modules() if "Layer" in type(m).__name__})
        raise ProxytuneError(f"student.sharding: no decoder layer of class {sorted(names)} in the model "
                             f"(it has {found or 'none'}); the family's record must name its layer class")
    for layer in layers:
        fully_shard(layer)
    fully_shard(root)
    return root


def full_state(state: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """`state` with every sharded tensor gathered whole, on the host, where `keep` (the main process);
    an empty dict elsewhere. Every process must call it (each gather is collective), in the same order.

    One tensor is gathered at a time and moved to the host before the next, so the device holds one
    whole tensor beyond its shards.
    """
    from torch.distributed.tensor import DTensor

    out = {}
    for key, value in state.items():
        whole = value.full_tensor() if isinstance(value, DTensor) else value
        if keep:
            out[key] = whole.detach().cpu().contiguous()
        del whole
    return out


def distribute_like(full: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors `full` cut as the sharded tensors of `like` (the same keys) are: what a sharded
    model's `load_state_dict` takes. Every process must call it (collective)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = {}
    for key, value in full.items():
        target = like.get(key)
        if isinstance(target, DTensor):
            value = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements)
        out[key] = value
    return out


def clip_grad_norm(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip sharded gradients to a total norm of `max_norm`; returns the norm before clipping.

    The norm of sharded gradients is a sum over every process's shards: it is reduced to one plain
    number before the clip coefficient is taken, so every process scales by the same factor.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


class FullOptimizerState:
    """The optimiser's state of a sharded model, whole (by parameter name), as custom checkpoint state
    for `accelerator.register_for_checkpointing`: `state_dict` gathers it on every process (the main one
    gets it and writes it), `load_state_dict` gives every process its shard of the whole state it read."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer, options=self._options())

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state, options=self._options())

    def release(self) -> None:
        """Drop the model and optimiser (the accelerator keeps this object registered), so that their
        shards can be freed once training is over."""
        self.model = self.optimizer = None


def prepare(acc, trained: dict[str, torch.nn.Module], layer_classes: Iterable[str],
            make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], *,
            weights: Callable[[], dict[str, torch.Tensor]],
            load_weights: Callable[[dict[str, torch.Tensor]], None]):
    """The sharded counterpart of `training.prepare_training`: the trained modules as one
    `TrainingForward`, sharded (each decoder layer, then the whole), and the optimiser over the
    sharded parameters. Neither goes through `accelerator.prepare` (it would add DDP on top).

    `weights()` returns the trained tensors as the model holds them (sharded); `save_state` gathers
    them on every process and the main one writes `trained.safetensors`; `load_state` cuts that file's
    whole tensors into this run's shards and gives them to `load_weights`.

    Returns:
        (sharded module, optimiser, its `FullOptimizerState`, which the caller registers for checkpointing).
    """
    from safetensors.torch import load_file, save_file

    from proxytune.stages.training import TRAINED_WEIGHTS, TrainingForward

    model = shard(TrainingForward(**trained), layer_classes)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])

    def save_hook(models, state_dicts, output_dir):
        state_dicts.clear()
        whole = full_state(weights(), keep=acc.is_main_process)  # every process takes part in the gathers
        if acc.is_main_process:
            save_file(whole, Path(output_dir) / TRAINED_WEIGHTS)

    def load_hook(models, input_dir):
        models.clear()
        load_weights(distribute_like(load_file(Path(input_dir) / TRAINED_WEIGHTS), weights()))

    acc.register_save_state_pre_hook(save_hook)
    acc.register_load_state_pre_hook(load_hook)
    return model, optimizer, FullOptimizerState(model, optimizer)
