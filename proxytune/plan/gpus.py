"""The accelerators `proxytune plan` knows: memory, dense peak throughput and memory bandwidth.

Peaks are the vendors' dense (no sparsity) figures; `fp32` is plain FP32 (TF32 is off in proxytune's
stages today). `memory_gib` is what the driver reports (nvidia-smi's total), before the CUDA context.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxytune.errors import ProxytuneError

# What a step reaches of the peak: about what large-model training and batched diffusion sampling reach
# with stock PyTorch kernels (model FLOP utilisation 30-50 %); one figure for every GPU, stated in the report.
EFFICIENCY = 0.4
# Kept free on every card: the CUDA context, cuBLAS/cuDNN workspaces and allocator fragmentation.
RESERVED_GIB = 1.5
# Host <-> GPU copy rate (GB/s) for `synthesis.cpu_offload`: PCIe 4.0 x16's 32 GB/s less protocol overhead,
# with pinned pages; pageable memory (what a plain `.to(device)` copies from) often reaches half of it.
PCIE_GBS = 25.0


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    bf16_tflops: float
    fp32_tflops: float
    bandwidth_gbs: float

    def tflops(self, half: bool) -> float:
        return self.bf16_tflops if half else self.fp32_tflops


GPUS = {
    gpu.name.lower(): gpu
    for gpu in (
        Gpu("RTX4090", 23.99, 165.2, 82.6, 1008),
        Gpu("L4", 22.49, 121.0, 30.3, 300),
        Gpu("A100-40GB", 39.39, 312.0, 19.5, 1555),
        Gpu("A100-80GB", 79.15, 312.0, 19.5, 2039),
        Gpu("H100-80GB", 79.65, 989.0, 67.0, 3350),
        Gpu("H200", 140.4, 989.0, 67.0, 4800),
    )
}
ALIASES = {"4090": "rtx4090", "rtx-4090": "rtx4090", "a100": "a100-80gb", "a100-40": "a100-40gb",
           "a100-80": "a100-80gb", "h100": "h100-80gb", "h200-141gb": "h200"}


def find_gpu(name: str) -> Gpu:
    """The GPU called `name` (case-insensitive; 'A100' means the 80 GB one).

    Raises:
        ProxytuneError: an unknown name (the message lists the known ones).
    """
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in GPUS:
        raise ProxytuneError(f"--gpu {name!r}: unknown GPU (known: {', '.join(g.name for g in GPUS.values())}; "
                             f"or give --memory GiB)")
    return GPUS[key]


def custom_gpu(memory_gib: float, like: Gpu | None = None) -> Gpu:
    """A card of `memory_gib` GiB; its throughput is `like`'s (default: the A100's) for the time figures."""
    base = like or GPUS["a100-80gb"]
    return Gpu(f"{memory_gib:g} GiB", memory_gib, base.bf16_tflops, base.fp32_tflops, base.bandwidth_gbs)
