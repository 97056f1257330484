"""Style metrics (issue 15): how much an image carries a reference's style, its prompt, and the reference's content.

Per generated image, against the style references (means over references) and its prompt:

* style_clip: cosine between L2-normalised CLIP image embeddings of the image and each reference (as CLIP-I).
* style_gram: cosine between Gram matrices of DINO ViT patch features. The features are the patch tokens of
  the DINO encoder's last hidden state (`last_hidden_state[:, 1:]`, DreamBench DINO preprocessing: resize
  256 bicubic, centre crop 224, ImageNet normalisation): F (P patches x D channels). G = F^T F / P (D x D,
  uncentred, as Gatys et al. on conv feature maps), flattened and L2-normalised. The Gram matrix keeps
  which channels fire together over the image and drops where: texture, palette and stroke statistics,
  not layout. (ViT features, not VGG conv features: DINO is already an evaluation encoder here, and a
  CSD-style model would be one more download.)
* clip_t: cosine between the image and its prompt (CLIP-T, raw cosine).
* leakage: cosine between the image and the reference's content caption (`styles[i].content`, e.g. "a white
  lighthouse on a rock"): high when the reference's objects appear whatever the prompt asks. Only with a
  caption; compare it with the same score of the teacher's images and of images of other content.
* content_dino: cosine between DINO CLS embeddings of the image and each reference (DreamBench's DINO): the
  CLS token carries object and layout identity, so a model that copies the reference scores high here
  while one that only borrows its style does not.

Each is a `proxytune.metrics.Metric` of scope "style" (registered by `register`, which
`proxytune.backends.register_builtins` calls). Import-light on purpose: torch and the encoders are imported
by the scorers, so the registry can be read without them.
"""

from __future__ import annotations

import numpy as np

from proxytune.metrics import Metric, ScoringInputs, register as register_metric


def gram_embeds(dino, images: list, batch_size: int = 16):
    """(N, D*D) L2-normalised, flattened Gram matrices of the DINO patch tokens of `images` (a torch tensor)."""
    import torch

    from proxytune.backends import encoders

    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pixels = encoders.dino_preprocess(images[start : start + batch_size]).to(dino.device)
            patches = dino.model(pixel_values=pixels).last_hidden_state[:, 1:].float()  # (B, P, D)
            gram = patches.transpose(1, 2) @ patches / patches.shape[1]  # (B, D, D)
            out.append(torch.nn.functional.normalize(gram.flatten(1), dim=-1).cpu())
    return torch.cat(out)


def reference_embeds(clip, dino, references: list) -> dict:
    """What the style metrics compare with (ScoringInputs.references), computed once per reference set."""
    return {"clip": clip.image_embeds(references), "dino": dino.image_embeds(references),
            "gram": gram_embeds(dino, references)}


def _images(inputs: ScoringInputs) -> list:
    return [image for group in inputs.images for image in group]


def _texts(inputs: ScoringInputs) -> list[str]:
    """Each image's prompt, prompt-major like the images."""
    return [prompt for prompt, group in zip(inputs.prompts, inputs.images) for _ in group]


def _clip_images(inputs: ScoringInputs):
    """The images' CLIP embeddings, computed once per model (style_clip, clip_t and leakage share them)."""
    if "clip_images" not in inputs.cache:
        inputs.cache["clip_images"] = inputs.encoders["clip"].image_embeds(_images(inputs))
    return inputs.cache["clip_images"]


def _style_clip(inputs: ScoringInputs) -> np.ndarray:
    from proxytune.backends import encoders

    return encoders.per_image_pairwise_cosine(_clip_images(inputs), inputs.references["clip"]).numpy()


def _style_gram(inputs: ScoringInputs) -> np.ndarray:
    from proxytune.backends import encoders

    grams = gram_embeds(inputs.encoders["dino"], _images(inputs))
    return encoders.per_image_pairwise_cosine(grams, inputs.references["gram"]).numpy()


def _clip_t(inputs: ScoringInputs) -> np.ndarray:
    from proxytune.backends import encoders

    return encoders.per_image_clip_t(_clip_images(inputs), inputs.encoders["clip"].text_embeds(_texts(inputs))).numpy()


def _leakage(inputs: ScoringInputs) -> np.ndarray:
    """NaN for every image without a content caption (the evaluation then leaves the metric out)."""
    from proxytune.backends import encoders

    count = len(_images(inputs))
    if not inputs.content:
        return np.full(count, np.nan)
    captions = inputs.encoders["clip"].text_embeds([inputs.content] * count)
    return encoders.per_image_clip_t(_clip_images(inputs), captions).numpy()


def _content_dino(inputs: ScoringInputs) -> np.ndarray:
    from proxytune.backends import encoders

    embeds = inputs.encoders["dino"].image_embeds(_images(inputs))
    return encoders.per_image_pairwise_cosine(embeds, inputs.references["dino"]).numpy()


# In column order. Style evaluations have no gate and compile draws no style plots: not gateable, not plotted.
STYLE_METRICS = (
    Metric("style_clip", "style CLIP", "style", "mean cosine of CLIP image embeddings, image x each reference",
           _style_clip, needs=("clip",), plotted=False, gateable=False),
    Metric("style_gram", "style Gram", "style",
           "mean cosine of Gram matrices (F^T F / P, flattened) of DINO patch tokens (last_hidden_state[:, 1:]), "
           "image x each reference", _style_gram, needs=("dino",), plotted=False, gateable=False),
    Metric("clip_t", "CLIP-T", "style", "cosine of the image and its prompt (CLIP, raw)", _clip_t, needs=("clip",),
           plotted=False, gateable=False),
    Metric("leakage", "leakage (CLIP)", "style",
           "cosine of the image and the reference's content caption (CLIP, raw); higher = more content copied",
           _leakage, needs=("clip",), higher_is_better=False, plotted=False, gateable=False),
    Metric("content_dino", "content (DINO)", "style",
           "mean cosine of DINO CLS embeddings, image x each reference; higher = more content copied",
           _content_dino, needs=("dino",), higher_is_better=False, plotted=False, gateable=False),
)


def register() -> None:
    """Add the style metrics to `proxytune.metrics` (called once, by `proxytune.backends.register_builtins`)."""
    for metric in STYLE_METRICS:
        register_metric(metric)


def style_scores(images: list, prompts: list[str], refs: dict, clip, dino, content: str | None) -> dict[str, np.ndarray]:
    """(N,) arrays of the metrics of STYLE_METRICS for `images`, image i drawn for prompts[i] (leakage left out
    without a content caption)."""
    inputs = ScoringInputs(images=[[image] for image in images], prompts=prompts, encoders={"clip": clip, "dino": dino},
                           references=refs, content=content)
    return {m.name: m.score(inputs) for m in STYLE_METRICS if m.name != "leakage" or content}
