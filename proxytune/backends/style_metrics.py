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
"""

from __future__ import annotations

import numpy as np
import torch

from proxytune.backends import encoders

STYLE_METRICS = ("style_clip", "style_gram", "clip_t", "leakage", "content_dino")
DESCRIPTIONS = {
    "style_clip": "mean cosine of CLIP image embeddings, image x each reference",
    "style_gram": "mean cosine of Gram matrices (F^T F / P, flattened) of DINO patch tokens (last_hidden_state[:, 1:]), "
                  "image x each reference",
    "clip_t": "cosine of the image and its prompt (CLIP, raw)",
    "leakage": "cosine of the image and the reference's content caption (CLIP, raw); higher = more content copied",
    "content_dino": "mean cosine of DINO CLS embeddings, image x each reference; higher = more content copied",
}


@torch.no_grad()
def gram_embeds(dino, images: list, batch_size: int = 16) -> torch.Tensor:
    """(N, D*D) L2-normalised, flattened Gram matrices of the DINO patch tokens of `images`."""
    out = []
    for start in range(0, len(images), batch_size):
        pixels = encoders.dino_preprocess(images[start : start + batch_size]).to(dino.device)
        patches = dino.model(pixel_values=pixels).last_hidden_state[:, 1:].float()  # (B, P, D)
        gram = patches.transpose(1, 2) @ patches / patches.shape[1]  # (B, D, D)
        out.append(torch.nn.functional.normalize(gram.flatten(1), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def reference_embeds(clip, dino, references: list) -> dict[str, torch.Tensor]:
    """What every score of `style_scores` compares with, computed once per reference set."""
    return {"clip": clip.image_embeds(references), "dino": dino.image_embeds(references),
            "gram": gram_embeds(dino, references)}


@torch.no_grad()
def style_scores(images: list, prompts: list[str], refs: dict[str, torch.Tensor], clip, dino,
                 content: str | None) -> dict[str, np.ndarray]:
    """(N,) arrays of every metric of STYLE_METRICS (leakage left out without a content caption)."""
    gen_clip = clip.image_embeds(images)
    scores = {
        "style_clip": encoders.per_image_pairwise_cosine(gen_clip, refs["clip"]).numpy(),
        "style_gram": encoders.per_image_pairwise_cosine(gram_embeds(dino, images), refs["gram"]).numpy(),
        "clip_t": encoders.per_image_clip_t(gen_clip, clip.text_embeds(prompts)).numpy(),
        "content_dino": encoders.per_image_pairwise_cosine(dino.image_embeds(images), refs["dino"]).numpy(),
    }
    if content:
        scores["leakage"] = encoders.per_image_clip_t(gen_clip, clip.text_embeds([content] * len(images))).numpy()
    return scores
