"""Teacher stage: DreamBooth LoRA on a diffusion model's denoiser.

Binds "a {token} {class}" to the reference photos. Inputs: the reference folder and the params
file. Output folder `teacher/`: pytorch_lora_weights.safetensors (diffusers LoRA format, loads with
`pipe.load_lora_weights`), samples.png, record.json (MLflow run id, registered version, digests).
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from proxytune import faults
from proxytune.backends.teachers import diffusion
from proxytune.files import digest_files, sha256_bytes, sha256_file, staged_dir, write_png_atomic
from proxytune.images import grid, list_images, load_references
from proxytune.outputs import TeacherRecord, write_record
from proxytune.stages import training
from proxytune.stages.params import StageParams, load_params
from proxytune.stages.runtime import base_model_tags, config_key, device, seed_everything, stage_run
from proxytune.stages.teacher_setup import class_images, optimizer, to_tensor


SERIES = ("loss", "instance_loss", "prior_loss", "lr", "grad_norm")


class TeacherTrainer:
    """The teacher's training loop (setup, train_step, train, save), on `self.spec`: the params' teacher section."""

    def __init__(self, params: StageParams):
        self.params = params
        self.spec = params.teacher
        self.device = device()
        self.weight_dtype = training.dtype_of(self.spec.mixed_precision)
        self.prompt = params.instance_prompt  # "a {token} {class}", or a style's "a {class} in {token} style"
        self.class_prompt = self.spec.prior_preservation.class_prompt.format(**{"class": params.subject.class_noun})

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        spec = self.spec
        # accelerate: the process group (under `accelerate launch`), mixed precision, fp16 loss scaling
        self.accelerator = training.accelerator(spec.mixed_precision)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        seed_everything(self.params.seed)
        # Each process draws its own data and noise; rank 0 draws what a single process would.
        self.generator = torch.Generator().manual_seed(self.params.seed + 7919 * self.rank)
        self.pipe = diffusion.load_pipeline(spec.model, revision=spec.revision, dtype=self.weight_dtype,
                                            quantize=spec.quantize)
        self.pipe.set_progress_bar_config(disable=True)
        self.family = diffusion.family_of(self.pipe)
        self.denoiser = diffusion.denoiser(self.pipe)
        # Training noise follows the checkpoint's own schedule, prediction type and shift.
        self.noise_scheduler = diffusion.training_scheduler(self.pipe)
        self.pipe.to(self.device)
        if self.weight_dtype != torch.float32:
            self.pipe.vae.to(torch.float32)  # an fp16 VAE gives NaNs (SDXL); encoding is one-off anyway

        self.reference_files = list_images(self.params.references_dir)
        # With random crops, references are encoded `margin` latent cells larger on each side and every
        # step cuts a window of the training size from the cached latents.
        self.margin = max(1, spec.resolution // self.pipe.vae_scale_factor // 16) if spec.random_crop else 0
        self.references = load_references(self.params.references_dir, spec.resolution + 2 * self.margin * self.pipe.vae_scale_factor)
        self.class_images = class_images(self.pipe, spec, self.class_prompt) if spec.prior_preservation.enabled else []
        self._cache_inputs()
        torch.manual_seed(self.params.seed)  # LoRA init draws from the global RNG
        self.trainable = diffusion.add_lora(
            self.denoiser, rank=spec.lora.rank, alpha=spec.lora.alpha, target_modules=spec.lora.target_modules
        )
        groups = [{"params": self.trainable, "lr": spec.learning_rate}]
        if spec.train_text_encoder:
            text_params = diffusion.add_lora(self.pipe.text_encoder, rank=spec.lora.rank, alpha=spec.lora.alpha,
                                             target_modules=TEXT_ENCODER_TARGETS)
            groups.append({"params": text_params, "lr": spec.text_encoder_lr or spec.learning_rate})
            self.trainable = self.trainable + text_params
        if spec.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        # accelerate: the trained modules in one module for DDP (the training forward runs through it), the
        # optimiser that steps through the fp16 GradScaler, checkpoints that hold only the LoRA weights
        self.model, self.optimizer = training.prepare_training(
            self.accelerator, self._lora_modules(), optimizer(groups, spec),
            weights=self._lora_state, load_weights=self._load_lora_state)
        from diffusers.optimization import get_scheduler

        # not prepared: accelerate's scheduler wrapper would step it once per process
        self.lr_scheduler = get_scheduler(
            "constant_with_warmup", self.optimizer, num_warmup_steps=spec.lr_warmup_steps, num_training_steps=spec.steps
        )
        self.checkpoint_dir = self.params.work("teacher") / config_key(
            self.params.seed, self.params.subject.model_dump(), spec.model_dump(), self.references_digest
        )
        # checkpointed beside weights, optimiser, loss scale and global RNGs: step and curves, every process's
        # data/noise generator, the LR schedule
        self.progress = training.resume_training(self.accelerator, self.checkpoint_dir, "teacher", SERIES, self.generator,
                                                 self.lr_scheduler)

    @torch.no_grad()
    def _encode_posteriors(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 2, C, h, w) VAE posterior mean and std of each image, plain and flipped."""
        vae = self.pipe.vae
        pixels = torch.stack([to_tensor(image) for image in images]).to(self.device)  # (N, 3, H, W)
        both = torch.stack([pixels, pixels.flip(-1)], dim=1)  # (N, 2, 3, H, W)
        dist = vae.encode(both.flatten(0, 1).to(vae.dtype)).latent_dist
        shape = (len(images), 2, *dist.mean.shape[1:])
        return dist.mean.float().view(shape), dist.std.float().view(shape)

    @torch.no_grad()
    def _cache_inputs(self) -> None:
        """Encode every reference (plain and flipped) and the prompts once, keyed by dataset index.

        The VAE posterior (mean, std) is cached rather than one sample, so every step still draws
        fresh latents; the flip is chosen per step from the cached pair.
        """
        self.latent_mean, self.latent_std = self._encode_posteriors(self.references)
        if self.class_images:
            self.class_mean, self.class_std = self._encode_posteriors(self.class_images)
        self.sample_text = None
        if not self.spec.train_text_encoder:  # a trained text encoder re-encodes every step
            self.prompt_embeds = diffusion.encode_prompts(self.pipe, [self.prompt])
            self.class_embeds = diffusion.encode_prompts(self.pipe, [self.class_prompt]) if self.class_images else None
            # the sample grids' text too; then the text encoders leave the GPU for good (FLUX's T5-XXL would
            # otherwise hold 9.5 GB through training); the class images are generated by now
            self.sample_text = diffusion.generation_text(self.pipe, self.prompt,
                                                         guidance=self.params.synthesis.guidance_scale)
            diffusion.free_text_encoders(self.pipe)
        self.references_digest = digest_files([(p.name, sha256_file(p)) for p in self.reference_files])

    # -- checkpointing ---------------------------------------------------------------------------
    def _lora_modules(self) -> dict[str, torch.nn.Module]:
        modules = {"denoiser": self.denoiser}
        if self.spec.train_text_encoder:
            modules["text_encoder"] = self.pipe.text_encoder
        return modules

    def _lora_state(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {f"{name}.{k}": v for name, module in self._lora_modules().items()
                for k, v in get_peft_model_state_dict(module).items()}

    def _load_lora_state(self, lora: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        for name, module in self._lora_modules().items():
            prefix = f"{name}."
            set_peft_model_state_dict(module, {k[len(prefix):]: v for k, v in lora.items() if k.startswith(prefix)})

    def save_checkpoint(self) -> None:
        """accelerate's save_state (every process takes part): LoRA weights (denoiser and text encoder),
        optimiser, fp16 loss scale, RNGs, LR schedule, step and curves."""
        training.save_state(self.accelerator, self.checkpoint_dir, self.progress.step)

    # -- training ------------------------------------------------------------------------------
    def _latents(self, mean: torch.Tensor, std: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick `count` cached images, a flip and (with random_crop) a window each, draw latents from
        their posterior and normalise; returns (latents, crop top-left in pixels (count, 2))."""
        g = self.generator
        index = torch.randint(len(mean), (count,), generator=g)
        flip = (torch.rand(count, generator=g) < 0.5).long() if self.spec.random_flip else torch.zeros(count, dtype=torch.long)
        m, s = mean[index, flip], std[index, flip]  # (count, C, H, W), H = h + 2 * margin for references
        h = self.spec.resolution // self.pipe.vae_scale_factor
        corner = torch.randint(0, m.shape[-1] - h + 1, (count, 2), generator=g)  # all zeros without a margin
        m = torch.stack([x[:, y : y + h, x0 : x0 + h] for x, (y, x0) in zip(m, corner.tolist())])
        s = torch.stack([x[:, y : y + h, x0 : x0 + h] for x, (y, x0) in zip(s, corner.tolist())])
        z = m + s * torch.randn(m.shape, generator=g)
        return diffusion.normalize_latents(self.pipe.vae, z).to(self.device), corner * self.pipe.vae_scale_factor

    def _text(self, count: int, prior: bool) -> dict[str, torch.Tensor]:
        if self.spec.train_text_encoder:
            embeds = diffusion.encode_prompts(self.pipe, [self.class_prompt if prior else self.prompt])
        else:
            embeds = self.class_embeds if prior else self.prompt_embeds
        return {k: v.expand(count, *v.shape[1:]) for k, v in embeds.items()}

    def _noisy_and_target(self, latents: torch.Tensor):
        """Forward process at a random time: (noisy latents, timesteps, target, per-sample weight)."""
        spec, g, sched = self.spec, self.generator, self.noise_scheduler
        B = latents.shape[0]
        noise = torch.randn(latents.shape, generator=g).to(self.device)
        if self.family.flow_matching:
            from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

            u = compute_density_for_timestep_sampling(spec.flow_weighting, B, logit_mean=0.0, logit_std=1.0,
                                                      mode_scale=1.29, generator=g)
            index = (u * sched.config.num_train_timesteps).long().clamp(max=sched.config.num_train_timesteps - 1)
            timesteps = sched.timesteps[index].to(self.device)
            sigmas = sched.sigmas[index].view(B, 1, 1, 1).to(self.device)
            noisy = (1.0 - sigmas) * latents + sigmas * noise
            weight = compute_loss_weighting_for_sd3(spec.flow_weighting, sigmas).view(B)
            return noisy, timesteps, noise - latents, weight
        if spec.noise_offset:
            noise = noise + spec.noise_offset * torch.randn((B, latents.shape[1], 1, 1), generator=g).to(self.device)
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (B,), generator=g).to(self.device)
        noisy = sched.add_noise(latents, noise, timesteps)
        kind = sched.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = sched.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type {kind!r}")
        weight = torch.ones(B, device=self.device)
        if spec.min_snr_gamma:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(sched, timesteps)
            weight = torch.clamp(snr, max=spec.min_snr_gamma) / (snr + 1 if kind == "v_prediction" else snr)
        return noisy, timesteps, target, weight

    def _loss(self, latents: torch.Tensor, crops: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        noisy, timesteps, target, weight = self._noisy_and_target(latents)
        text = {k: v.to(self.weight_dtype) for k, v in text.items()}
        original = self.spec.resolution + 2 * self.margin * self.pipe.vae_scale_factor
        # autocast to mixed_precision: accelerate's, around the prepared module's forward this runs in
        pred = diffusion.predict(self.pipe, noisy.to(self.weight_dtype), timesteps, text, size=self.spec.resolution,
                                 crops=crops, original_size=original)
        per_sample = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))  # (B,)
        return (weight * per_sample).mean()

    def _micro_batch_loss(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(instance loss, prior loss, total loss) of one micro-batch; runs inside the prepared module."""
        spec = self.spec
        # 1. instance latents: fresh references, flips and posterior draws each micro-batch
        latents, crops = self._latents(self.latent_mean, self.latent_std, spec.batch_size)
        # 2. denoising loss on "a S* class" (+ the prior loss on class images with "a class")
        instance = self._loss(latents, crops, self._text(spec.batch_size, prior=False))
        prior = torch.zeros((), device=self.device)
        if self.class_images:
            class_latents, class_crops = self._latents(self.class_mean, self.class_std, spec.batch_size)
            prior = self._loss(class_latents, class_crops, self._text(spec.batch_size, prior=True))
        return instance, prior, instance + spec.prior_preservation.prior_loss_weight * prior

    def train_step(self) -> dict[str, float]:
        spec, acc = self.spec, self.accelerator
        accumulation = spec.gradient_accumulation_steps
        sums = torch.zeros(3, device=self.device)  # instance, prior, total loss summed over the micro-batches
        for i in range(accumulation):
            # DDP averages the gradients over processes in the last micro-batch's backward only
            with acc.no_sync(self.model) if i + 1 < accumulation else nullcontext():
                instance, prior, loss = self.model(self._micro_batch_loss)
                # 3. backward of this micro-batch's share of the mean; under fp16 accelerate multiplies the
                #    loss by the GradScaler's scale first, so small gradients do not underflow to zero
                acc.backward(loss / accumulation)
            sums += torch.stack([instance.detach(), prior.detach(), loss.detach()]).float()  # no device sync
        instance, prior, loss = sums / accumulation
        # 4. update: every process holds the mean gradient, so the weights stay equal
        if self.world > 1:
            instance, prior, loss = acc.reduce(torch.stack([instance, prior, loss]), "mean")
        grad_norm = acc.clip_grad_norm_(self.trainable, spec.max_grad_norm)  # unscales fp16 gradients first
        lr = float(self.lr_scheduler.get_last_lr()[0])  # a tensor under torchao's 8-bit AdamW
        self.optimizer.step()  # skipped (and the scale lowered) when fp16 gradients overflowed
        if not self.optimizer.step_was_skipped:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # one device-to-host copy for the logged numbers (four .item() calls would be four GPU syncs)
        loss, instance, prior, grad_norm = torch.stack([loss, instance, prior, grad_norm.float()]).tolist()
        return {"loss": loss, "instance_loss": instance, "prior_loss": prior, "lr": lr, "grad_norm": grad_norm}

    def memory_estimate(self) -> str:
        """A rough bill before training: weights, trainable LoRA, optimiser state (AdamW: 2 fp32 moments)."""
        models = [getattr(self.pipe, name) for name in (self.family.denoiser, "vae", *self.family.text_encoders)]
        models = [m for m in models if m is not None]  # text encoders freed after caching the prompts
        weights = sum(diffusion.weight_bytes(m) for m in models)  # quantised weights by their stored bytes
        trainable = sum(p.numel() for p in self.trainable)
        state = trainable * (2 if self.spec.use_8bit_adam else 8)
        return (f"memory estimate: weights {weights / 2**20:.1f} MiB, LoRA {trainable * 4 / 2**20:.2f} MiB "
                f"(+grads), optimiser state {state / 2**20:.2f} MiB; activations grow with batch x resolution^2"
                f"{' (reduced by gradient checkpointing)' if self.spec.gradient_checkpointing else ''}")

    def train(self) -> None:
        spec = self.spec
        tqdm.write(
            f"teacher: {self.family.name} model, {len(self.references)} references, prompt {self.prompt!r}"
            f"{f', {len(self.class_images)} class images {self.class_prompt!r}' if self.class_images else ''}, "
            f"{spec.steps} steps x batch {spec.batch_size}"
            f"{f' x {spec.gradient_accumulation_steps} accumulated' if spec.gradient_accumulation_steps > 1 else ''}, LoRA rank {spec.lora.rank}, "
            f"{sum(p.numel() for p in self.trainable):,} trainable params"
        )
        tqdm.write(f"teacher: {self.memory_estimate()}")
        if self.world > 1:
            tqdm.write(f"teacher: data parallel over {self.world} processes (rank {self.rank}), "
                       f"{self.world * spec.batch_size * spec.gradient_accumulation_steps} references per step in all")
        self.denoiser.train()
        bar = tqdm(total=spec.steps, initial=self.progress.step, desc="teacher", unit="step")
        while self.progress.step < spec.steps:
            values = self.train_step()
            self.progress.record(values)
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}")
            if spec.validation_every and self.progress.step % spec.validation_every == 0 and self.rank == 0:
                self.validation_grid()
            if self.progress.step % spec.checkpoint_every == 0 and self.progress.step < spec.steps:
                self.save_checkpoint()
            faults.kill_point("teacher", "step", self.progress.step)
        bar.close()
        self.denoiser.eval()
        if self.world > 1:  # the processes must end with the same weights; say so checkably
            digest = sha256_bytes(b"".join(p.detach().cpu().numpy().tobytes() for p in self.trainable))
            tqdm.write(f"teacher: rank {self.rank} final LoRA sha256 {digest}")

    @torch.no_grad()
    def validation_grid(self) -> None:
        """Samples of the instance prompt at this step, kept with the checkpoints and logged at the end."""
        self.denoiser.eval()
        with torch.random.fork_rng(devices=[]):  # sampling must not move the training RNG
            grid_image = self.sample_grid()
        self.denoiser.train()
        path = self.checkpoint_dir / "validation" / f"step_{self.progress.step:06d}.png"
        write_png_atomic(path, grid_image)

    @torch.no_grad()
    def sample_grid(self, count: int = 4):
        images = diffusion.generate(
            self.pipe,
            [self.prompt] * count,
            [self.params.synthesis.seed + i for i in range(count)],
            steps=self.params.synthesis.num_inference_steps,
            guidance=self.params.synthesis.guidance_scale,
            size=self.spec.resolution,
            text=self.sample_text,
        )
        return grid([self.references[:count], images], cell=min(self.spec.resolution, 256))

    def save(self, out_dir: Path) -> None:
        run_tags = {
            "references_dir": str(self.params.references_dir),
            "references_digest": self.references_digest,
            **base_model_tags(self.spec.model),
        }
        with stage_run(self.params, "teacher", run_tags) as run, staged_dir(out_dir) as tmp:
            run.log_params({"teacher": self.spec.model_dump(mode="json"), "seed": self.params.seed, "prompt": self.prompt})
            for key in SERIES:
                if key != "prior_loss" or self.class_images:
                    run.log_series(key, self.progress.series[key])
            validation = self.checkpoint_dir / "validation"
            if validation.is_dir():
                run.log_artifacts(validation, "validation")
            run.log_dict({p.name: sha256_file(p) for p in self.reference_files}, "references.json")
            adapter = tmp / "adapter"
            adapter.mkdir()
            metadata = {"r": self.spec.lora.rank, "lora_alpha": self.spec.lora.alpha, "target_modules": self.spec.lora.target_modules}
            text_metadata = {**metadata, "target_modules": TEXT_ENCODER_TARGETS}
            diffusion.save_lora(self.pipe, adapter, metadata, text_encoder=self.spec.train_text_encoder,
                                text_metadata=text_metadata)
            adapter_digest = sha256_file(adapter / diffusion.LORA_WEIGHT_NAME)
            self.sample_grid().save(tmp / "samples.png")
            run.log_artifact(tmp / "samples.png")
            version = run.register(
                adapter, "teacher", {**base_model_tags(self.spec.model), "backend": f"diffusers-{self.family.name}",
                                   "adapter_digest": adapter_digest}
            )
            run.set_tags({"model_version": f"{run.experiment}.{run.subject}.teacher@{version}"})
            training.write_curves(tmp, self.progress.series)  # after register: not part of the adapter
            write_record(
                tmp,
                TeacherRecord(
                    stage="teacher",
                    run_id=run.run_id,
                    model=f"{run.experiment}.{run.subject}.teacher",
                    version=version,
                    **base_model_tags(self.spec.model),
                    revision=self.spec.revision,
                    adapter_digest=adapter_digest,
                    references_digest=self.references_digest,
                    family=self.family.name,
                    final_loss=self.progress.losses[-1],
                ),
            )
        tqdm.write(f"teacher: registered {run.experiment}.{run.subject}.teacher version {version}")


TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP text attention


def processes(params_path: str | Path) -> int:
    """How many data-parallel processes the CLI launches this stage with (accelerate)."""
    return load_params(params_path).teacher.processes


def run(params_path: str | Path) -> None:
    params = load_params(params_path)
    trainer = TeacherTrainer(params)
    trainer.setup()
    trainer.train()
    if trainer.rank == 0:  # the weights are the same in every process; one saves and registers them
        trainer.save(params.out("teacher"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", required=True)
    run(parser.parse_args().params)
