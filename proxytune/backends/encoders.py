"""Evaluation encoders (CLIP, DINO) and the DreamBench metrics computed from their embeddings.

DreamBench conventions, as used by the DreamBooth paper and its follow-ups:

* CLIP-I: cosine between L2-normalised CLIP image embeddings, averaged over ALL generated x real
  pairs.
* CLIP-T: cosine between each generated image and its own prompt with the identifier token removed
  (the class noun stays), averaged over images; the raw cosine (~0.3), not x100 and not clamped.
  This is not torchmetrics' CLIPScore, which scales by 100, clamps at 0 and pairs element-wise.
  The prompts and the identifier removal: `dreambench`.
* DINO: cosine between ViT-S/16 DINO CLS tokens (last_hidden_state[:, 0], not the pooler),
  averaged over ALL generated x real pairs; images go through Resize(256, bicubic) +
  CenterCrop(224) + ImageNet normalisation.

Encoders load through `tiny_cache.resolve` + `from_pretrained`, so the built-in random tiny models take
exactly the path a real checkpoint does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from proxytune import builtins
from proxytune.backends import tiny_cache
from proxytune.backends.tokenizer import BOS_ID, EOS_ID, char_vocab_size, write_char_clip_tokenizer
from proxytune.errors import ProxytuneError

DINO_RESIZE = 256
DINO_CROP = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TINY_SEED = 0


# --- built-in tiny encoders ------------------------------------------------------------------


def _build_tiny_clip(folder: Path) -> None:
    """A random CLIPModel laid out like a hub CLIP repo: weights, tokenizer, image processor config."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    write_char_clip_tokenizer(folder)
    text = dict(
        vocab_size=char_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=32,
        # the text model pools at the first eos_token_id, and the tokenizer pads with <|endoftext|>
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )
    vision = dict(
        image_size=224,
        patch_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
    )
    torch.manual_seed(TINY_SEED)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    model.save_pretrained(folder, safe_serialization=True)
    # The class defaults are the standard CLIP preprocessing (shortest edge 224 bicubic, crop 224,
    # OpenAI mean/std); it saves as image_processor_type "CLIPImageProcessor", as hub repos do.
    CLIPImageProcessorPil().save_pretrained(folder)


def _build_tiny_dino(folder: Path) -> None:
    """A random ViTModel shaped like the DINO checkpoints: no pooler weights."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        image_size=224,
        patch_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    torch.manual_seed(TINY_SEED)
    # facebook/dino-vit* were converted with add_pooling_layer=False, so they hold no pooler either.
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder, safe_serialization=True)


TINY_CLIP = {"tiny-clip": lambda: tiny_cache.materialize("tiny-clip-v1", _build_tiny_clip)}
TINY_DINO = {"tiny-dino": lambda: tiny_cache.materialize("tiny-dino-v1", _build_tiny_dino)}


# --- encoders --------------------------------------------------------------------------------


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _projected(output) -> torch.Tensor:
    # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output holds the projected
    # embedding; transformers 4 returned that tensor directly.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _batches(items: list, size: int):
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _require_images(images: list) -> None:
    if not images:
        raise ValueError("no images to embed")


def _load_error(what: str, ref: str, err: Exception) -> ProxytuneError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
    return ProxytuneError(f"{what} {ref!r}: cannot load ({first_line})")


class ClipEncoder:
    """CLIP image and text embeddings, L2-normalised, for CLIP-I and CLIP-T."""

    def __init__(self, ref: str, path: str, model, image_processor, tokenizer, device: str = "cpu"):
        self.ref, self.path, self.device = ref, path, device
        self.model = model.to(device).eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    @torch.no_grad()
    def image_embeds(self, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """Embed images with the checkpoint's own CLIP preprocessing.

        Args:
            images: PIL images (any mode; converted to RGB by the processor).
            batch_size: images per forward pass.
        Returns:
            (N, D) float32 CPU tensor, rows L2-normalised.
        """
        _require_images(images)
        out = []
        for batch in _batches(images, batch_size):
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            features = self.model.get_image_features(pixel_values=pixels.to(self.device))
            out.append(_l2_normalize(_projected(features)).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_embeds(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Embed texts (padded, truncated to the model's context length).

        Returns:
            (N, D) float32 CPU tensor, rows L2-normalised.
        """
        if not texts:
            raise ValueError("no texts to embed")
        max_length = self.model.config.text_config.max_position_embeddings
        out = []
        for batch in _batches(texts, batch_size):
            tokens = self.tokenizer(
                batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            features = self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
            out.append(_l2_normalize(_projected(features)).cpu())
        return torch.cat(out)

    def describe(self) -> dict:
        """Encoder id, weights path, preprocessing and embedding, for the evaluation record."""
        ip = self.image_processor
        return {
            "model": self.ref,
            "path": self.path,
            "architecture": type(self.model).__name__,
            "random_init": tiny_cache.is_random_init(self.path),
            "embedding": "projected image/text embeddings (get_image_features / get_text_features), L2-normalised",
            "preprocessing": {
                "processor": type(ip).__name__,
                "convert_rgb": bool(getattr(ip, "do_convert_rgb", True)),
                "resize": _plain(getattr(ip, "size", None)),
                "resample": _resample_name(getattr(ip, "resample", None)),
                "center_crop": _plain(getattr(ip, "crop_size", None)) if getattr(ip, "do_center_crop", False) else None,
                "mean": _plain(getattr(ip, "image_mean", None)),
                "std": _plain(getattr(ip, "image_std", None)),
            },
            "text_preprocessing": {
                "tokenizer": type(self.tokenizer).__name__,
                "max_length": self.model.config.text_config.max_position_embeddings,
            },
        }


def _resample_name(value) -> str | None:
    """PIL filter name ("BICUBIC") for a processor's resample setting (an int or an enum)."""
    if value is None:
        return None
    try:
        return Image.Resampling(int(value)).name
    except (TypeError, ValueError):
        return str(value)


def _plain(value):
    """Processor attributes (SizeDict, tuples) as JSON-friendly dicts and lists."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    if hasattr(value, "items"):
        return {k: v for k, v in value.items() if v is not None}
    if hasattr(value, "__dict__"):
        return {k: v for k, v in vars(value).items() if v is not None and not k.startswith("_")}
    return value


def dino_preprocess(images: list[Image.Image]) -> torch.Tensor:
    """DreamBench DINO preprocessing: RGB, Resize(256, bicubic), CenterCrop(224), ImageNet norm.

    Resize scales the shorter side to 256 and the longer one to int(256 * long / short), and the
    crop offsets are round((size - 224) / 2): the same arithmetic as torchvision's Resize and
    CenterCrop, which the reference implementation uses.

    Returns:
        (N, 3, 224, 224) float32 tensor.
    """
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = [_resize_crop(image.convert("RGB")) for image in images]
    batch = torch.stack([torch.from_numpy(np.array(p, dtype=np.uint8)).permute(2, 0, 1) for p in pixels]).float() / 255.0
    return (batch - mean) / std


def _resize_crop(image: Image.Image) -> Image.Image:
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(DINO_RESIZE * long / short)
    size = (DINO_RESIZE, new_long) if width <= height else (new_long, DINO_RESIZE)
    if size != image.size:
        image = image.resize(size, Image.BICUBIC)
    width, height = image.size
    left = int(round((width - DINO_CROP) / 2.0))
    top = int(round((height - DINO_CROP) / 2.0))
    return image.crop((left, top, left + DINO_CROP, top + DINO_CROP))


class DinoEncoder:
    """DINO ViT image embeddings: the CLS token of last_hidden_state, L2-normalised."""

    def __init__(self, ref: str, path: str, model, device: str = "cpu"):
        self.ref, self.path, self.device = ref, path, device
        self.model = model.to(device).eval()

    @torch.no_grad()
    def image_features(self, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """Raw (unnormalised) CLS features with the DreamBench DINO preprocessing: (N, D) float32 CPU.

        The feature-distribution analysis (variance, distances to a centroid) needs these scales.
        """
        _require_images(images)
        out = []
        for batch in _batches(images, batch_size):
            pixels = dino_preprocess(batch).to(self.device)
            hidden = self.model(pixel_values=pixels).last_hidden_state
            out.append(hidden[:, 0].float().cpu())
        return torch.cat(out)

    def image_embeds(self, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """Embed images with the DreamBench DINO preprocessing (see `dino_preprocess`).

        Returns:
            (N, D) float32 CPU tensor, rows L2-normalised.
        """
        return _l2_normalize(self.image_features(images, batch_size))

    def describe(self) -> dict:
        """Encoder id, weights path, preprocessing and embedding, for the evaluation record."""
        return {
            "model": self.ref,
            "path": self.path,
            "architecture": type(self.model).__name__,
            "random_init": tiny_cache.is_random_init(self.path),
            "embedding": "CLS of last_hidden_state, L2-normalised",
            "preprocessing": {
                "convert_rgb": True,
                "resize": {"shorter_side": DINO_RESIZE, "resample": "bicubic (PIL)"},
                "center_crop": DINO_CROP,
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
            },
        }


def load_clip(ref: str, *, device: str = "cpu") -> ClipEncoder:
    """Load a CLIP encoder from a built-in tiny name, a local directory or a hub id.

    Raises:
        ProxytuneError: unknown name, missing directory, or a checkpoint that cannot be loaded.
    """
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    path = tiny_cache.resolve(ref, builtins.builders("clip"), what="clip model")
    try:
        model = CLIPModel.from_pretrained(path)
        # PIL backend: bicubic as in the original CLIP preprocessing, and no torchvision needed
        image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise _load_error("clip model", ref, err) from None
    return ClipEncoder(ref, path, model, image_processor, tokenizer, device=device)


def load_dino(ref: str, *, device: str = "cpu") -> DinoEncoder:
    """Load a DINO ViT encoder from a built-in tiny name, a local directory or a hub id.

    Raises:
        ProxytuneError: unknown name, missing directory, or a checkpoint that cannot be loaded.
    """
    from transformers import ViTModel

    path = tiny_cache.resolve(ref, builtins.builders("dino"), what="dino model")
    try:
        # DINO checkpoints hold no pooler; the default add_pooling_layer=True would bolt on a freshly
        # random one at every load. The metric never reads it, so leave it out.
        model = ViTModel.from_pretrained(path, add_pooling_layer=False)
    except OSError as err:
        raise _load_error("dino model", ref, err) from None
    return DinoEncoder(ref, path, model, device=device)


# --- metrics ---------------------------------------------------------------------------------


def _check_pairs(gen: torch.Tensor, ref: torch.Tensor) -> None:
    if gen.ndim != 2 or ref.ndim != 2 or gen.shape[1] != ref.shape[1]:
        raise ValueError(f"expected (N, D) and (M, D) embeddings, got {tuple(gen.shape)} and {tuple(ref.shape)}")
    if gen.shape[0] == 0 or ref.shape[0] == 0:
        raise ValueError("empty embeddings")


def per_image_pairwise_cosine(gen: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(N,) mean cosine of each generated image to all M references; its mean is the metric.

    Both inputs are L2-normalised here (a no-op for encoder outputs), so raw embeddings work too.
    """
    _check_pairs(gen, ref)
    return (_l2_normalize(gen) @ _l2_normalize(ref).T).mean(dim=1)


def mean_pairwise_cosine(gen: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean cosine similarity over all N x M (generated, reference) pairs.

    Args:
        gen: (N, D) generated-image embeddings.
        ref: (M, D) reference-image embeddings.
    """
    return float(per_image_pairwise_cosine(gen, ref).mean())


def clip_i(gen: torch.Tensor, ref: torch.Tensor) -> float:
    """CLIP-I: mean CLIP image-image cosine over all generated x reference pairs."""
    return mean_pairwise_cosine(gen, ref)


def dino(gen: torch.Tensor, ref: torch.Tensor) -> float:
    """DINO: mean DINO CLS cosine over all generated x reference pairs."""
    return mean_pairwise_cosine(gen, ref)


def per_image_clip_t(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(N,) cosine between image i and the text of its prompt; raw, no x100, no clamping."""
    if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
        raise ValueError(
            f"expected two (N, D) tensors of the same shape, got {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    if image_embeds.shape[0] == 0:
        raise ValueError("empty embeddings")
    return (_l2_normalize(image_embeds) * _l2_normalize(text_embeds)).sum(dim=-1)


def clip_t(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """CLIP-T: mean of row-wise cosines between image i and the text of its prompt.

    Raw cosine (range [-1, 1]): no x100 scaling, no clamping. Rows are L2-normalised here.

    Args:
        image_embeds: (N, D) generated-image embeddings.
        text_embeds: (N, D) embeddings of each image's prompt, identifier removed.
    """
    return float(per_image_clip_t(image_embeds, text_embeds).mean())
