"""Proxy synthesis: the tuned teacher generates the student's training set."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from proxytune.spec.common import PositiveFloat, PositiveInt, Probability, ScoredCuration, Seed, Strict


def _check_template(value: str) -> str:
    if "{token}" not in value:
        raise ValueError("must contain '{token}' (the identifier the teacher learned)")
    try:
        value.format(token="x", **{"class": "y"})
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"only {{token}} and {{class}} may be used ({err})") from None
    return value


class FilterSpec(Strict):
    """Drop proxies whose image embedding is far from the references' (off by default)."""

    enabled: bool = Field(default=False, description="Run the quality filter after generation.")
    metric: Literal["dino", "clip"] = Field(default="dino", description="Embedding: DINO CLS or CLIP image.")
    model: str = Field(default="tiny-dino", description="Encoder: built-in tiny name, local path or hub id.")
    min_similarity: float | None = Field(default=None, ge=-1, le=1,
                                         description="Drop proxies whose mean cosine to the references is below this.")
    drop_fraction: Probability | None = Field(default=None, lt=1, description="Drop this fraction, the least similar first.")

    @model_validator(mode="after")
    def _one_rule(self):
        if self.enabled and (self.min_similarity is None) == (self.drop_fraction is None):
            raise ValueError("set exactly one of min_similarity and drop_fraction")
        return self


class FidelitySpec(ScoredCuration):
    """Every proxy scored against the subject's references, and curation by that score (issue 29)."""

    enabled: bool = Field(
        default=True,
        description="Score every generated proxy: mean cosine to the references with the evaluation's DINO and CLIP "
        "(evaluation.dino_model, evaluation.clip_model) and, for a toy subject, the oracle's reading (0/1: the whole "
        "subject shown). Recorded per proxy in proxy/manifest.json, summarised in proxy_metrics.json and the report.",
    )
    metric: Literal["dino", "clip_i"] = Field(
        default="dino", description="The score that ranks proxies (curation), draws the report's histogram and meets "
        "`threshold`.")
    threshold: float = Field(
        default=0.5, ge=-1, le=1,
        description="A proxy scoring above this on `metric` counts as faithful (the share is reported and gated). "
        "Encoder-specific: read the report's histogram of a first run before setting it.")
    min_share: Probability | None = Field(
        default=None,
        description="Gate: fail the synthesis stage when fewer than this share of the kept proxies score above "
        "`threshold` (null: no gate).")
    keep: PositiveInt | None = Field(
        default=None,
        description="Curation: keep the N most faithful of the num_images generated, most faithful first (what the "
        "codes stage and student.num_proxy_images read); null keeps every proxy in generation order.")
    diversity: float = Field(
        default=0.0, ge=0, lt=1,
        description="Curation's diversity weight w: each next pick maximises (1 - w) * score - w * (its largest "
        "cosine to a proxy already kept, same embedding), so near-duplicates do not crowd out poses and scenes. "
        "0 = by score alone.")


class SynthesisSpec(Strict):
    num_images: PositiveInt = Field(default=1000, description="Proxy images to generate (the paper uses ~1000).")
    prompt: str = Field(
        default="a {token} {class}",
        description="Prompt template; {token} and {class} are filled from the subject.",
    )
    num_inference_steps: PositiveInt = Field(default=30, description="Denoising steps per image.")
    guidance_scale: float = Field(default=7.5, ge=1.0, description="Classifier-free guidance scale.")
    batch_size: PositiveInt = Field(default=4, description="Images per pipeline call.")
    seed: Seed = Field(default=0, description="Image i gets seed `seed + i`, whatever the batching.")
    lora_scale: PositiveFloat = Field(default=1.0, description="Scale of the fused teacher LoRA.")
    templates: list[str] = Field(
        default=[],
        description="Extra context prompts, e.g. 'a {token} {class} on the beach'; image i gets prompt "
        "i mod (1 + len(templates)) of [prompt, *templates].",
    )
    processes: PositiveInt = Field(default=1, description="Data-parallel processes (accelerate launch) sharing the blocks.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Weights dtype of the tuned teacher while it generates (synthesis, curation and the "
        "evaluation's teacher samples). auto: bfloat16 on a CUDA GPU that has it, else float32 (so CPU runs stay "
        "float32). float16 matches SD3-medium's release; on CPU it is slow. Training uses teacher.mixed_precision.",
    )
    cpu_offload: bool = Field(
        default=False,
        description="Model CPU offload while the tuned teacher generates (synthesis, curation, the evaluation's "
        "teacher samples): each model (text encoders, denoiser, VAE) sits on the GPU only while it runs, so the "
        "peak is the largest model, not all of them (FLUX: the 9.5 GiB T5-XXL leaves while the transformer runs), "
        "for some time per batch moving weights. Same images. CUDA only: on CPU it is skipped with a note.",
    )
    quantize: Literal["none", "int8", "fp8", "nf4"] = Field(
        default="none",
        description="The tuned teacher generates (same stages as cpu_offload) from a quantised base denoiser "
        "(torchao, as teacher.quantize) with its LoRA beside it, unfused: int8 or fp8 about half the denoiser's bf16 "
        "bytes (a FLUX.1-dev transformer: 11 GiB instead of 22), nf4 about a quarter (6 GiB), for the rounding of "
        "its Linear weights (nf4 the most) and some speed. CPU and CUDA; needs `pip install 'proxytune[quantize]'`.",
    )
    vae_tiling: bool = Field(
        default=False,
        description="Decode latents in overlapping tiles (diffusers' VAE tiling: tiles of the VAE config's "
        "sample_size pixels, 512 for SD1.5, 1024 for SDXL/SD3/FLUX, blended at the seams): the VAE's memory stays "
        "that of one tile at any resolution. Images change slightly at the seams; no effect at or below the tile "
        "size. Same stages as cpu_offload.",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the teacher's denoiser (UNet or transformer) for generation, static shapes: "
        "compiled once at the first batch (140-200 s for tiny-sd on a 2-core CPU; far less from inductor's disk "
        "cache), then faster denoising (0.87-0.94x eager on that CPU, docs/benchmarks.md; not measured on a GPU). "
        "Pays for large proxy sets; a smaller last batch compiles once more. Images may "
        "differ from eager ones by float rounding (1/255 measured), so it is part of what names the proxy set.",
    )
    filter: FilterSpec = Field(default_factory=FilterSpec,
                               description="Optional quality filter on the proxies (older; fidelity.keep curates by "
                               "the same kind of score and records every score).")
    fidelity: FidelitySpec = Field(default_factory=FidelitySpec,
                                   description="Every proxy scored against the references; curation and a gate on it.")

    @model_validator(mode="after")
    def _curation_fits(self):
        keep = self.fidelity.keep
        if keep is not None and keep > self.num_images:
            raise ValueError(f"fidelity.keep ({keep}) is more than num_images ({self.num_images}): generate at least "
                             "as many proxies as you keep")
        if keep is not None and self.filter.enabled:
            raise ValueError("set one of filter (enabled) and fidelity.keep: both drop proxies; fidelity.keep "
                             "replaces the filter (keep = num_images minus the filter's drop)")
        return self

    @field_validator("prompt")
    @classmethod
    def _has_token(cls, value: str) -> str:
        return _check_template(value)

    @field_validator("templates")
    @classmethod
    def _templates(cls, values: list[str]) -> list[str]:
        return [_check_template(v) for v in values]
