"""Original VQGAN image tokenizers as diffusers `VQModel`s (key conversion).

LlamaGen's VQ-16 (vq_ds16_t2i.pt) and Chameleon's VQGAN (vqgan.ckpt, which Lumina-mGPT uses) are
both taming-transformers VQGANs: conv_in, levels of ResNet blocks (attention after each block on
some levels) with a stride-2 conv after every level but the last, a mid block (ResNet, attention,
ResNet), GroupNorm(32, eps 1e-6) + swish + conv_out, then quant_conv, the codebook, post_quant_conv
and a mirrored decoder with one more ResNet block per level and nearest-neighbour upsampling. That is
exactly diffusers' `VQModel` with `(Attn)DownEncoderBlock2D` / `(Attn)UpDecoderBlock2D` blocks, so
only names and two details differ:

- attention q/k/v/proj_out are 1x1 convs in the originals and linear layers in diffusers;
- LlamaGen's codebook is l2-normalised (cosine): the normalised codebook is stored, and diffusers'
  Euclidean argmin over unit vectors then picks the code of largest cosine, as the original does.

The two originals name the same modules differently (`Layout`): LlamaGen keeps its levels in
`conv_blocks` (the decoder's in the order they run), taming in `down` / `up` (the decoder's indexed
by resolution, so `up[n-1]` runs first), and their mid blocks are `mid.0..2` vs `mid.block_1`, `attn_1`,
`block_2`. The architecture (channels, blocks per level, which levels attend) is read from the
tensor shapes, so VQ-8, VQ-16 and Chameleon's 8192-code tokenizer all convert without presets.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from proxytune.backends import checkpoints
from proxytune.errors import ProxytuneError, first_line
from proxytune.files import staged_dir

NORM_GROUPS = 32  # both originals hard-code GroupNorm(32)


@dataclass(frozen=True)
class Layout:
    name: str
    down: str  # an encoder level, formatted with its index
    up: str  # a decoder level, formatted with its index in the checkpoint
    up_by_resolution: bool  # taming indexes decoder levels by resolution: up[n-1] runs first
    res: str  # a ResNet block within a level
    mid: tuple[str, str, str]  # ResNet, attention, ResNet
    l2_codebook: bool
    ignored: tuple[str, ...]  # key prefixes that are training state, not tokenizer weights


LAYOUTS = {
    "llamagen": Layout("llamagen", "conv_blocks.{}", "conv_blocks.{}", False, "res.{}", ("mid.0", "mid.1", "mid.2"),
                       l2_codebook=True, ignored=("quantize.codebook_used",)),
    "taming": Layout("taming", "down.{}", "up.{}", True, "block.{}", ("mid.block_1", "mid.attn_1", "mid.block_2"),
                     l2_codebook=False, ignored=("loss.", "quantize.used")),
}


def _indices(keys, prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def _need(state: dict, key: str, label: str) -> torch.Tensor:
    if key not in state:
        raise ProxytuneError(f"{label}: missing {key!r}; not a VQGAN checkpoint in this layout")
    return state[key]


def infer_config(state: dict[str, torch.Tensor], layout: Layout, *, image_size: int, label: str) -> dict:
    """The diffusers VQModel config of an original VQGAN state dict, read from its tensor shapes."""
    keys = list(state)
    down_prefix = "encoder." + layout.down.format("")
    levels = _indices(keys, down_prefix)
    if not levels or levels != list(range(len(levels))):
        raise ProxytuneError(f"{label}: no encoder levels under {down_prefix!r}; not a {layout.name} VQGAN layout")
    n = len(levels)
    res_prefix = layout.res.format("")
    channels, attends, blocks = [], [], set()
    for i in range(n):
        level = f"encoder.{layout.down.format(i)}."
        count = len(_indices(keys, level + res_prefix))
        blocks.add(count)
        channels.append(_need(state, f"{level}{layout.res.format(0)}.conv1.weight", label).shape[0])
        attends.append(any(k.startswith(level + "attn.") for k in keys))
    if len(blocks) != 1:
        raise ProxytuneError(f"{label}: encoder levels have different block counts {sorted(blocks)}")
    layers = blocks.pop()
    if _need(state, "encoder.conv_in.weight", label).shape[0] != channels[0]:
        raise ProxytuneError(f"{label}: the first level changes the channel count (ch_mult[0] != 1); "
                             "diffusers' VQModel cannot hold it")
    if bad := [c for c in channels if c % NORM_GROUPS]:
        raise ProxytuneError(f"{label}: channel counts {bad} are not multiples of {NORM_GROUPS} (GroupNorm groups)")
    up_levels = _indices(keys, "decoder." + layout.up.format(""))
    if up_levels != levels:
        raise ProxytuneError(f"{label}: the decoder has {len(up_levels)} levels, the encoder {n}")
    up_attends = []
    for k in range(n):
        level = f"decoder.{_up_level(layout, k, n)}."
        if len(_indices(keys, level + res_prefix)) != layers + 1:
            raise ProxytuneError(f"{label}: decoder level {level[:-1]!r} should have {layers + 1} ResNet blocks")
        width = _need(state, f"{level}{layout.res.format(0)}.conv1.weight", label).shape[0]
        if width != channels[n - 1 - k]:
            raise ProxytuneError(f"{label}: decoder level {level[:-1]!r} has {width} channels where the "
                                 f"{k}-th level to run needs {channels[n - 1 - k]} (levels out of order?)")
        up_attends.append(any(k_.startswith(level + "attn.") for k_ in keys))
    z = _need(state, "encoder.conv_out.weight", label).shape[0]
    if _need(state, "decoder.conv_in.weight", label).shape[1] != z:
        raise ProxytuneError(f"{label}: encoder.conv_out gives {z} channels but the decoder takes "
                             f"{state['decoder.conv_in.weight'].shape[1]} (a double-z KL encoder is not a VQGAN)")
    codebook = _need(state, "quantize.embedding.weight", label)
    return {
        "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(_need(state, "decoder.conv_out.weight", label).shape[0]),
        "down_block_types": tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attends),
        "up_block_types": tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in up_attends),
        "block_out_channels": tuple(int(c) for c in channels),
        "layers_per_block": layers,
        "latent_channels": int(z),
        "vq_embed_dim": int(codebook.shape[1]),
        "num_vq_embeddings": int(codebook.shape[0]),
        "norm_num_groups": NORM_GROUPS,
        "sample_size": image_size,
        "mid_block_add_attention": any(k.startswith(f"encoder.{layout.mid[1]}.") for k in keys),
    }


def _up_level(layout: Layout, k: int, n: int) -> str:
    """The checkpoint's name of the decoder level that runs k-th (diffusers' up_blocks[k])."""
    return layout.up.format(n - 1 - k if layout.up_by_resolution else k)


def key_pairs(config: dict, layout: Layout, has_shortcut) -> list[tuple[str, str, str]]:
    """(VQModel key, original key, kind) for every tensor; kind is "copy", "conv1x1" (attention
    projections: (C, C, 1, 1) conv <-> (C, C) linear) or "codebook". `has_shortcut(vqmodel_prefix,
    original_prefix)` says whether that ResNet block has a 1x1 shortcut (only blocks that change the
    channel count have one)."""
    n, layers = len(config["block_out_channels"]), config["layers_per_block"]
    pairs: list[tuple[str, str, str]] = []

    def copy(dst: str, src: str, kind: str = "copy") -> None:
        pairs.extend([(f"{dst}.weight", f"{src}.weight", kind), (f"{dst}.bias", f"{src}.bias", "copy")])

    def resnet(dst: str, src: str) -> None:
        for name in ("norm1", "conv1", "norm2", "conv2"):
            copy(f"{dst}.{name}", f"{src}.{name}")
        if has_shortcut(dst, src):
            copy(f"{dst}.conv_shortcut", f"{src}.nin_shortcut")

    def attention(dst: str, src: str) -> None:
        copy(f"{dst}.group_norm", f"{src}.norm")
        for old, new in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            copy(f"{dst}.{new}", f"{src}.{old}", "conv1x1")

    def mid(part: str) -> None:
        resnet(f"{part}.mid_block.resnets.0", f"{part}.{layout.mid[0]}")
        if config["mid_block_add_attention"]:
            attention(f"{part}.mid_block.attentions.0", f"{part}.{layout.mid[1]}")
        resnet(f"{part}.mid_block.resnets.1", f"{part}.{layout.mid[2]}")

    copy("encoder.conv_in", "encoder.conv_in")
    for i in range(n):
        src, dst = f"encoder.{layout.down.format(i)}", f"encoder.down_blocks.{i}"
        for j in range(layers):
            resnet(f"{dst}.resnets.{j}", f"{src}.{layout.res.format(j)}")
            if config["down_block_types"][i].startswith("Attn"):
                attention(f"{dst}.attentions.{j}", f"{src}.attn.{j}")
        if i < n - 1:
            copy(f"{dst}.downsamplers.0.conv", f"{src}.downsample.conv")
    mid("encoder")
    copy("encoder.conv_norm_out", "encoder.norm_out")
    copy("encoder.conv_out", "encoder.conv_out")
    copy("quant_conv", "quant_conv")
    pairs.append(("quantize.embedding.weight", "quantize.embedding.weight", "codebook"))
    copy("post_quant_conv", "post_quant_conv")
    copy("decoder.conv_in", "decoder.conv_in")
    mid("decoder")
    for k in range(n):
        src, dst = f"decoder.{_up_level(layout, k, n)}", f"decoder.up_blocks.{k}"
        for j in range(layers + 1):
            resnet(f"{dst}.resnets.{j}", f"{src}.{layout.res.format(j)}")
            if config["up_block_types"][k].startswith("Attn"):
                attention(f"{dst}.attentions.{j}", f"{src}.attn.{j}")
        if k < n - 1:
            copy(f"{dst}.upsamplers.0.conv", f"{src}.upsample.conv")
    copy("decoder.conv_norm_out", "decoder.norm_out")
    copy("decoder.conv_out", "decoder.conv_out")
    return pairs


def convert_state_dict(
    state: dict[str, torch.Tensor], layout: Layout | str, *, image_size: int, label: str = "VQGAN checkpoint"
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(VQModel config, VQModel state dict) from an original VQGAN state dict.

    Raises:
        ProxytuneError: a missing key, an unexpected one (anything but the layout's training state),
            or an architecture diffusers' VQModel cannot hold.
    """
    layout = LAYOUTS[layout] if isinstance(layout, str) else layout
    config = infer_config(state, layout, image_size=image_size, label=label)
    out: dict[str, torch.Tensor] = {}
    pairs = key_pairs(config, layout, lambda _, src: f"{src}.nin_shortcut.weight" in state)
    for dst, src, kind in pairs:
        tensor = _need(state, src, label)
        if kind == "conv1x1":
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
        elif kind == "codebook" and layout.l2_codebook:
            tensor = F.normalize(tensor, dim=-1)  # cosine lookup == Euclidean lookup over unit vectors
        out[dst] = tensor
    _check_shapes(config, out, pairs, state, label)
    taken = {src for _, src, _ in pairs}
    left = sorted(k for k in set(state) - taken if not k.startswith(layout.ignored))
    if left:
        shown = ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
        raise ProxytuneError(f"{label}: unexpected keys for the {layout.name} layout: {shown}")
    return config, out


def _check_shapes(config: dict, converted: dict, pairs, original: dict, label: str) -> None:
    """Every converted tensor must have the shape the architecture (read from the other tensors) gives it.

    Raises:
        ProxytuneError: the first original key whose tensor does not fit, with both shapes.
    """
    from diffusers import VQModel

    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        expected = VQModel(**config).state_dict()
    for dst, src, kind in pairs:
        want = expected.get(dst)
        if want is None or tuple(converted[dst].shape) == tuple(want.shape):
            continue
        shape = tuple(want.shape) + ((1, 1) if kind == "conv1x1" else ())
        raise ProxytuneError(f"{label}: {src!r} has shape {tuple(original[src].shape)}, but the other tensors give "
                             f"{shape}; not a consistent VQGAN checkpoint")


def to_original_state_dict(model, layout: Layout | str) -> dict[str, torch.Tensor]:
    """The inverse: a diffusers VQModel's weights under the original layout's names (used to build
    tiny tokenizers whose halves live in different libraries, e.g. Chameleon's encoder in transformers)."""
    layout = LAYOUTS[layout] if isinstance(layout, str) else layout
    state = model.state_dict()
    config = dict(model.config)
    out = {}
    for dst, src, kind in key_pairs(config, layout, lambda dst, _: f"{dst}.conv_shortcut.weight" in state):
        tensor = state[dst]
        out[src] = tensor[:, :, None, None] if kind == "conv1x1" else tensor
    return out


def build_vqmodel(config: dict, state: dict[str, torch.Tensor]):
    """A diffusers VQModel holding exactly `state` (built on the meta device: never random-initialised)."""
    from diffusers import VQModel

    with torch.device("meta"):
        model = VQModel(**config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def convert_file(path: str | Path, out_dir: str | Path, *, layout: str, image_size: int) -> Path:
    """Write a diffusers VQModel folder from an original VQGAN checkpoint file.

    Args:
        path: vq_ds16_t2i.pt (layout "llamagen") or Chameleon's vqgan.ckpt (layout "taming"), or
            a `.safetensors` file with the same keys.
        out_dir: the new folder (must not exist); written beside it first, renamed when complete.
        layout: a key of LAYOUTS.
        image_size: pixels per side the tokenizer is used at (stored as sample_size).
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ProxytuneError(f"{out_dir}: already exists; choose a new folder")
    label = f"{layout} VQGAN checkpoint {str(path)!r}"
    original = checkpoints.tensors_only(checkpoints.read_state_dict(path, label=f"{layout} VQGAN checkpoint"), label=label)
    try:
        config, state = convert_state_dict(original, layout, image_size=image_size, label=label)
        model = build_vqmodel(config, state)
    except ProxytuneError:
        raise
    except Exception as err:  # e.g. shapes that disagree with each other: still one line naming the file
        raise ProxytuneError(f"{label}: cannot build the tokenizer from it ({first_line(err)})") from None
    with staged_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "proxytune_source.json").write_text(json.dumps({"converted_from": str(path), "layout": layout}) + "\n")
    return out_dir
