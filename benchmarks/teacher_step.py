"""Teacher training step: cached VAE latents + prompt embedding vs re-encoding every step.

optimised: `TeacherTrainer.setup()` (encodes every reference, plain and flipped, and the prompt
           once) then `TeacherTrainer.train_step()`.
baseline:  a plain DreamBooth-LoRA loop written here: the same tiny-sd pipeline and LoRA, the
           references decoded once and kept in memory as pixels, and every step encodes its batch
           with the VAE and the prompt with the text encoder before the UNet forward/backward.
Same spec (tests/conftest.py tiny_spec), batch size, resolution, LoRA, optimiser and LR schedule.

Target (issue): time per step cached / naive <= 0.7.

    python benchmarks/teacher_step.py                      # 64 px (default, ~30 s on 2 idle cores)
    python benchmarks/teacher_step.py --resolutions 64,128  # add 128 px (~70 s in all; a 128 px step is ~4x slower)
"""

from __future__ import annotations

import gc
import json
import os

import _common as C

SCRIPT = os.path.abspath(__file__)  # the cwd moves into a temp project later
TARGET = 0.7


def make_params(resolution: int, batch_size: int, model: str = "tiny-sd"):
    from conftest import make_params as compile_params
    from conftest import tiny_spec

    project = C.temp_project(f"teacher-{model}-{resolution}")
    spec = tiny_spec(name=f"bench-teacher-{resolution}",
                     teacher={"model": model, "resolution": resolution, "batch_size": batch_size})
    return compile_params(project, spec)


def cached_step(params):
    """The optimised path: the stage's own recipe."""
    from proxytune.stages.teacher import TeacherTrainer

    recipe = TeacherTrainer(params)
    recipe.setup()
    recipe.denoiser.train()  # as TeacherTrainer.train() does before its loop
    return recipe.train_step


def _to_tensor(image):
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


class NaiveTeacher:
    """A straightforward DreamBooth-LoRA loop that encodes images and prompt in every step."""

    def __init__(self, params):
        import torch
        from diffusers.optimization import get_scheduler

        from proxytune.backends.teachers import diffusion
        from proxytune.images import load_references
        from proxytune.stages.runtime import seed_everything

        cfg = self.cfg = params.teacher
        self.generator = seed_everything(params.seed)  # same seeding and determinism flags as the stage
        self.pipe = diffusion.load_pipeline(cfg.model, revision=cfg.revision, dtype=torch.float32)
        self.pipe.set_progress_bar_config(disable=True)
        self.noise_scheduler = diffusion.training_scheduler(self.pipe)
        self.flow = diffusion.family_of(self.pipe).flow_matching
        self.prompt = f"a {params.subject.token} {params.subject.class_noun}"
        references = load_references(params.references_dir, cfg.resolution)
        self.pixels = torch.stack([_to_tensor(image) for image in references])  # (N, 3, H, W), decoded once
        torch.manual_seed(params.seed)
        self.trainable = diffusion.add_lora(
            diffusion.denoiser(self.pipe), rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules
        )
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.lr_scheduler = get_scheduler(
            "constant_with_warmup", self.optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps
        )
        diffusion.denoiser(self.pipe).train()

    def batch_pixels(self):
        import torch

        batch, g = self.cfg.batch_size, self.generator
        index = torch.randint(len(self.pixels), (batch,), generator=g)
        pixels = self.pixels[index]
        if self.cfg.random_flip:
            flip = torch.rand(batch, generator=g) < 0.5
            pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        return pixels

    def encode(self, pixels):
        """VAE latents (one posterior sample, scaled) and text-encoder features, no gradients."""
        import torch

        from proxytune.backends.teachers import diffusion

        pipe = self.pipe
        with torch.no_grad():
            latents = diffusion.normalize_latents(pipe.vae, pipe.vae.encode(pixels).latent_dist.sample(generator=self.generator))
            text = diffusion.encode_prompts(pipe, [self.prompt] * len(pixels))
        return latents, text

    def encode_only(self):
        return self.encode(self.batch_pixels())

    def step(self) -> float:
        import torch
        import torch.nn.functional as F

        batch, g = self.cfg.batch_size, self.generator
        from proxytune.backends.teachers import diffusion

        latents, text = self.encode(self.batch_pixels())
        noise = torch.randn(latents.shape, generator=g)
        sched = self.noise_scheduler
        if self.flow:  # uniform times: the straightforward loop
            index = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
            timesteps, sigmas = sched.timesteps[index], sched.sigmas[index].view(batch, 1, 1, 1)
            noisy, target = (1 - sigmas) * latents + sigmas * noise, noise - latents
        else:
            timesteps = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
            noisy = sched.add_noise(latents, noise, timesteps)
            target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
        pred = diffusion.predict(self.pipe, noisy, timesteps, text, size=self.cfg.resolution)
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


VARIANTS = {"naive": lambda params: NaiveTeacher(params).step, "cached": cached_step}


def bench_resolution(args, resolution: int) -> dict:
    params = make_params(resolution, args.batch_size, args.model)
    cfg = params.teacher
    C.say(f"\n== teacher step at {resolution} px, batch {cfg.batch_size}, LoRA rank {cfg.lora.rank} on "
          f"{','.join(cfg.lora.target_modules)}, model {cfg.model}")
    C.say("  setting up both variants ...")
    naive = NaiveTeacher(params)
    cached = cached_step(params)
    samples = C.time_interleaved(
        {"naive": naive.step, "cached": cached}, warmup=args.warmup, repeats=args.repeats, inner=args.inner
    )
    encode = C.time_interleaved({"encode": naive.encode_only}, warmup=1, repeats=args.repeats, inner=args.inner, log=False)
    del naive, cached
    gc.collect()
    memory = {} if args.no_memory else C.run_probes(SCRIPT, list(VARIANTS), {"resolution": resolution, "batch_size": args.batch_size,
                                                                                  "model": args.model})

    t_naive, t_cached, t_encode = C.median(samples.times["naive"]), C.median(samples.times["cached"]), C.median(encode.times["encode"])
    ratio = t_cached / t_naive
    share = t_encode / t_naive
    C.say("")
    C.table(
        ["variant", "median s/step", "min-max s", "steps/s"],
        [
            ["naive (VAE + text encoder every step)", f"{t_naive:.4f}", C.spread(samples.times["naive"]), f"{1 / t_naive:.2f}"],
            ["cached (TeacherTrainer.train_step)", f"{t_cached:.4f}", C.spread(samples.times["cached"]), f"{1 / t_cached:.2f}"],
            ["  encoding alone (part of naive)", f"{t_encode:.4f}", C.spread(encode.times["encode"]), ""],
        ],
    )
    if memory:
        C.say("")
        C.table(C.MEMORY_HEADER, C.memory_rows(memory, list(VARIANTS)))
    C.say(f"\n  encoding is {share:.0%} of a naive step: removing it entirely could give at best a ratio of {1 - share:.2f}")
    C.say("  " + samples.note())
    C.say(f"  RESULT {resolution} px: cached/naive = {ratio:.2f} (target <= {TARGET}): {C.verdict(ratio <= TARGET)}")
    return {"resolution": resolution, "naive_s": t_naive, "cached_s": t_cached, "ratio": ratio, "encode_share": share,
            "memory": memory}


def main() -> None:
    p = C.parser(__doc__.splitlines()[0], warmup=2, repeats=5, inner=2)
    p.add_argument("--resolutions", default="64", help="comma-separated teacher resolutions (default 64)")
    p.add_argument("--batch-size", type=int, default=2, help="references per step (default 2, as specs/dog.yaml)")
    p.add_argument("--model", default="tiny-sd", help="teacher model (tiny-sd, tiny-sdxl, tiny-sd3, tiny-flux or a path)")
    args = p.parse_args()
    C.prepare_env()
    if args.probe:
        config = json.loads(args.probe_config)
        params = make_params(config["resolution"], config["batch_size"], config["model"])
        C.probe_memory(lambda: VARIANTS[args.probe](params), steps=2)
        return
    C.say(f"teacher_step: {C.now()}; {C.machine()}")
    C.say(f"timing: {args.warmup} warm-up steps per variant, then median of {args.repeats} interleaved rounds of "
          f"{args.inner} steps; target cached/naive <= {TARGET}")
    results = [bench_resolution(args, int(r)) for r in args.resolutions.split(",")]
    C.say("\nsummary")
    for r in results:
        C.say(f"  {r['resolution']} px: naive {r['naive_s']:.3f} s/step, cached {r['cached_s']:.3f} s/step, "
              f"ratio {r['ratio']:.2f} (target <= {TARGET}): {C.verdict(r['ratio'] <= TARGET)}")


if __name__ == "__main__":
    main()
