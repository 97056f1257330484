"""StyleAR style tokens for the Lumina-mGPT student: resampler, style-enhanced tokens, prompt, weights.

StyleAR (github wuyi2020/StyleAR, inference code on Lumina-mGPT-7B-768) conditions a Chameleon model on
a style image through N = 16 *style tokens*: a CLIP vision tower's penultimate hidden states go
through a perceiver resampler (IP-Adapter-plus shape) whose N outputs, one LM-width vector each,
replace the input embeddings of N placeholder tokens ("S*") in the prompt turn. This module is that
path, written for proxytune (nothing here is the original's code):

- `StyleResampler`: the perceiver resampler, any size (`ResamplerConfig`; `STYLEAR_RESAMPLER` is the
  released one), saved as safetensors + its config (`save_resampler` / `load_resampler`).
- `style_enhanced`: the noise step (`noise_strength`) the original applies at inference.
- `style_prompt` / `encode_style_prompts` / `replace_placeholders` / `style_input_embeds`: the prompt
  template, the placeholder positions in the Lumina backend's left-padded prompt turn, and the
  replacement of their input embeddings.

Classifier-free guidance: the original's unconditional branch is the sequence from the image-start
token <racm3:break> on, so it has neither text nor style tokens (its placeholder indices lie beyond
that short sequence, so the replacement is a no-op there). The Lumina backend's unconditional branch
masks the whole prompt turn out, and the style tokens live inside that turn: the same thing.

Training and sampling with these pieces: `proxytune.backends.stylear.style_student` (the stages: curation,
style_student, style_evaluate). Not here: the LlamaGen side, and the released weights' layouts
(`proxytune.backends.stylear.stylear_convert`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from proxytune.errors import ProxytuneError

# -- facts of the released code (lumina_mgpt/inference_solver.py, inference.py) ---------------------
PLACEHOLDER = "S*"
NUM_STYLE_TOKENS = 16
# The original finds the placeholder positions as the prompt ids equal to 16393 (Chameleon's tokenizer).
CHAMELEON_PLACEHOLDER_ID = 16393
STYLE_PROMPT_TEMPLATE = ("Instant style Generation. Given image style is {placeholders}. Please generate an same style "
                         "image according to my instruction: {prompt}")
NOISE_STRENGTH = 0.3  # inference.py --noise_strength default
CFG_SCALE = 4.0  # inference.py: create_logits_processor(cfg=4.0, image_top_k=2000)
CLIP_VISION_MODEL = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # CLIPVisionModelWithProjection, hidden_states[-2]
CLIP_HIDDEN_LAYER = -2
LORA_RANK = 4  # lora_rank = 4 in the solver; read back from the tensors when converting


@dataclass(frozen=True)
class ResamplerConfig:
    """Sizes of the perceiver resampler (the original's `Resampler` constructor arguments)."""

    dim: int = 4096  # width of the learned queries and of the attention/FF blocks
    depth: int = 4
    dim_head: int = 64
    heads: int = 12
    num_queries: int = NUM_STYLE_TOKENS
    embedding_dim: int = 1280  # CLIP ViT-H/14 hidden width
    output_dim: int = 4096  # the LM width (Lumina-mGPT-7B)
    ff_mult: int = 4


STYLEAR_RESAMPLER = ResamplerConfig()  # Resampler(dim=4096, depth=4, dim_head=64, heads=12, num_queries=16, ...)


class _Block(nn.Module):
    """One perceiver layer: cross-attention of the queries over [media; queries], then a feed-forward."""

    def __init__(self, c: ResamplerConfig):
        super().__init__()
        inner = c.heads * c.dim_head
        self.heads, self.dim_head = c.heads, c.dim_head
        self.norm_media = nn.LayerNorm(c.dim)
        self.norm_queries = nn.LayerNorm(c.dim)
        self.query = nn.Linear(c.dim, inner, bias=False)
        self.key_value = nn.Linear(c.dim, 2 * inner, bias=False)
        self.attn_out = nn.Linear(inner, c.dim, bias=False)
        self.ff_norm = nn.LayerNorm(c.dim)
        self.ff_up = nn.Linear(c.dim, c.dim * c.ff_mult, bias=False)
        self.ff_down = nn.Linear(c.dim * c.ff_mult, c.dim, bias=False)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # (B, L, H*d) -> (B, H, L, d)
        return t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)

    def forward(self, media: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        media_n, queries_n = self.norm_media(media), self.norm_queries(queries)
        q = self._split(self.query(queries_n))
        k, v = (self._split(t) for t in self.key_value(torch.cat([media_n, queries_n], dim=1)).chunk(2, dim=-1))
        # the scale split over q and k (d^-1/4 each) and the float32 softmax are the original's
        s = self.dim_head ** -0.25
        weights = torch.einsum("bhqd,bhkd->bhqk", q * s, k * s)
        weights = weights.float().softmax(dim=-1).to(weights.dtype)
        attended = torch.einsum("bhqk,bhkd->bhqd", weights, v).transpose(1, 2).flatten(2)
        queries = queries + self.attn_out(attended)
        return queries + self.ff_down(F.gelu(self.ff_up(self.ff_norm(queries))))


class StyleResampler(nn.Module):
    """Perceiver resampler: (B, S, embedding_dim) CLIP hidden states -> (B, num_queries, output_dim).

    As StyleAR's `Resampler` with its defaults apply_pos_emb=False, num_latents_mean_pooled=0 (what
    the solver builds): project the features to `dim`; learned queries attend, in `depth` layers,
    over the concatenation of the normalised features and the normalised queries (LayerNorms of
    their own), residual; a residual LayerNorm-Linear-GELU-Linear feed-forward; then a Linear to
    `output_dim` and a final LayerNorm.
    """

    def __init__(self, config: ResamplerConfig = STYLEAR_RESAMPLER):
        super().__init__()
        self.config = config
        self.queries = nn.Parameter(torch.randn(1, config.num_queries, config.dim) / math.sqrt(config.dim))
        self.input_proj = nn.Linear(config.embedding_dim, config.dim)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.depth))
        self.output_proj = nn.Linear(config.dim, config.output_dim)
        self.output_norm = nn.LayerNorm(config.output_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        media = self.input_proj(features)
        queries = self.queries.expand(features.shape[0], -1, -1)
        for block in self.blocks:
            queries = block(media, queries)
        return self.output_norm(self.output_proj(queries))


# -- CLIP features, content subtraction, noise ------------------------------------------------------

def clip_style_features(vision_model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The CLIP vision tower's penultimate hidden states (B, 1 + patches, width), as the original.

    `vision_model`: a transformers CLIPVisionModel or CLIPVisionModelWithProjection; `pixel_values`
    as its CLIPImageProcessor makes them."""
    return vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[CLIP_HIDDEN_LAYER]


def style_tokens_without_content(resampler: StyleResampler, style_features: torch.Tensor,
                                 content_features: torch.Tensor) -> torch.Tensor:
    """The original's two-image mode (a style image and a second, e.g. segmentation, image).

    On the CLIP hidden states: second = style - 0.8 * second; both go through the resampler; the
    tokens are 0.2 * R(style) + 0.8 * R(second). Shapes (1, S, width) each -> (1, N, output_dim)."""
    tokens = resampler(torch.cat([style_features, style_features - 0.8 * content_features], dim=0))
    return 0.2 * tokens[0:1] + 0.8 * tokens[1:2]


def style_enhanced(tokens: torch.Tensor, noise_strength: float = NOISE_STRENGTH,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Style-enhanced tokens: `tokens + noise_strength * z`, z ~ N(0, I) of the tokens' shape.

    What the original does (inference_solver.generate): after the resampler (and after the
    two-image blend, if any), once per generation, it adds `torch.randn_like(tokens) *
    noise_strength` to every element of the N style tokens (inference.py default 0.3), and the
    same noisy tokens replace the placeholders for the whole sampling; 0 gives the clean tokens.
    It draws from the global RNG; here the noise comes from `generator` (CPU; None: the global
    RNG), so one seed gives one noise.

    Why it reduces content leakage: the resampler ends in a LayerNorm, so each token is a vector of
    roughly unit per-element scale. Noise of std `noise_strength` on every element keeps what the
    16 tokens share in their large, coherent components (the global colour, texture and stroke
    statistics the model was trained to read as style) and drowns the fine, reference-specific
    detail the AR model would otherwise copy as objects and layout; the model, trained on clean
    tokens, cannot reproduce the reference's content from the perturbed ones. Larger values trade
    style strength for less leakage. (This is the mechanism as the method states it; the released
    code has the knob but no measurement. Issue 15's leakage metric is where to measure it.)
    """
    if noise_strength < 0:
        raise ValueError(f"noise_strength must be >= 0, got {noise_strength}")
    if noise_strength == 0:
        return tokens
    noise = torch.randn(tokens.shape, generator=generator, dtype=torch.float32)
    return tokens + (noise * noise_strength).to(tokens.device, tokens.dtype)


# -- prompt and placeholder replacement (Lumina backend) ------------------------------------------

def style_prompt(prompt: str, num_tokens: int = NUM_STYLE_TOKENS) -> str:
    """The original's human turn: the template with `num_tokens` space-separated "S*" and the prompt."""
    return STYLE_PROMPT_TEMPLATE.format(placeholders=" ".join([PLACEHOLDER] * num_tokens), prompt=prompt)


def placeholder_positions(tokenizer, text: str, num_tokens: int = NUM_STYLE_TOKENS) -> tuple[list[int], list[int]]:
    """(ids, positions): `text` tokenised without special tokens, and one position per placeholder.

    If the ids hold Chameleon's placeholder id (16393) exactly `num_tokens` times, those are the
    positions (the original's rule, for its tokenizer). Otherwise, for each "S*" in the text, the last
    token that overlaps it (a tokenizer that splits "S*" into "S", "*" gives the "*" positions).
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    if ids.count(CHAMELEON_PLACEHOLDER_ID) == num_tokens:
        return ids, [i for i, t in enumerate(ids) if t == CHAMELEON_PLACEHOLDER_ID]
    spans = [(m.start(), m.end()) for m in re.finditer(re.escape(PLACEHOLDER), text)]
    positions = []
    for start, end in spans:
        overlapping = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
        if not overlapping:
            raise ProxytuneError(f"style prompt: no token covers the placeholder at character {start}")
        positions.append(overlapping[-1])
    if len(positions) != num_tokens or len(set(positions)) != num_tokens:
        raise ProxytuneError(f"style prompt: expected {num_tokens} distinct placeholder tokens, found "
                             f"{len(set(positions))} (does the prompt itself contain {PLACEHOLDER!r}?)")
    return ids, positions


def encode_style_prompts(student, prompts: list[str], num_tokens: int = NUM_STYLE_TOKENS, *, prompt_len: int | None = None):
    """(cond (B, 2, T), positions (B, N)): the Lumina backend's left-padded prompt turns for the style
    template, and where the placeholders sit in them.

    The turn follows `LuminaStudent.encode_prompts`: <s>, the template's tokens, <reserved08706>, left
    padded to `prompt_len` (default: the student's) and masked; the style template replaces Lumina's
    "Generate an image of WxH ..." text, as in the original. A long prompt loses the end of its text;
    a prompt_len too short to hold every placeholder is refused."""
    T = prompt_len or student.prompt_len
    pad = student.tokenizer.pad_token_id or 0
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    positions = torch.zeros(len(prompts), num_tokens, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        text_ids, pos = placeholder_positions(student.tokenizer, style_prompt(prompt, num_tokens), num_tokens)
        text_ids = text_ids[: T - 2]
        if max(pos) >= len(text_ids):
            raise ProxytuneError(f"student model {student.path!r}: prompt length {T} cuts the style placeholders off")
        turn = [student.tokenizer.bos_token_id, *text_ids, student.end_of_turn]
        start = T - len(turn)
        ids[i, start:] = torch.tensor(turn)
        mask[i, start:] = 1
        positions[i] = torch.tensor(pos) + start + 1  # + 1: <s>
    return torch.stack([ids, mask], dim=1), positions


def replace_placeholders(embeds: torch.Tensor, positions: torch.Tensor, style_tokens: torch.Tensor) -> torch.Tensor:
    """`embeds` (B, L, D) with row b's positions[b, j] replaced by style_tokens[b, j] (out of place;
    gradients reach the style tokens). style_tokens (B or 1, N, D); positions (B, N)."""
    B, N = positions.shape
    style_tokens = style_tokens.expand(B, N, -1).to(embeds.dtype)
    rows = torch.arange(B, device=embeds.device)[:, None].expand(B, N)
    out = embeds.clone()
    out[rows, positions.to(embeds.device)] = style_tokens.to(embeds.device)
    return out


def style_input_embeds(student, ids: torch.Tensor, positions: torch.Tensor, style_tokens: torch.Tensor) -> torch.Tensor:
    """The Chameleon input embeddings of `ids` with the placeholders replaced by the style tokens."""
    embeds = student._chameleon.get_input_embeddings()(ids.to(student._device))
    return replace_placeholders(embeds, positions, style_tokens)


# -- proxytune's own resampler files (the released weights: stylear_convert) -------------------------

def save_resampler(module: StyleResampler, folder: str | Path) -> Path:
    """folder/resampler.safetensors + folder/resampler.json (the ResamplerConfig)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / "resampler.safetensors"))
    (folder / "resampler.json").write_text(json.dumps(asdict(module.config), indent=2) + "\n")
    return folder / "resampler.safetensors"


def load_resampler(folder: str | Path) -> StyleResampler:
    from safetensors.torch import load_file

    folder = Path(folder)
    module = StyleResampler(ResamplerConfig(**json.loads((folder / "resampler.json").read_text())))
    module.load_state_dict(load_file(str(folder / "resampler.safetensors")))
    return module
