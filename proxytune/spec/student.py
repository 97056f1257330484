"""Student: LoRA on an autoregressive image generator, trained on proxy images only."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationError, ValidationInfo, create_model, field_validator, model_validator

from proxytune.spec.evaluation import Metric
from proxytune.backends import students
from proxytune.backends.students import STYLEAR_SAMPLING
from proxytune.spec.common import (
    Seed,
    PositiveFloat,
    PlainName,
    PositiveInt,
    Probability,
    Strict,
    model_ref_checker,
)

def _student_models() -> tuple[str, ...]:
    from proxytune import builtins

    return builtins.model_names("student")


StudentModel = Annotated[str, model_ref_checker(_student_models)]


def _defaults(field: str) -> str:
    """Each family's default for a sampler field, from its record: "LlamaGen 7.5, ..."."""
    values = [(record.label, getattr(record.sampling, field)) for record in students.families().values()]
    return ", ".join(f"{label} {'none' if value is None else value}" for label, value in values)


class StudentLoraSpec(Strict):
    rank: PositiveInt = Field(default=16, description="LoRA rank r.")
    alpha: PositiveFloat = Field(default=16.0, description="LoRA alpha.")
    dropout: Probability = Field(default=0.0, description="LoRA dropout.")
    groups: list[Literal["attention", "mlp"]] = Field(
        default=["attention", "mlp"], min_length=1,
        description="Module groups of the language model that get LoRA (selective layer tuning).",
    )
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, description="Only these decoder layers get LoRA (peft layers_to_transform); null = all."
    )


class SamplingSpec(Strict):
    """Sampler settings; a field left unset (null) takes the student family's own default, the one its
    authors ship (its record's `SamplerDefaults`, proxytune.backends.students). The values used are recorded."""

    cfg_scale: Annotated[float, Field(ge=1.0)] | None = Field(
        default=None,
        description=f"Classifier-free guidance scale. null = the backend's default: {_defaults('cfg_scale')} "
        f"(a style student: StyleAR's {STYLEAR_SAMPLING.cfg_scale}).",
    )
    top_k: PositiveInt | None = Field(
        default=None,
        description="Sample among the k most likely codes (a k >= the codebook size keeps all). null = the backend's "
        f"default: {_defaults('top_k')}.",
    )
    temperature: Annotated[float, Field(ge=0)] | None = Field(
        default=None,
        description=f"Sampling temperature; 0 = greedy. null = the backend's default: {_defaults('temperature')}.",
    )


class RegularisersSpec(Strict):
    """From the VAR subject-driven seed: keep the base model's prior, favour coarse (early) tokens."""

    prior_distillation: float = Field(
        default=0.0, ge=0,
        description="Weight of KL(base || tuned) on class-prompt samples of the base model (adapter disabled, no copy).",
    )
    prior_prompt: str = Field(default="a {class}", description="Prompt of the distillation samples.")
    prior_samples: PositiveInt = Field(default=8, description="Class-prompt samples drawn once from the base student.")
    position_weighting: float = Field(
        default=0.0, ge=0,
        description="Strength s of w_t = exp(-s t / L) (normalised to mean 1): early, coarse tokens weigh more. 0 = uniform.",
    )


class StudentSettings(Strict):
    """The fields of one student (StudentSpec adds its variants)."""

    recipe: Literal["proxy", "direct-lora", "direct-full", "augment"] = Field(
        default="proxy",
        description="proxy: LoRA on the proxy set (the method). Baselines: direct-lora (LoRA on the real references), "
        "direct-full (full fine-tuning on the references), augment (LoRA on flip/rotate/crop copies of the references).",
    )
    multi_subject: bool = Field(
        default=False,
        description="One student learns every subject of the experiment (each its own token) from the union of "
        "their proxy sets; evaluation stays per subject.",
    )
    num_proxy_images: PositiveInt | None = Field(default=None, description="Train on the first N proxies (size sweeps); null = all.")
    augment_copies: PositiveInt = Field(default=200, description="Size of the augmented reference set (recipe augment).")
    model: StudentModel = Field(
        default="tiny-llamagen",
        description="AR student: built-in tiny name, or a local folder / hub id in proxytune's student layout.",
    )
    lora: StudentLoraSpec = Field(default_factory=StudentLoraSpec, description="LoRA on the transformer.")
    steps: PositiveInt = Field(default=1000, description="Optimiser steps.")
    batch_size: PositiveInt = Field(default=8, description="Proxy images per micro-batch (per process).")
    gradient_accumulation_steps: PositiveInt = Field(
        default=1,
        description="Micro-batches whose mean gradient makes one optimiser step: batch_size x this x processes "
        "images per step; `steps` counts optimiser steps.",
    )
    learning_rate: PositiveFloat = Field(default=1e-4, description="AdamW learning rate (LlamaGen default).")
    betas: tuple[float, float] = Field(default=(0.9, 0.95), description="AdamW betas (LlamaGen default).")
    weight_decay: float = Field(default=0.05, ge=0, description="AdamW weight decay (LlamaGen default).")
    max_grad_norm: PositiveFloat = Field(default=1.0, description="Gradient clipping norm.")
    cfg_dropout: Probability = Field(default=0.1, description="Probability a caption is swapped for the uncond embedding.")
    dropout: Probability | None = Field(
        default=None,
        description="Dropout while training on the input embeddings, each attention block's output and each FFN's "
        "output (LlamaGen's token, residual and FFN dropout; attention weights get none, as in the original). "
        "null = the backend's original: 0.1 for llamagen (its training default); other backends have no such option "
        "(only null or 0).",
    )
    checkpoint_every: PositiveInt = Field(default=250, description="Save a resumable checkpoint every N steps.")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="How the student samples images.")
    seed_offset: Seed = Field(default=0, description="Added to the experiment seed for this stage.")
    regularisers: RegularisersSpec = Field(default_factory=RegularisersSpec, description="VAR-style regularisers.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(default="no", description="Autocast dtype (LoRA params stay fp32); fp16 scales the loss (GradScaler, saved in checkpoints).")
    gradient_checkpointing: bool = Field(default=False, description="Trade compute for activation memory.")
    compile: bool = Field(
        default=False,
        description="torch.compile the training forward and loss (the transformer with its LoRA, dropout and "
        "gradient checkpointing, and the cross-entropy), static shapes: one compile, paid once at the first step "
        "(about 50 s for the tiny student on a 2-core CPU; less from inductor's disk cache), then faster steps "
        "(0.83x eager there, docs/benchmarks.md; not measured on a GPU). With dropout, inductor draws its own "
        "masks. Sampling stays eager; adapters and checkpoints are the same as without it (a run may resume "
        "with it flipped).",
    )
    use_8bit_adam: bool = Field(
        default=False,
        description="8-bit AdamW (torchao's AdamW8bit: both moments in blocks of 256 int8 values with a scale each, "
        "about 2 bytes a trained parameter instead of 8; tensors under 4096 values keep float32 moments). CPU and "
        "CUDA; needs `pip install 'proxytune[quantize]'`; its update step is compiled with torch.compile on first use.",
    )
    processes: PositiveInt = Field(default=1, description="Data-parallel processes (accelerate launch); batch_size is per process.")
    sharding: Literal["none", "fsdp"] = Field(
        default="none",
        description="fsdp: shard the trained model's weights, gradients and AdamW state over the `processes` "
        "(torch's FSDP2, one shard group per decoder layer), so each GPU holds 1/processes of them: a direct-full "
        "baseline too big for one GPU. LoRA recipes shard the frozen base and the LoRA alike. Checkpoints and the "
        "saved student hold the full weights (gathered to the first process). Needs processes >= 2; not with "
        "use_8bit_adam, compile or fp16 (use bf16). none: every process holds the whole model (DDP).",
    )

    @field_validator("sharding")
    @classmethod
    def _sharding_needs_processes(cls, value: str, info: ValidationInfo) -> str:
        if value == "none":
            return value
        if info.data.get("processes", 1) < 2:
            raise ValueError("fsdp shards over student.processes, which is 1; set processes: 2 or more "
                             "(one per GPU), or sharding: none")
        if info.data.get("use_8bit_adam"):
            raise ValueError("fsdp with use_8bit_adam is not supported (untested: torchao's 8-bit states on "
                             "sharded tensors); set use_8bit_adam: false or sharding: none")
        if info.data.get("mixed_precision") == "fp16":
            raise ValueError("fsdp with mixed_precision: fp16 is not supported (its loss scaler does not see "
                             "sharded gradients); use mixed_precision: bf16 or no")
        if info.data.get("compile"):
            raise ValueError("fsdp with compile: true is not supported (untested: torch.compile over FSDP2's "
                             "gathered layers); set compile: false or sharding: none")
        return value

    @model_validator(mode="after")
    def _distillation_needs_lora(self):
        if self.recipe == "direct-full" and self.regularisers.prior_distillation > 0:
            raise ValueError("regularisers.prior_distillation needs a LoRA recipe (it disables the adapter for the base logits)")
        return self


# What a variant may change: any student field but the model (its codes are the shared codes stage's)
# and multi_subject; every field optional, given ones are merged over the main student section.
_FIXED = ("model", "multi_subject")
StudentVariantSpec = create_model(
    "StudentVariantSpec",
    __base__=Strict,
    __doc__="Changes to the main student section for one variant (unset fields are inherited).",
    **{
        name: ((Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation) | None,
               Field(default=None, description=field.description))
        for name, field in StudentSettings.model_fields.items()
        if name not in _FIXED
    },
)


def _merge(base: dict, changes: dict) -> dict:
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


class ProxyCountSpec(Strict):
    """Choose the proxy count by measurement: train on the first N proxies for each N of `grow`, score each
    student on a held-out measure of the subject, stop when the score stops improving (docs/proxy-count.md)."""

    grow: list[PositiveInt] = Field(
        min_length=2,
        description="Proxy counts to try, strictly increasing, e.g. [128, 256, 512, 1000]; step i trains on the "
        "first N proxies of the manifest (with curation: the most faithful first).",
    )
    stop_when: Literal["paired", "plateau"] = Field(
        default="paired",
        description="paired: every step is scored on the same held-out prompts and seeds; stop at the first step "
        "whose gain over the previous one (image by image, 95% interval resampling prompts) is not clear of 0 "
        "(lower end <= 0): the previous N is chosen. plateau: stop at the first step whose held-out mean lies inside "
        "or below the previous step's 95% interval (unpaired: can miss a gain that every prompt shares). Either way the "
        "growth also stops when the proxy set runs out (a step needs more proxies than the set holds: that step "
        "trains on all of them and is the last).",
    )
    metric: Metric | None = Field(
        default=None,
        description="Held-out score: null = subject_acc (the toy world oracle's) for toy subjects, dino otherwise.",
    )
    prompts: Annotated[int, Field(ge=2, strict=True)] = Field(
        default=8, description="Held-out prompts: the first N of the evaluation's prompt set (at least 2: the "
        "interval resamples prompts).")
    images_per_prompt: PositiveInt = Field(default=8, description="Held-out images per prompt and step (the same "
        "seeds at every step); more images see smaller gains, at more student sampling per step.")

    @model_validator(mode="after")
    def _increasing(self):
        if any(b <= a for a, b in zip(self.grow, self.grow[1:])):
            raise ValueError(f"grow: the counts must be strictly increasing (got {self.grow}), e.g. [128, 256, 512, 1000]")
        return self


class StudentSpec(StudentSettings):
    proxy_count: ProxyCountSpec | None = Field(
        default=None,
        description="Grow the proxy set in steps and keep the count where the held-out subject score stops "
        "improving (e.g. {grow: [128, 256, 512, 1000]}); null = train on num_proxy_images (all by default).",
    )
    variants: dict[PlainName, StudentVariantSpec] = Field(
        default_factory=dict,
        description="More students of the same subjects, sharing this experiment's teacher, proxies and codes: "
        "name -> the student fields that differ (baselines: {recipe: direct-lora}; size sweeps: "
        "{num_proxy_images: 250}). Variant V of experiment E runs as E--V.",
    )

    def variant(self, name: str) -> StudentSettings:
        """The merged student section of one variant."""
        changes = self.variants[name].model_dump(mode="json", exclude_unset=True)
        base = self.model_dump(mode="json", exclude={"variants", "proxy_count"})  # a variant trains on a fixed count
        return StudentSettings.model_validate(_merge(base, changes))

    @model_validator(mode="after")
    def _proxy_count_alone(self):
        if self.proxy_count is None:
            return self
        if self.recipe != "proxy":
            raise ValueError(f"proxy_count: grows the proxy set, so it needs recipe: proxy (got {self.recipe!r})")
        if self.num_proxy_images is not None:
            raise ValueError("proxy_count: the count is chosen by measurement; remove num_proxy_images")
        if self.multi_subject:
            raise ValueError("proxy_count: not with multi_subject (each subject's count is chosen on its own)")
        from proxytune.layout import GROW_VARIANT

        taken = [name for name in self.variants if name.startswith(GROW_VARIANT)]
        if taken:
            raise ValueError(f"variants.{taken[0]}: names starting with {GROW_VARIANT!r} are the proxy_count steps'; rename it")
        return self

    @model_validator(mode="after")
    def _variants_are_valid_students(self):
        for name in self.variants:
            try:
                self.variant(name)
            except ValidationError as err:
                raise ValueError(f"variants.{name}: {err.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        return self
