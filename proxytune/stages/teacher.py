"""Teacher stage: DreamBooth LoRA on a diffusion model's denoiser.

Binds "a {token} {class}" to the reference photos. Inputs: the reference folder and the params
file. Output folder `teacher/`: pytorch_lora_weights.safetensors (diffusers LoRA format, loads with
`pipe.load_lora_weights`), samples.png, record.json (MLflow run id, registered version, digests).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from proxytune import faults
from proxytune.backends import diffusion
from proxytune.files import digest_files, sha256_file, staged_dir
from proxytune.images import grid, list_images, load_references
from proxytune.stages import common
from proxytune.stages.params import StageParams, load_params


@dataclass
class TrainingProgress:
    """Everything beyond the weights that a resumed run needs to continue bit for bit."""

    step: int = 0
    losses: list[float] = field(default_factory=list)


class TeacherRecipe:
    def __init__(self, params: StageParams):
        self.params = params
        self.cfg = params.teacher
        self.device = common.device()
        self.weight_dtype = common.dtype_of(self.cfg.mixed_precision)
        self.prompt = f"a {params.subject.token} {params.subject.class_noun}"

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.generator = common.seed_everything(self.params.seed)
        self.pipe = diffusion.load_pipeline(cfg.model, revision=cfg.revision, dtype=self.weight_dtype)
        self.pipe.set_progress_bar_config(disable=True)
        from diffusers import DDPMScheduler

        # Training noise follows the checkpoint's own schedule and prediction type.
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.to(self.device)
        if self.weight_dtype != torch.float32:
            self.pipe.vae.to(torch.float32)  # an fp16 VAE gives NaNs (SDXL); encoding is one-off anyway

        self.reference_files = list_images(self.params.references_dir)
        self.references = load_references(self.params.references_dir, cfg.resolution)
        self._cache_inputs()
        torch.manual_seed(self.params.seed)  # LoRA init draws from the global RNG
        self.trainable = diffusion.add_lora(
            self.pipe.unet, rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules
        )
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            "constant_with_warmup", self.optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps
        )
        self.progress = TrainingProgress()
        self.checkpoint_dir = self.params.work("teacher") / common.config_key(
            self.params.seed, self.params.subject.model_dump(), cfg.model_dump(), self.references_digest
        )
        self._maybe_resume()

    @torch.no_grad()
    def _cache_inputs(self) -> None:
        """Encode every reference (plain and flipped) and the prompt once, keyed by dataset index.

        The VAE posterior (mean, std) is cached rather than one sample, so every step still draws
        fresh latents; the flip is chosen per step from the cached pair.
        """
        vae = self.pipe.vae
        pixels = torch.stack([_to_tensor(image) for image in self.references]).to(self.device)  # (N, 3, H, W)
        both = torch.stack([pixels, pixels.flip(-1)], dim=1)  # (N, 2, 3, H, W)
        dist = vae.encode(both.flatten(0, 1).to(vae.dtype)).latent_dist
        shape = (len(self.references), 2, *dist.mean.shape[1:])
        self.latent_mean, self.latent_std = dist.mean.float().view(shape), dist.std.float().view(shape)  # (N, 2, C, h, w)
        ids = self.pipe.tokenizer(
            [self.prompt],
            padding="max_length",
            max_length=self.pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        self.prompt_embeds = self.pipe.text_encoder(ids)[0]  # (1, T, D)
        self.references_digest = digest_files([(p.name, sha256_file(p)) for p in self.reference_files])

    # -- checkpointing ---------------------------------------------------------------------------
    def _maybe_resume(self) -> None:
        checkpoint = common.load_checkpoint(self.checkpoint_dir)
        if checkpoint is None:
            return
        from peft.utils import set_peft_model_state_dict

        lora, state = checkpoint
        set_peft_model_state_dict(self.pipe.unet, lora)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.generator.set_state(state["generator"])
        self.progress = TrainingProgress(step=int(state["step"]), losses=list(state["losses"]))
        tqdm.write(f"teacher: resuming from step {self.progress.step} ({self.checkpoint_dir})")

    def save_checkpoint(self) -> None:
        """LoRA weights, optimiser, LR schedule, RNG and step."""
        from peft.utils import get_peft_model_state_dict

        state = {
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "step": self.progress.step,
            "losses": self.progress.losses,
        }
        common.save_checkpoint(self.checkpoint_dir, get_peft_model_state_dict(self.pipe.unet), state)

    # -- training ------------------------------------------------------------------------------
    def train_step(self) -> float:
        cfg, unet = self.cfg, self.pipe.unet
        g = self.generator
        # 1. pick references and a flip for this step (fresh each step, from our own generator)
        index = torch.randint(len(self.references), (cfg.batch_size,), generator=g)
        flip = (torch.rand(cfg.batch_size, generator=g) < 0.5).long() if cfg.random_flip else torch.zeros(cfg.batch_size, dtype=torch.long)
        # 2. latents ~ VAE posterior of those images, scaled as the denoiser expects
        mean, std = self.latent_mean[index, flip], self.latent_std[index, flip]
        eps = torch.randn(mean.shape, generator=g).to(self.device)
        latents = (mean + std * eps) * self.pipe.vae.config.scaling_factor
        # 3. forward diffusion at a random timestep
        noise = torch.randn(latents.shape, generator=g).to(self.device)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=g
        ).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        # 4. predict with the cached prompt embedding
        text = self.prompt_embeds.expand(cfg.batch_size, -1, -1)
        with torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=self.weight_dtype != torch.float32):
            pred = unet(noisy.to(self.weight_dtype), timesteps, text).sample
        # 5. target depends on what the checkpoint was trained to predict
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type {kind!r}")
        loss = F.mse_loss(pred.float(), target.float())
        # 6. update
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def train(self) -> None:
        cfg = self.cfg
        tqdm.write(
            f"teacher: {len(self.references)} references, prompt {self.prompt!r}, {cfg.steps} steps x batch "
            f"{cfg.batch_size}, LoRA rank {cfg.lora.rank}, {sum(p.numel() for p in self.trainable):,} trainable params"
        )
        self.pipe.unet.train()
        bar = tqdm(total=cfg.steps, initial=self.progress.step, desc="teacher", unit="step")
        while self.progress.step < cfg.steps:
            loss = self.train_step()
            self.progress.step += 1
            self.progress.losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if self.progress.step % cfg.checkpoint_every == 0 and self.progress.step < cfg.steps:
                self.save_checkpoint()
            faults.checkpoint("teacher", "step", self.progress.step)
        bar.close()
        self.pipe.unet.eval()

    @torch.no_grad()
    def sample_grid(self, count: int = 4):
        images = diffusion.generate(
            self.pipe,
            [self.prompt] * count,
            [self.params.synthesis.seed + i for i in range(count)],
            steps=self.params.synthesis.num_inference_steps,
            guidance=self.params.synthesis.guidance_scale,
            size=self.cfg.resolution,
        )
        return grid([self.references[:count], images], cell=min(self.cfg.resolution, 256))

    def save(self, out_dir: Path) -> None:
        run_tags = {
            "references_dir": str(self.params.references_dir),
            "references_digest": self.references_digest,
            "base_model": self.cfg.model,
        }
        with common.stage_run(self.params, "teacher", run_tags) as run, staged_dir(out_dir) as tmp:
            run.log_params({"teacher": self.cfg.model_dump(mode="json"), "seed": self.params.seed, "prompt": self.prompt})
            run.log_series("loss", self.progress.losses)
            run.log_dict({p.name: sha256_file(p) for p in self.reference_files}, "references.json")
            adapter = tmp / "adapter"
            adapter.mkdir()
            metadata = {"r": self.cfg.lora.rank, "lora_alpha": self.cfg.lora.alpha, "target_modules": self.cfg.lora.target_modules}
            diffusion.save_lora(type(self.pipe), self.pipe.unet, adapter, metadata)
            adapter_digest = sha256_file(adapter / diffusion.LORA_WEIGHT_NAME)
            self.sample_grid().save(tmp / "samples.png")
            run.log_artifact(tmp / "samples.png")
            version = run.register(
                adapter, "teacher", {"base_model": self.cfg.model, "backend": "diffusers", "adapter_digest": adapter_digest}
            )
            run.set_tags({"model_version": f"{run.experiment}.{run.subject}.teacher@{version}"})
            common.write_record(
                tmp,
                {
                    "stage": "teacher",
                    "run_id": run.run_id,
                    "model": f"{run.experiment}.{run.subject}.teacher",
                    "version": version,
                    "base_model": self.cfg.model,
                    "revision": self.cfg.revision,
                    "adapter_digest": adapter_digest,
                    "references_digest": self.references_digest,
                    "final_loss": self.progress.losses[-1],
                },
            )
        tqdm.write(f"teacher: registered {run.experiment}.{run.subject}.teacher version {version}")


def _to_tensor(image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    import numpy as np

    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return array.permute(2, 0, 1).contiguous()


def run(params_path: str | Path) -> None:
    params = load_params(params_path)
    recipe = TeacherRecipe(params)
    recipe.setup()
    recipe.train()
    recipe.save(params.out("teacher"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", required=True)
    run(parser.parse_args().params)
