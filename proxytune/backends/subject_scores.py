"""proxytune's subject metrics, per image, DreamBench conventions: CLIP-I and DINO (mean cosine of an image
with every reference), CLIP-T (raw cosine of an image with its prompt, identifier removed).

Registered in `proxytune.metrics` by `register_builtins`; import-light (the encoders arrive in ScoringInputs).
"""

from __future__ import annotations

from proxytune.metrics import Metric, ScoringInputs, register

NOTE = "CLIP-I and DINO: mean cosine over all generated x reference pairs; CLIP-T: raw cosine, identifier removed."


def _clip_embeds(inputs: ScoringInputs):
    """The images' CLIP embeddings, computed once per model (CLIP-I and CLIP-T both read them)."""
    if "clip_embeds" not in inputs.cache:
        inputs.cache["clip_embeds"] = inputs.encoders["clip"].image_embeds(inputs.flat)
    return inputs.cache["clip_embeds"]


def clip_i(inputs: ScoringInputs):
    from proxytune.backends import encoders

    return encoders.per_image_pairwise_cosine(_clip_embeds(inputs), inputs.references["clip"]).numpy()


def clip_t(inputs: ScoringInputs):
    from proxytune.backends import encoders
    from proxytune.backends.dreambench_prompts import strip_identifier

    texts = [strip_identifier(p, inputs.token) for p, group in zip(inputs.prompts, inputs.images) for _ in group]
    return encoders.per_image_clip_t(_clip_embeds(inputs), inputs.encoders["clip"].text_embeds(texts)).numpy()


def dino(inputs: ScoringInputs):
    from proxytune.backends import encoders

    return encoders.per_image_pairwise_cosine(inputs.encoders["dino"].image_embeds(inputs.flat),
                                              inputs.references["dino"]).numpy()


def register_metrics() -> None:
    for name, label, needs, score, description in (
        ("clip_i", "CLIP-I", "clip", clip_i, "mean CLIP image cosine of each image with every reference"),
        ("clip_t", "CLIP-T", "clip", clip_t, "CLIP cosine of each image with its prompt, identifier removed"),
        ("dino", "DINO", "dino", dino, "mean DINO cosine of each image with every reference"),
    ):
        register(Metric(name=name, label=label, scope="subject", description=description, score=score,
                        needs=(needs,), note=NOTE))


def per_image_scores(images: list[list], prompts: list[str], token: str, clip, dino_encoder, ref_clip, ref_dino) -> dict:
    """(N,) arrays of CLIP-I, CLIP-T and DINO per image, prompt-major (what the evaluation's score step computes)."""
    inputs = ScoringInputs(images=images, prompts=prompts, token=token, encoders={"clip": clip, "dino": dino_encoder},
                           references={"clip": ref_clip, "dino": ref_dino})
    return {"clip_i": clip_i(inputs), "clip_t": clip_t(inputs), "dino": dino(inputs)}
