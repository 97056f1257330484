"""LlamaGen's text-to-image GPT as transformers models: the config, the 1D and 2D-RoPE decoders, presets.

`ARStudent` is a Llama decoder over [caption slots (C); image codes (L)]: the caption slots are the
text encoder's features through a small MLP (`CaptionProjection`), the codes a VQ tokenizer's grid
in raster order. It predicts every code from the caption and the codes before it. Caption slots
that are padding (all-zero feature rows) are masked as LlamaGen masks them (`attention_mask`).

`LlamaGenStudent` is the same model with LlamaGen's 2D RoPE. LlamaGen rotates interleaved pairs
(x[2i], x[2i+1]) of each head; transformers rotates (x[i], x[i + d/2]). After the converter
(`llamagen.convert`) permutes the q and k rows, pair i of the original lives in dims (i, i + d/2),
so the 2D structure is carried by the (cos, sin) tables alone (`rope_2d_tables`): within each
head the first d/4 pairs turn by the code's row in the image grid and the last d/4 by its column,
one frequency ladder base^(-2k/(d/2)), k < d/4, shared by both axes; the caption slots get
cos = sin = 0, so their q and k are exactly zero. transformers' own `apply_rotary_pos_emb` is used
unchanged.

Both configs are registered with transformers' AutoConfig / AutoModel, so
`AutoModel.from_pretrained(folder)` builds whichever class a saved config.json names.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, DynamicCache, LlamaConfig, LlamaModel, PretrainedConfig, PreTrainedModel

try:  # transformers 5: init helpers that leave weights loaded from a checkpoint alone
    from transformers import initialization as init
except ImportError:  # transformers 4 only initialises missing weights anyway
    from torch.nn import init


# -----------------------------------------------------------------------------
# model


class ARStudentConfig(PretrainedConfig):
    """Defaults follow LlamaGen's text-to-image GPT-XL (FLAN-T5-XL captions, 16x16 codes)."""

    model_type = "proxytune_ar"

    codebook_size: int = 16384
    hidden_size: int = 1280
    num_hidden_layers: int = 36
    num_attention_heads: int = 20
    intermediate_size: int = 3584
    cond_len: int = 120  # caption slots before the first image code
    text_dim: int = 2048  # text encoder width
    grid_size: int = 16  # codes per image side: L = grid_size ** 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    # While training: dropout on the input embeddings (caption slots and codes), on each attention
    # block's output and on each FFN's output, as LlamaGen's token_dropout_p, resid_dropout_p and
    # ffn_dropout_p (its training default is 0.1 for all three; the student spec's `dropout` sets it).
    dropout: float = 0.0
    # Clean prompts as LlamaGen's T5 captions were before encoding them (captions.clean_caption).
    clean_captions: bool = True

    @property
    def seq_len(self) -> int:
        return self.grid_size**2


class CaptionProjection(nn.Module):
    """Text features -> model width, as LlamaGen's caption embedder (no biases, so zero pads stay zero)."""

    def __init__(self, text_dim: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(text_dim, hidden_size, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def backbone_config(config: ARStudentConfig) -> LlamaConfig:
    """The Llama decoder of a student: its vocabulary is the VQ codebook."""
    return LlamaConfig(
        vocab_size=config.codebook_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.cond_len + config.seq_len,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        initializer_range=config.initializer_range,
        # no special tokens: a pad id would give code 0 a zero, frozen embedding
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )


class ARStudent(PreTrainedModel):
    config_class = ARStudentConfig
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True  # the Llama decoder layers recompute activations

    def __init__(self, config: ARStudentConfig):
        super().__init__(config)
        self.cap_proj = CaptionProjection(config.text_dim, config.hidden_size)
        # What a dropped caption is replaced by (classifier-free guidance); saved with the weights.
        self.register_buffer("uncond_embedding", torch.empty(config.cond_len, config.text_dim))
        self.backbone = LlamaModel(backbone_config(config))
        self.lm_head = nn.Linear(config.hidden_size, config.codebook_size, bias=False)
        # LlamaGen's dropouts (config.dropout). Hooks on the attention and MLP blocks rather than
        # wrapped projections: parameter names (and so LoRA targets and checkpoints) stay Llama's,
        # and a LoRA on o_proj / down_proj is dropped out together with its base projection.
        self.token_dropout = nn.Dropout(config.dropout)
        for layer in self.backbone.layers:
            layer.self_attn.register_forward_hook(self._block_output_dropout)
            layer.mlp.register_forward_hook(self._block_output_dropout)
        self.post_init()

    def set_dropout(self, p: float) -> None:
        """Token, attention-output and FFN-output dropout probability (active in train mode only)."""
        self.config.dropout = float(p)
        self.token_dropout.p = float(p)

    def _block_output_dropout(self, module: nn.Module, args, output):
        p = self.token_dropout.p
        if not self.training or p == 0:
            return None  # output unchanged
        if isinstance(output, tuple):  # attention: (output, weights)
            return (F.dropout(output[0], p, training=True), *output[1:])
        return F.dropout(output, p, training=True)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ARStudent):
            init.normal_(module.uncond_embedding, std=1.0 / math.sqrt(module.config.text_dim))

    def embed_caption(self, text_feats: torch.Tensor, drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, Dt) text features -> (B, C, H) input embeddings; dropped rows use the uncond embedding."""
        cond = text_feats.to(self.uncond_embedding.dtype)
        if drop_cond is not None:
            cond = torch.where(drop_cond.to(cond.device)[:, None, None], self.uncond_embedding, cond)
        return self.cap_proj(cond)

    def attention_mask(self, text_feats: torch.Tensor, start: int, end: int) -> torch.Tensor | None:
        """Which inputs the inputs start..end-1 attend to, or None when no caption slot is padding.

        A key is visible when it is not later than the query and is either an image position, a
        caption slot holding a token (a non-zero feature row) or the query itself (LlamaGen's
        diagonal: a pad slot sees itself only, so no softmax row is empty). The padding comes from
        the caption features even for rows whose caption is dropped: the null caption is masked
        like the prompt it stands in for.

        Returns:
            (B, 1, end - start, end): bool (True = attend) for SDPA, additive float for eager attention.
        """
        C = self.config.cond_len
        token = (text_feats != 0).any(dim=-1)  # (B, C)
        # one host sync per call; full captions keep SDPA's causal fast path. A compiled graph cannot branch on
        # a tensor's value and always takes the mask (the same attention).
        if not torch.compiler.is_compiling() and bool(token.all()):
            return None
        B, device = token.shape[0], token.device
        visible = torch.cat([token, token.new_ones(B, max(end - C, 0))], dim=1)[:, :end]  # (B, end)
        q = torch.arange(start, end, device=device)[:, None]
        k = torch.arange(end, device=device)[None, :]
        allowed = (k <= q) & (visible[:, None, :] | (k == q))  # (B, end - start, end)
        allowed = allowed[:, None]
        if self.config._attn_implementation == "eager":  # eager adds the mask to the scores
            dtype = self.uncond_embedding.dtype
            return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        return allowed

    def forward(
        self,
        text_feats: torch.Tensor,
        codes: torch.Tensor,
        drop_cond: torch.Tensor | None = None,
        past_key_values: DynamicCache | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor:
        """Teacher-forced logits: logits[:, i] predicts codes[:, i] from the caption and codes[:, :i].

        The last code is only a target and is never read, so the next code after a prefix p is
        `forward(text, cat(p, placeholder))[:, -1]`. With a cache, only the inputs it has not seen
        yet are run (and the cache is extended in place), and only their logits are returned: the
        sampler passes the same arguments with or without a cache and reads the last position.

        Args:
            text_feats: (B, C, Dt) caption features, pad slots all-zero rows (see students/llamagen/backend.py);
                needed on every call, since the pad mask is read from them.
            codes: (B, T) code indices, T <= L.
            drop_cond: (B,) bool, True where the caption is replaced by the uncond embedding.
            past_key_values: a transformers DynamicCache holding the inputs before these.
            use_cache: store the new keys/values in `past_key_values`.

        Returns:
            (B, T', V) logits for the last T' targets (T' = T without a cache).
        """
        C = self.config.cond_len
        seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        parts = []
        if seen < C:
            parts.append(self.embed_caption(text_feats, drop_cond)[:, seen:])  # (B, C - seen, H)
        parts.append(self.backbone.embed_tokens(codes[:, max(seen - C, 0) : -1]))  # unseen codes, (B, *, H)
        x = self.token_dropout(torch.cat(parts, dim=1))  # (B, T_new, H)
        mask = self.attention_mask(text_feats, seen, seen + x.shape[1])
        out = self.backbone(inputs_embeds=x, attention_mask=mask, past_key_values=past_key_values, use_cache=use_cache)
        h = out.last_hidden_state[:, max(C - 1 - seen, 0) :]  # caption slots before the last predict nothing
        return self.lm_head(h)  # (B, T', V)



# -----------------------------------------------------------------------------
# config presets


class LlamaGenStudentConfig(ARStudentConfig):
    """An `ARStudentConfig` whose model uses LlamaGen's 2D RoPE (own model_type, so a saved folder says so)."""

    model_type = "proxytune_llamagen"


def llamagen_ffn_dim(dim: int, multiple_of: int = 256) -> int:
    """LlamaGen's SwiGLU width: 2/3 of 4 * dim, rounded up to a multiple (1280 -> 3584)."""
    hidden = int(2 * (4 * dim) / 3)
    return -(-hidden // multiple_of) * multiple_of


def llamagen_t2i_xl(*, grid_size: int = 16) -> LlamaGenStudentConfig:
    """LlamaGen T2I GPT-XL (about 775M parameters) with FLAN-T5-XL captions.

    Args:
        grid_size: codes per image side; 16 for the 256 px checkpoints, 32 for 512 px.
            Default: 16.
    """
    return LlamaGenStudentConfig(
        codebook_size=16384,
        hidden_size=1280,
        num_hidden_layers=36,
        num_attention_heads=20,
        intermediate_size=llamagen_ffn_dim(1280),
        cond_len=120,
        text_dim=2048,
        grid_size=grid_size,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )


def llamagen_t2i_tiny() -> LlamaGenStudentConfig:
    """About 0.1M parameters in the same layout, for tests: head dim 16 (4 pairs per axis), 4x4 codes,
    the original's 120 caption slots."""
    return LlamaGenStudentConfig(
        codebook_size=64,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=llamagen_ffn_dim(64, multiple_of=32),
        cond_len=120,
        text_dim=32,
        grid_size=4,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )


# -----------------------------------------------------------------------------
# 2D RoPE


def head_dim(config: ARStudentConfig) -> int:
    """Per-head width; must split into a row half and a column half of whole pairs.

    Raises:
        ValueError: hidden_size not divisible by num_attention_heads, or a head width not divisible by 4.
    """
    d, rest = divmod(config.hidden_size, config.num_attention_heads)
    if rest or d % 4:
        raise ValueError(
            f"2D RoPE needs hidden_size / num_attention_heads to be a multiple of 4, "
            f"got {config.hidden_size} / {config.num_attention_heads}"
        )
    return d


def rope_2d_tables(
    config: ARStudentConfig, *, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) for every input position [caption slots (zeros); image codes in raster order].

    Rotate-half layout: column j and j + d/2 hold pair j's angle. Pairs j < d/4 turn by the
    code's row times base^(-2j/(d/2)), pairs j >= d/4 by its column times base^(-2(j - d/4)/(d/2)),
    computed in float32 as the original does.

    Returns:
        cos, sin: (cond_len + grid_size**2, head_dim) float32 each.
    """
    d, g, C = head_dim(config), config.grid_size, config.cond_len
    half = d // 2  # one axis' share of the head
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, half, 2, device=device).float() / half))  # (d/4,)
    pos = torch.arange(g * g, device=device)
    rows, cols = pos // g, pos % g  # (L,) each
    angles = torch.cat([torch.outer(rows, inv_freq), torch.outer(cols, inv_freq)], dim=-1)  # (L, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, d): pair j in columns j and j + d/2
    blank = torch.zeros(C, d, device=device)  # caption slots: q and k become exactly zero
    return torch.cat([blank, angles.cos()]), torch.cat([blank, angles.sin()])


class Rope2D(nn.Module):
    """Drop-in for LlamaModel.rotary_emb: position ids index the 2D tables.

    LlamaModel numbers its inputs 0.. (plus the cache length), which is exactly the row of
    `rope_2d_tables`. The tables are rebuilt per call ((C + L) x d numbers, once per forward,
    not per layer) and are no buffer, so nothing is saved and from_pretrained has nothing to
    initialise.
    """

    def __init__(self, config: ARStudentConfig):
        super().__init__()
        self.config = config
        head_dim(config)  # fail at build time, not at the first forward

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rope_2d_tables(self.config, device=x.device)
        return cos[position_ids].to(x.dtype), sin[position_ids].to(x.dtype)  # (B or 1, T, d) each


class LlamaGenStudent(ARStudent):
    """`ARStudent` with LlamaGen's 2D RoPE; same weights, forward, sampling and LoRA targets."""

    config_class = LlamaGenStudentConfig

    def __init__(self, config: LlamaGenStudentConfig):
        super().__init__(config)
        self.backbone.rotary_emb = Rope2D(config)


# -----------------------------------------------------------------------------
# transformers' Auto classes: a saved transformer/ folder names its class by model_type

for _config, _model in ((ARStudentConfig, ARStudent), (LlamaGenStudentConfig, LlamaGenStudent)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
