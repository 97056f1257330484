"""Quantised frozen denoisers (`teacher.quantize`, `synthesis.quantize`), all through torchao, on CPU and CUDA:

- int8  torchao's int8 weight-only quantisation: each nn.Linear weight as int8 with a scale and a zero
        point per row, quantised by diffusers while the weights load (`TorchAoConfig`).
- fp8   torchao's float8 weight-only quantisation: each nn.Linear weight as float8_e4m3fn with a float32
        scale per row, loaded the same way. The matmul dequantises the weight to the activations' dtype, so
        it needs no FP8 tensor cores (it runs on CPU too); it saves what int8 saves, with 3 mantissa bits
        instead of 7.
- nf4   QLoRA's 4-bit NormalFloat (torchao's `NF4Tensor`, what torchtune's QLoRA trains on): each block of
        64 values as 4-bit indices into 16 normal quantiles times the block's absmax; the absmaxes are
        themselves int8 around their mean, with one scale per group of up to 256 blocks ("double
        quantisation"). diffusers has no NF4 config for torchao, so the denoiser loads in its dtype and
        `to_nf4` swaps each frozen Linear weight for its NF4 copy (in host memory, before the pipeline
        moves to the GPU).

peft puts a float32 LoRA beside each quantised layer (`TorchaoLoraLinear` for int8 / fp8; its plain
`Linear` for nf4, whose base forward goes through NF4Tensor's own `F.linear`) and trains it through the
frozen weights; activations, convolutions, norms, biases and embeddings stay in the load dtype.
"""

from __future__ import annotations

import torch

from proxytune.errors import ProxytuneError

CHOICES = ("none", "int8", "fp8", "nf4")
NF4_BLOCK = 64  # values per NF4 block (QLoRA's and torchtune's)
NF4_SCALER_GROUP = 256  # blocks per scale of their absmaxes, where the block count allows (torchtune's)


def require(quantize: str, field: str) -> None:
    """Refuse an unknown choice, or a quantised one without torchao, before any weight loads.

    Raises:
        ProxytuneError: either, naming `field` (the spec field that asks) and the fix.
    """
    if quantize not in CHOICES:
        raise ProxytuneError(f"{field}: {quantize!r} is not one of {', '.join(CHOICES)}")
    if quantize == "none":
        return
    try:
        import torchao.quantization  # noqa: F401  (its import-time noise: proxytune/__init__.py)
    except ImportError:
        raise ProxytuneError(f"{field}: {quantize} needs torchao, which is not installed "
                             "(pip install 'proxytune[quantize]')") from None


def load_config(quantize: str, field: str = "teacher.quantize"):
    """diffusers' config that quantises the denoiser while it loads (int8, fp8), or None (none; nf4, which
    `to_nf4` applies after loading).

    Raises:
        ProxytuneError: see `require`.
    """
    require(quantize, field)
    if quantize not in ("int8", "fp8"):
        return None
    from diffusers import TorchAoConfig
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig() if quantize == "int8" else Float8WeightOnlyConfig())


def nf4_scaler_group(numel: int) -> int | None:
    """Blocks per scale of the block absmaxes for a weight of `numel` values: 256, or the largest divisor of
    its block count under 256 where 256 does not divide it (SDXL's 320-wide layers: 1600 blocks, 200);
    None for a weight NF4 cannot hold (not whole 64-value blocks), which stays as loaded."""
    if numel % NF4_BLOCK:
        return None
    blocks = numel // NF4_BLOCK
    return next(group for group in range(min(NF4_SCALER_GROUP, blocks), 0, -1) if blocks % group == 0)


def nf4_bytes(numel: int, dtype_bytes: int) -> int | None:
    """Bytes of torchao's NF4 copy of a weight (its inner tensors), None where `nf4_scaler_group` is:
    4-bit indices (half a byte a value), an int8 absmax a block, a scale a group of blocks, their mean and
    the 16-entry quantile table, those three in the weight's dtype (`dtype_bytes` a value)."""
    group = nf4_scaler_group(numel)
    if group is None:
        return None
    blocks = numel // NF4_BLOCK
    return numel // 2 + blocks + (blocks // group + 1 + 16) * dtype_bytes


@torch.no_grad()
def to_nf4(model: torch.nn.Module, work: torch.device | None = None) -> list[str]:
    """Swap every frozen nn.Linear weight of `model` for torchao's NF4 copy, one layer at a time.

    Args:
        work: where to compute each copy (default: where the weight is); the copy goes back where the
            weight was, and `work` holds one layer at a time. On the CPU, FLUX.1-dev's 11.9B weights take
            tens of CPU-minutes (measured here: 4.6 CPU-s for 38M bf16 values); `load_pipeline` uses the GPU
            where there is one (not measured: no GPU here).

    Returns:
        The names of the Linear layers left as loaded (a weight not made of whole 64-value blocks).
    """
    from torchao.quantization import to_nf4 as quantized

    kept = []
    for name, layer in model.named_modules():
        if not isinstance(layer, torch.nn.Linear) or layer.weight.requires_grad:
            continue
        group = nf4_scaler_group(layer.weight.numel())
        if group is None:
            kept.append(name)
            continue
        weight = layer.weight.detach()
        copy = quantized(weight.to(work or weight.device).contiguous(), NF4_BLOCK, group).to(weight.device)
        layer.weight = torch.nn.Parameter(copy, requires_grad=False)
    return kept


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters and buffers hold, counting a quantised tensor (a torchao tensor
    subclass: int8 / float8 / 4-bit data and its scales) by its inner tensors, not by its nominal float dtype."""

    def size(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, name)) for name in names)
        return t.numel() * t.element_size()

    return sum(size(t) for t in (*model.parameters(), *model.buffers()))


def is_quantized(weight: torch.Tensor) -> bool:
    """A torchao quantised weight (int8 / fp8 data, or NF4), not a plain float tensor."""
    return hasattr(weight, "__tensor_flatten__")
