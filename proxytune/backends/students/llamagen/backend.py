"""The LlamaGen student backend: a Llama decoder over the VQ codes of an image tokenizer, captioned by T5.

A sequence is [caption slots (C); image codes (L)]. The caption slots are the text encoder's
features through a small MLP; the codes are a VQ tokenizer's grid in raster order. The model
predicts every code from the caption and the codes before it, so training is one teacher-forced
pass and sampling is L steps with a KV cache.

Captions follow the original LlamaGen (its dataset/t2i.py, train_t2i.py, sample_t2i.py and
generate.py): the prompt is cleaned as LlamaGen's T5 captions were (`captions.clean_caption`),
encoded right-padded, then its n token features are moved to the END of the C slots ("left
padding") and the C - n pad slots are zeroed. No position attends to a pad slot except the pad
slot itself (which keeps every softmax row finite; nothing reads a pad slot's output). The
classifier-free-guidance null caption (the uncond embedding, in training dropout and in the
sampler's uncond half) is masked with the same prompt's pad slots, as in the original.

The condition stays ONE tensor, (B, C, Dt), as the StudentBackend contract asks: the mask is
derived from it, a slot being padding exactly when its feature row is all zeros (a real T5 output
row is never exactly zero). So `cond[index]` is a valid batch, and a cond made elsewhere (another
text encoder, trained jointly) only has to zero its pad rows.

A student folder (tiny, local or on the hub) holds transformer/ (an `ARStudent` or `LlamaGenStudent`
of `llamagen.model`), vqvae/ (diffusers VQModel), text_encoder/ (T5 encoder), tokenizer/ and
proxytune_student.json ({"image_size": S}). Original LlamaGen checkpoints become such a folder
through `llamagen.convert`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModel, DynamicCache

from proxytune.backends import tiny_cache
from proxytune.backends.captions import clean_caption
from proxytune.backends.students.llamagen.model import ARStudentConfig  # importing it registers the AutoModel classes
from proxytune.backends.students.api import LORA_GROUPS, cfg_batch, guided, sample_next
from proxytune.backends.students.llamagen import SAMPLING
from proxytune.backends.students import meta as student_meta
from proxytune.backends.students.meta import STUDENT_META, StudentMeta
from proxytune.errors import ProxytuneError, first_line

# Suffix matches on the Llama decoder's projections only: the caption MLP is fc1/fc2, the head lm_head.
LORA_TARGET_MODULES = [name for group in LORA_GROUPS.values() for name in group]


# -----------------------------------------------------------------------------
# bundle


@dataclass
class ARStudentBundle:
    """A student and its image and text tokenizers. `model` may be swapped for a peft PeftModel."""

    model: Any  # ARStudent, or a PeftModel wrapping it
    vq: Any  # diffusers VQModel
    text_encoder: Any  # transformers T5EncoderModel
    tokenizer: Any
    image_size: int
    path: str
    random_init: bool

    backend = "llamagen"
    z_loss_weight = 0.0  # LlamaGen's objective is the plain next-code cross-entropy (a style student reads this)

    @property
    def config(self) -> ARStudentConfig:
        return self.model.config

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def lora_target_modules(self, groups: list[str] | None = None) -> list[str]:
        """Llama projection suffixes of the named groups ("attention", "mlp"; None = both)."""
        from proxytune.backends.students.api import lora_groups

        return [name for group in lora_groups(groups) for name in LORA_GROUPS[group]]

    def image_logits(self, cond: torch.Tensor, codes: torch.Tensor, drop_cond: torch.Tensor) -> torch.Tensor:
        """(B, L, V) teacher-forced logits; logits[:, t] predicts codes[:, t].

        Raises:
            ProxytuneError: a cond whose last caption slot is padding (right-padded: encoded by an
                older proxytune, e.g. a codes stage output DVC did not re-run on a code change).
        """
        # a host sync: skipped inside student.compile's graph, which cannot branch on a tensor's value
        if not torch.compiler.is_compiling() and not bool((cond[:, -1] != 0).any(dim=-1).all()):
            raise ProxytuneError(f"student model {self.path!r}: caption features are not left-padded (encoded by an "
                                 "older proxytune?): run the codes stage again "
                                 "(dvc repro --force --single-item codes@EXPERIMENT.SUBJECT)")
        return self.model(cond, codes, drop_cond=drop_cond)

    def tokenizers_to(self, device: str) -> None:
        """The VQ and the T5 to `device` (encode_images and caption_features follow their own devices)."""
        self.vq.to(device)
        self.text_encoder.to(device)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels in [-1, 1] -> (B, L) code indices, raster order."""
        pixels = pixels.to(self.vq.device, self.vq.dtype)
        latents = self.vq.encode(pixels).latents  # (B, D, g, g), after quant_conv
        _, _, (_, _, indices) = self.vq.quantize(latents)  # indices (B * g * g,)
        return indices.view(pixels.shape[0], -1)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> list[Image.Image]:
        """(B, L) code indices -> B RGB images of image_size pixels."""
        B, L = codes.shape
        g = math.isqrt(L)
        indices = codes.reshape(-1).to(self.vq.device)
        shape = (B, g, g, self.vq.config.vq_embed_dim or self.vq.config.latent_channels)
        if self.vq.config.lookup_from_codebook:
            pixels = self.vq.decode(indices, force_not_quantize=True, shape=shape).sample
        else:
            quant = self.vq.quantize.get_codebook_entry(indices, shape)  # (B, D, g, g)
            pixels = self.vq.decode(quant, force_not_quantize=True).sample  # (B, 3, S, S)
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]

    def caption_features(self, prompts: list[str], max_tokens: int | None = None) -> torch.Tensor:
        """Prompts -> the cond `image_logits` and `loss` take: (B, C, Dt) T5 features, left-padded.

        As the original: each prompt is cleaned (when config.clean_captions), tokenized to at most C
        tokens and encoded right-padded with its attention mask; its n token features then fill the
        last n slots in order and the C - n slots before them are zero (the pad mask is read from
        those zero rows). Gradients flow into the text encoder (for training it jointly);
        `encode_prompts` is this under no_grad. `max_tokens` (< C) keeps at most that many tokens
        (a style student keeps slots free for its style tokens); the result is C slots wide all the same.
        """
        C = self.config.cond_len
        if self.config.clean_captions:
            prompts = [clean_caption(p) for p in prompts]
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=max_tokens or C, truncation=True,
            padding_side="right", return_tensors="pt",
        ).to(self.text_encoder.device)
        feats = self.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        feats = feats * tokens.attention_mask[:, :, None].to(feats.dtype)  # (B, max_tokens, Dt), pads zero
        # stable sort of the mask: pad slots (0) first, then the tokens in their own order
        order = torch.sort(tokens.attention_mask, dim=1, stable=True).indices  # (B, max_tokens)
        feats = feats.gather(1, order[:, :, None].expand_as(feats))
        return F.pad(feats, (0, 0, C - feats.shape[1], 0))  # (B, C, Dt): more pad slots in front

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """`caption_features` without gradients (the student stage caches these per prompt)."""
        return self.caption_features(prompts)

    def loss(
        self, text_feats: torch.Tensor, codes: torch.Tensor, *, cfg_dropout: float, generator: torch.Generator
    ) -> torch.Tensor:
        """Next-code cross-entropy on image tokens; each caption is dropped with p = cfg_dropout.

        Args:
            text_feats: (B, C, Dt) caption features.
            codes: (B, L) target codes.
            cfg_dropout: probability a sample's caption is replaced by the uncond embedding.
            generator: the CPU generator the drops are drawn from (B numbers per call).
        """
        drop = torch.rand(codes.shape[0], generator=generator) < cfg_dropout  # (B,)
        logits = self.model(text_feats, codes, drop_cond=drop.to(codes.device))  # (B, L, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten())

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        cfg_scale: float = SAMPLING.cfg_scale,
        top_k: int | None = SAMPLING.top_k,
        temperature: float = SAMPLING.temperature,
        use_cache: bool = True,
        text_feats: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sample (B, L) codes with classifier-free guidance; image i depends only on prompts[i], seeds[i].

        Args:
            prompts: one caption per image.
            seeds: one seed per image; its own generator makes every draw for that image.
            cfg_scale: logits = uncond + cfg_scale * (cond - uncond); at 1.0 the uncond half is skipped.
            top_k: sample among the k most likely codes (None: all).
            temperature: softmax temperature; 0 is greedy (argmax).
            use_cache: decode incrementally with a KV cache (else recompute the whole prefix each step).
            text_feats: (B, C, Dt) caption features to use instead of encoding `prompts` (a style
                student's, style tokens in some slots); the uncond half replaces them as a caption's.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        model = self.model
        B, L = len(prompts), self.config.seq_len
        text = self.encode_prompts(prompts) if text_feats is None else text_feats  # (B, C, Dt)
        text, drop = cfg_batch(text, cfg_scale)  # one batch [cond; uncond] when guided
        text = text.to(self.model_device)
        codes = torch.zeros(len(text), L, dtype=torch.long, device=text.device)  # codes[:, t] is a placeholder until drawn
        cache = DynamicCache() if use_cache else None
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        for t in tqdm(range(L), desc="student: sample", unit="code", leave=False, disable=None):
            logits = model(text, codes[:, : t + 1], drop_cond=drop, past_key_values=cache, use_cache=use_cache)
            logits = guided(logits[:, -1].float(), cfg_scale)  # (B or 2B, V) -> (B, V)
            nxt = sample_next(logits, generators, top_k=top_k, temperature=temperature)  # (B,)
            codes[:, t] = torch.cat([nxt, nxt]) if len(text) > B else nxt
        return codes[:B]

    def images_to_pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB images (square, image_size; resized bicubic if not) -> (B, 3, S, S) in [-1, 1]."""
        from proxytune.backends.students.api import images_to_pixels

        return images_to_pixels(images, self.image_size)

    @property
    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device


# -----------------------------------------------------------------------------
# loading


def _from_pretrained(cls, path: str, subfolder: str | None, ref: str):
    try:
        return cls.from_pretrained(path, subfolder=subfolder) if subfolder else cls.from_pretrained(path)
    except Exception as err:  # missing file, no hub, a bad config or shapes: any failure is one line
        where = f"{subfolder}/" if subfolder else path
        raise ProxytuneError(f"student model {ref!r}: cannot load {where} ({first_line(err)})") from None


def _load_transformer(path: str, ref: str):
    """transformer/ as the class its config.json's model_type names: `ARStudent` ("proxytune_ar") or
    `LlamaGenStudent` ("proxytune_llamagen", 2D RoPE); llamagen.model registers both with AutoModel."""
    try:
        return AutoModel.from_pretrained(path, subfolder="transformer")
    except Exception as err:  # missing files, a model_type that is no LlamaGen student, bad shapes
        raise ProxytuneError(f"student model {ref!r}: cannot load transformer/ ({first_line(err)})") from None


def _part(path: str, meta: StudentMeta, name: str) -> tuple[str, str | None]:
    """Where a part lives: its subfolder, or the hub id / folder proxytune_student.json names for it
    (a converted LlamaGen folder refers to google/flan-t5-xl instead of copying it)."""
    if name in meta:
        source = meta.get(name)
        local = Path(path) / source
        return (str(local), None) if Path(path).is_dir() and local.is_dir() else (source, None)
    return path, name


def _check_parts(ref: str, bundle: ARStudentBundle) -> None:
    """The parts of a student folder must agree on widths, codebook and grid."""
    config, vq = bundle.config, bundle.vq
    factor = 2 ** (len(vq.config.block_out_channels) - 1)
    problems = []
    if bundle.text_encoder.config.d_model != config.text_dim:
        problems.append(f"text encoder width {bundle.text_encoder.config.d_model} != text_dim {config.text_dim}")
    if vq.config.num_vq_embeddings != config.codebook_size:
        problems.append(f"VQ codebook {vq.config.num_vq_embeddings} != codebook_size {config.codebook_size}")
    if bundle.image_size // factor != config.grid_size:
        problems.append(f"image_size {bundle.image_size} / VQ factor {factor} != grid_size {config.grid_size}")
    if problems:
        raise ProxytuneError(f"student model {ref!r}: " + "; ".join(problems))


def load_student(ref: str, *, device: str = "cpu") -> ARStudentBundle:
    """Load a student (built-in tiny name, local folder or hub id), frozen and in eval mode.

    Raises:
        ProxytuneError: unknown name, unloadable part, or parts that do not fit together.
    """
    from proxytune.backends import students

    return load(students.resolve(ref), ref=ref, device=device)


def load(path: str, *, ref: str, device: str = "cpu") -> ARStudentBundle:
    """Load the llamagen student at `path` (a resolved folder or hub id; `ref` as the spec names it).

    Raises:
        ProxytuneError: an unloadable part, or parts that do not fit together.
    """
    from diffusers import VQModel
    from transformers import AutoTokenizer, T5EncoderModel

    try:
        meta = student_meta.read(path) or StudentMeta()
    except Exception as err:  # unreadable or not JSON
        raise ProxytuneError(f"student model {ref!r}: cannot read {STUDENT_META} ({first_line(err)})") from None
    model = _load_transformer(path, ref)
    vq = _from_pretrained(VQModel, *_part(path, meta, "vqvae"), ref)
    text_encoder = _from_pretrained(T5EncoderModel, *_part(path, meta, "text_encoder"), ref)
    tokenizer = _from_pretrained(AutoTokenizer, *_part(path, meta, "tokenizer"), ref)
    for part in (model, vq, text_encoder):
        part.to(device).eval().requires_grad_(False)
    bundle = ARStudentBundle(
        model=model,
        vq=vq,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        image_size=int(meta.get("image_size", vq.config.sample_size)),
        path=path,
        random_init=tiny_cache.is_random_init(path),
    )
    _check_parts(ref, bundle)
    return bundle
