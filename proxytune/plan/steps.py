"""The steps `plan` traces: what each stage runs on the accelerator, at batch 1, on fake inputs.

Each `*_step` returns (build, step) for `trace.trace_step`: `build` makes the (shallow) module on the
meta device with the stage's dtypes and LoRA, `step` makes inputs of the stage's shapes and runs
forward (and backward for training) as the stage does: a float32 loss, autocast when the spec asks for
mixed precision (CPU autocast stands in for CUDA's; both keep matmuls in bf16 and reductions in fp32).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from proxytune.plan.models import Component, build

HALF = torch.bfloat16


@dataclass(frozen=True)
class Options:
    """What changes a trace: precision of the frozen weights and of the compute, checkpointing, LoRA."""

    weights: str = "float32"  # dtype of the frozen weights
    autocast: bool = False  # mixed precision (bf16 compute)
    checkpointing: bool = False
    lora_rank: int = 0  # 0: every parameter trains (a full fine-tune)
    lora_targets: tuple[str, ...] | str = ()

    def key(self) -> dict:
        return {"weights": self.weights, "autocast": self.autocast, "checkpointing": self.checkpointing,
                "lora_rank": self.lora_rank, "lora_targets": self.lora_targets}


def _autocast(options: Options):
    return torch.autocast("cpu", dtype=HALF) if options.autocast else contextlib.nullcontext()


def _prepare(module, options: Options, *, train: bool):
    """Cast, freeze, add the LoRA (trainable in float32, as the stages keep it) and checkpointing."""
    module.requires_grad_(False)
    module.to(getattr(torch, options.weights))
    if not train:
        return module.eval()
    if options.lora_rank:
        from peft import LoraConfig, inject_adapter_in_model

        targets = options.lora_targets if isinstance(options.lora_targets, str) else list(options.lora_targets)
        inject_adapter_in_model(LoraConfig(r=options.lora_rank, lora_alpha=options.lora_rank, target_modules=targets), module)
        for name, param in module.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)
                param.data = param.data.float()
    else:  # a full fine-tune trains every weight in the dtype it was loaded in
        module.requires_grad_(True)
    if options.checkpointing:
        if hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()
        else:  # as the student stage does it (transformers 5 warns that the name will change)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return module.train()


# -- teacher denoisers ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DenoiserShape:
    family: str
    latent: int  # latent pixels per side
    clip_tokens: int = 77
    t5_tokens: int = 0


def denoiser_inputs(component: Component, shape: DenoiserShape, batch: int, dtype: torch.dtype) -> dict:
    """Keyword arguments of one denoiser call for `batch` images, as `backends.teachers.diffusion.predict` passes them."""
    cfg, h, B = component.config, shape.latent, batch
    t = torch.full((B,), 500.0)
    if component.kind == "unet":
        args = {"sample": torch.randn(B, cfg.get("in_channels", 4), h, h, dtype=dtype), "timestep": t,
                "encoder_hidden_states": torch.randn(B, shape.clip_tokens, cfg.get("cross_attention_dim", 1280), dtype=dtype)}
        if cfg.get("addition_embed_type") == "text_time":
            time_dim = cfg["addition_time_embed_dim"]
            args["added_cond_kwargs"] = {
                "text_embeds": torch.randn(B, cfg["projection_class_embeddings_input_dim"] - 6 * time_dim, dtype=dtype),
                "time_ids": torch.randn(B, 6, dtype=dtype)}
        return args
    if component.kind == "sd3":
        return {"hidden_states": torch.randn(B, cfg.get("in_channels", 16), h, h, dtype=dtype), "timestep": t,
                "encoder_hidden_states": torch.randn(B, shape.clip_tokens + shape.t5_tokens, cfg["joint_attention_dim"], dtype=dtype),
                "pooled_projections": torch.randn(B, cfg["pooled_projection_dim"], dtype=dtype)}
    tokens = (h // 2) ** 2  # FLUX packs 2x2 latent patches
    args = {"hidden_states": torch.randn(B, tokens, cfg.get("in_channels", 64), dtype=dtype), "timestep": t / 1000,
            "encoder_hidden_states": torch.randn(B, shape.t5_tokens, cfg["joint_attention_dim"], dtype=dtype),
            "pooled_projections": torch.randn(B, cfg["pooled_projection_dim"], dtype=dtype),
            "img_ids": torch.zeros(tokens, 3, dtype=dtype), "txt_ids": torch.zeros(shape.t5_tokens, 3, dtype=dtype)}
    if cfg.get("guidance_embeds"):
        args["guidance"] = torch.full((B,), 1.0, dtype=dtype)
    return args


def denoiser_step(component: Component, shape: DenoiserShape, options: Options, *, train: bool, batch: int = 1):
    """One teacher training step (MSE on the prediction) or one sampling call (no_grad)."""

    def make():
        return _prepare(build(component), options, train=train)

    def step(model):
        dtype = getattr(torch, options.weights)
        with _autocast(options), (contextlib.nullcontext() if train else torch.no_grad()):
            out = model(**denoiser_inputs(component, shape, batch, dtype), return_dict=False)[0]
            if train:
                target = torch.randn(out.shape)
                loss = F.mse_loss(out.float(), target)
        if train:
            loss.backward()

    return make, step


def vae_decode_step(component: Component, latent: int, dtype: str):
    """Decoding one image's latents (synthesis and sampling decode the batch at once)."""

    def make():
        return _prepare(build(component), Options(weights=dtype), train=False)

    def step(model):
        with torch.no_grad():
            model.decode(torch.randn(1, component.config.get("latent_channels", 4), latent, latent,
                                     dtype=getattr(torch, dtype)))

    return make, step


# -- students ------------------------------------------------------------------------------------
def student_sequence(component: Component, image_size: int, prompt_tokens: int) -> tuple[int, int]:
    """(tokens the model reads, image codes it predicts) for one training example."""
    if component.kind == "llamagen":
        codes = component.config.get("grid_size", 16) ** 2
        return component.config.get("cond_len", 120) + codes, codes
    grid = image_size // 16
    if component.kind == "chameleon":  # codes with a row-end token per row, plus begin/size/end tokens
        return prompt_tokens + grid * (grid + 1) + 3, grid * grid
    return prompt_tokens + grid * grid, grid * grid


def student_step(component: Component, image_size: int, prompt_tokens: int, options: Options, batch: int = 1):
    """One student training step: teacher-forced cross-entropy on the image codes, logits in float32
    (Lumina-mGPT: its full-vocabulary loss over the image turn, chunked as `lumina.vocabulary_terms` runs it)."""
    seq, codes = student_sequence(component, image_size, prompt_tokens)

    def make():
        return _prepare(build(component), options, train=True)

    def step(model):
        dtype = getattr(torch, options.weights)
        with _autocast(options):
            if component.kind == "llamagen":
                cfg = component.config
                # real captions are padded to cond_len, so training takes the masked path; which rows are
                # padding is data the fake tensors do not have, so the mask is built here
                model.attention_mask = lambda feats, start, end: torch.ones(
                    feats.shape[0], 1, end - start, end, dtype=torch.bool).tril(start)
                logits = model(torch.randn(batch, cfg.get("cond_len", 120), cfg.get("text_dim", 2048), dtype=dtype),
                               torch.randint(0, cfg.get("codebook_size", 16384), (batch, codes)),
                               torch.zeros(batch, dtype=torch.bool))
            elif component.kind == "chameleon":  # Lumina-mGPT's loss: the image turn's labels, in chunks of positions
                from proxytune.backends.students.lumina.backend import LOSS_CHUNK, vocabulary_terms

                hidden = model.model(input_ids=torch.randint(0, 1000, (batch, seq))).last_hidden_state
                turn = seq - prompt_tokens
                ce, z = vocabulary_terms(model.lm_head, hidden[:, -turn:], torch.randint(0, 1000, (batch, turn)), LOSS_CHUNK)
                (ce.mean() + 1e-5 * z.mean()).backward()
                return
            else:  # janus: prompt embeddings, then the image codes through the generation aligner and head
                inner = model.model
                text = inner.language_model.get_input_embeddings()(torch.randint(0, 1000, (batch, seq - codes)))
                image = inner.generation_aligner(inner.generation_embeddings(torch.randint(0, 1000, (batch, codes))))
                hidden = inner.language_model(inputs_embeds=torch.cat([text, image.to(text.dtype)], 1)).last_hidden_state
                logits = inner.generation_head(hidden[:, -codes:])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), torch.randint(0, logits.shape[-1], (logits.shape[0] * logits.shape[1],)))
        loss.backward()

    return make, step


def encoder_step(component: Component, image_size: int, dtype: str):
    """Encoding one image to codes (the codes stage)."""

    def make():
        return _prepare(build(component), Options(weights=dtype), train=False)

    def step(model):
        with torch.no_grad():
            model.encode(torch.randn(1, 3, image_size, image_size, dtype=getattr(torch, dtype)))

    return make, step
