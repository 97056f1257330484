"""One training (or inference) step of a model traced on fake tensors: peak live bytes and FLOPs.

`trace_step` builds the model inside torch's `FakeTensorMode`, so no weight is ever allocated and no
kernel runs: every op only computes its output's shape, dtype and storage. `LiveBytes`, a dispatch
mode, adds the bytes of each new storage an op returns and takes them off again when the storage is
freed (a weak reference to the storage object; torch keeps that object alive as long as the storage
lives). Its peak is the peak of everything the step allocates on top of the weights: activations kept
for backward, temporaries, gradients. It also counts the matmul, convolution and attention FLOPs of
the same ops with torch's FLOP formulas.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created by ops while active (`peak`: the most alive at once) and
    the FLOPs of those ops, by torch's own FLOP formulas (`torch.utils.flop_counter.flop_registry`).

    Not FlopCounterMode itself: its module hooks keep checkpointed activations alive (a traced
    gradient-checkpointing step then looked three times its real size)."""

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.current = 0
        self.peak = 0
        self.flops = 0
        self._formulas = flop_registry
        self._seen: dict[int, weakref.ref] = {}

    def _release(self, key: int, size: int) -> None:
        self._seen.pop(key, None)
        self.current -= size

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._seen:
            return
        size = storage.nbytes()
        self._seen[key] = weakref.ref(storage, lambda _ref, key=key, size=size: self._release(key, size))
        self.current += size
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self._formulas.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        # a view or an in-place op returns an input's storage: weights and buffers are not the step's
        inputs = {item.untyped_storage()._cdata for item in tree_flatten((args, kwargs))[0]
                  if isinstance(item, torch.Tensor)}
        for item in tree_flatten(out)[0]:
            if (isinstance(item, torch.Tensor) and item.device.type != "meta"
                    and item.untyped_storage()._cdata not in inputs):
                self._track(item)
        return out


@dataclass(frozen=True)
class Trace:
    """What one traced step allocated on top of the weights, and its FLOPs."""

    peak_bytes: int  # the most bytes alive at once during the step
    end_bytes: int  # still alive after it (gradients, the loss)
    flops: int


def to_fake(model: torch.nn.Module) -> None:
    """Give a meta-device model fake CPU parameters and buffers of the same shapes, dtypes and grad flags
    (under an active FakeTensorMode). Building on meta and swapping is what lets peft add its layers:
    its device moves fail on fake parameters."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                fake = torch.empty(param.shape, dtype=param.dtype, device="cpu")
                module._parameters[name] = torch.nn.Parameter(fake, requires_grad=param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype, device="cpu")


def trace_step(build: Callable[[], torch.nn.Module], step: Callable[[torch.nn.Module], None]) -> Trace:
    """Build a model on fake tensors and trace `step(model)` (forward and, for training, backward).

    Args:
        build: makes the model; it runs on the meta device, so parameters cost nothing.
        step: runs one step on the model; it makes its inputs itself (fake too).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("meta"):
        model = build()
    with FakeTensorMode(allow_non_fake_inputs=True):
        to_fake(model)
        live = LiveBytes()
        with live:
            step(model)
        end = live.current
    return Trace(peak_bytes=live.peak, end_bytes=end, flops=live.flops)
