"""The one interface every AR student backend offers (llamagen, janus, lumina-mgpt).

Stages and benchmarks program against `StudentBackend` only; `students.load_student` picks the family
from the checkpoint's own files (proxytune_student.json's "backend", else config.json's model_type), never
from its name.

Conventions shared by every backend:
- codes are (B, L) int64 in raster order, L = seq_len, values in [0, codebook_size);
- a condition ("cond") is one batch-first tensor per prompt batch, as `encode_prompts` returns it;
  `cond[index]` is a valid batch, so the student stage caches conds per distinct prompt;
- `image_logits(cond, codes, drop_cond)` is one teacher-forced pass: logits[:, t] predicts codes[:, t]
  from the condition and codes[:, :t]; rows where drop_cond is True see the unconditional prompt
  (classifier-free guidance dropout in training, the uncond half in sampling);
- `generate` samples with CFG, top-k (None: none), temperature and a KV cache; image i depends only
  on prompts[i] and seeds[i]. What a spec leaves unset comes from the backend's authors
  (each family's `SamplerDefaults`, resolved by `sampling_settings`).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image

from proxytune.backends.students import SamplerDefaults


@runtime_checkable
class StudentBackend(Protocol):
    backend: str  # "llamagen", "janus", "lumina-mgpt"
    model: Any  # the trainable module; the stage wraps it in a peft PeftModel
    image_size: int  # pixels per side of the images the tokenizer encodes/decodes
    path: str  # resolved folder or hub id
    random_init: bool  # built-in tiny (random weights): reports say so

    @property
    def seq_len(self) -> int: ...

    @property
    def codebook_size(self) -> int: ...

    # peft LoraConfig(target_modules=...): a list of suffixes or a regex string restricted to the
    # language model (never the vision tower / VQ / text encoder).
    def lora_target_modules(self, groups: list[str] | None = None) -> list[str] | str:
        """Targets for the named module groups ("attention", "mlp"; None = all of them)."""
        ...

    def num_layers(self) -> int: ...

    def images_to_pixels(self, images: list[Image.Image]) -> torch.Tensor: ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def tokenizers_to(self, device: str) -> None:
        """Move only what `encode_images` and `encode_prompts` use (image tokenizer, text encoder) to
        `device`; the generator stays where it was loaded (the codes stage keeps a 7B model off the GPU)."""
        ...

    def decode_codes(self, codes: torch.Tensor) -> list[Image.Image]: ...

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor: ...

    def image_logits(self, cond: torch.Tensor, codes: torch.Tensor, drop_cond: torch.Tensor) -> torch.Tensor: ...

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        cfg_scale: float = 7.5,
        top_k: int | None = 1000,
        temperature: float = 1.0,
        use_cache: bool = True,
    ) -> torch.Tensor: ...


# -- pieces every backend shares ------------------------------------------------------------------
def sampler_defaults(backend: str) -> SamplerDefaults:
    """The sampler defaults of a student family (its record's), or StyleAR's for "stylear"."""
    from proxytune.backends import students

    return students.STYLEAR_SAMPLING if backend == "stylear" else students.family(backend).sampling


def sampling_settings(backend: str, spec: Any) -> dict[str, Any]:
    """The sampler settings a student uses: each field the spec gives, else its family's default.

    Args:
        backend: the student's family name ("llamagen", "lumina-mgpt", "janus"), or "stylear" for a
            style student (StyleAR's own defaults, not its base's).
        spec: a SamplingSpec (fields cfg_scale, top_k, temperature; None = not given).
    Returns:
        {"cfg_scale", "top_k", "temperature"}: the keyword arguments of `generate`, and what the stage
        records. top_k None means no top-k filtering.
    """
    given = spec.model_dump()
    defaults = sampler_defaults(backend).settings()
    return {key: given[key] if given[key] is not None else default for key, default in defaults.items()}


# Decoder projections by module group, for selective LoRA ("attention", "mlp").
LORA_GROUPS = {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}


def unwrapped(model: Any) -> Any:
    """The model itself, or the base model inside a peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lora_groups(groups: list[str] | None) -> list[str]:
    """The requested group names (all when None), checked."""
    from proxytune.errors import ProxytuneError

    chosen = list(groups or LORA_GROUPS)
    unknown = [g for g in chosen if g not in LORA_GROUPS]
    if unknown:
        raise ProxytuneError(f"unknown LoRA module group(s) {unknown} (known: {', '.join(LORA_GROUPS)})")
    return chosen


def images_to_pixels(images: list[Image.Image], size: int) -> torch.Tensor:
    """RGB images (resized bicubic to size x size when they are not) -> (B, 3, S, S) in [-1, 1].

    diffusers' VaeImageProcessor, set up for exactly that (tests/test_image_preprocessing.py compares
    its pixels with the plain PIL + x / 127.5 - 1 arithmetic); vae_scale_factor 1 keeps any size."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=1, resample="bicubic", do_normalize=True, do_convert_rgb=True)
    return processor.preprocess(list(images), height=size, width=size)


def cfg_batch(cond: torch.Tensor, cfg_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, drop) for sampling: [cond; cond] with the second half dropped when guided, else as is."""
    B = cond.shape[0]
    drop = torch.zeros(B, dtype=torch.bool)
    if cfg_scale == 1.0:
        return cond, drop
    return torch.cat([cond, cond]), torch.cat([drop, torch.ones(B, dtype=torch.bool)])


def guided(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """uncond + cfg_scale * (cond - uncond) over a [cond; uncond] batch (as is at scale 1)."""
    if cfg_scale == 1.0:
        return logits
    cond, uncond = logits.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def sample_next(
    logits: torch.Tensor, generators: list[torch.Generator], *, top_k: int | None, temperature: float
) -> torch.Tensor:
    """(B, V) logits -> (B,) codes; row i draws one number from generators[i] only.

    temperature 0 means argmax; top_k None keeps every code. Draws happen on the CPU so a seed gives
    the same choice anywhere.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1).cpu()  # (B, V)
    picks = [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)]
    return torch.cat(picks).to(logits.device)
