"""Synthesis throughput: batched generation (8 images per pipeline call) vs one call per image.

Both use the same pipeline, loaded as the synthesis stage loads it: tiny-sd with a teacher LoRA
fused in (`diffusion.load_pipeline_with_lora`; the LoRA here is freshly initialised and saved by
`diffusion.save_lora`, which costs the same per step as a trained one).
optimised: `diffusion.generate(pipe, [prompt] * 8, seeds, ...)`, as the stage calls it per block.
baseline:  a loop of `pipe(prompt, generator=torch.Generator().manual_seed(seed), ...)`, one image
           per call.
Settings as specs/dog.yaml: 64 px, 10 denoising steps, guidance 7.5 (so every call runs the UNet on
the conditional and unconditional halves).

Target (issue): images/s batched / per-image >= 1.3.

    python benchmarks/synthesis_throughput.py      # ~1 minute on 2 cores
"""

from __future__ import annotations

import gc
import json
import os

import _common as C

SCRIPT = os.path.abspath(__file__)  # the cwd moves into a temp folder later
TARGET = 1.3
PROMPT = "a S* dog"


def load_pipe(config: dict):
    """tiny-sd + a saved-and-reloaded teacher LoRA, fused, as synthesis.generate_missing loads it."""
    import torch

    from proxytune.backends import diffusion
    from proxytune.spec.teacher import LoraSpec

    folder = C.temp_project("synthesis")
    lora = LoraSpec()
    base = diffusion.load_pipeline(config["model"])
    torch.manual_seed(0)
    diffusion.add_lora(diffusion.denoiser(base), rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules)
    adapter = folder / "adapter"
    adapter.mkdir()
    diffusion.save_lora(base, adapter, {"r": lora.rank, "lora_alpha": lora.alpha,
                                                         "target_modules": lora.target_modules})
    del base
    pipe = diffusion.load_pipeline_with_lora(config["model"], adapter)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def batched(pipe, config: dict):
    from proxytune.backends import diffusion

    def run(seeds):
        images = []
        for start in range(0, len(seeds), config["batch_size"]):  # fixed blocks, as the stage does
            images += diffusion.generate(pipe, [PROMPT] * len(seeds[start : start + config["batch_size"]]),
                                         seeds[start : start + config["batch_size"]], steps=config["steps"],
                                         guidance=config["guidance"], size=config["size"])
        return images

    return run


def per_image(pipe, config: dict):
    import torch

    def run(seeds):
        images = []
        for seed in seeds:
            out = pipe(PROMPT, num_inference_steps=config["steps"], guidance_scale=config["guidance"],
                       height=config["size"], width=config["size"],
                       generator=torch.Generator("cpu").manual_seed(seed), output_type="pil")
            images.append(out.images[0])
        return images

    return run


VARIANTS = {"per-image": per_image, "batched": batched}


def main() -> None:
    p = C.parser(__doc__.splitlines()[0], warmup=0, repeats=5, inner=1)  # warm-up: see below
    p.add_argument("--images", type=int, default=16, help="images per timed round (default 16 = 2 batches)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batched call (default 8, as specs/dog.yaml)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps (default 10, as specs/dog.yaml)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--size", type=int, default=64, help="pixels (default 64, the tiny teacher's resolution)")
    args = p.parse_args()
    C.prepare_env()
    config = {"model": "tiny-sd", "batch_size": args.batch_size, "steps": args.steps, "guidance": args.guidance,
              "size": args.size}
    if args.probe:
        config = json.loads(args.probe_config)

        def setup():
            run = VARIANTS[args.probe](load_pipe(config), config)
            seeds = list(range(config["batch_size"]))
            return lambda: run(seeds)

        C.probe_memory(setup, steps=1)  # one block of batch_size images
        return
    C.say(f"synthesis_throughput: {C.now()}; {C.machine()}")
    C.say(f"timing: one block of {args.batch_size} images per variant (compared below) + {args.warmup} warm-up round(s), "
          f"then median of {args.repeats} interleaved rounds of "
          f"{args.images} images; target images/s batched/per-image >= {TARGET}")
    C.say(f"\n== {config['model']} + fused LoRA, {args.size} px, {args.steps} steps, guidance {args.guidance}, "
          f"batch {args.batch_size} vs 1")
    C.say("  setting up ...")
    pipe = load_pipe(config)
    seeds = list(range(args.images))
    runs = {name: VARIANTS[name](pipe, config) for name in VARIANTS}
    outputs = {name: runs[name](seeds[: args.batch_size]) for name in runs}  # also a warm-up
    import numpy as np

    diff = max(int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
               for a, b in zip(outputs["per-image"], outputs["batched"]))
    samples = C.time_interleaved({name: (lambda run=run: run(seeds)) for name, run in runs.items()},
                                 warmup=args.warmup, repeats=args.repeats, inner=args.inner)
    del pipe, runs, outputs
    gc.collect()
    memory = {} if args.no_memory else C.run_probes(SCRIPT, list(VARIANTS), config)

    t_single, t_batch = C.median(samples.times["per-image"]), C.median(samples.times["batched"])
    speedup = t_single / t_batch
    C.say("")
    C.table(
        ["variant", f"median s / {args.images} images", "min-max s", "images/s"],
        [
            ["per-image (one pipeline call each)", f"{t_single:.3f}", C.spread(samples.times["per-image"]), f"{args.images / t_single:.2f}"],
            [f"batched (diffusion.generate, batch {args.batch_size})", f"{t_batch:.3f}", C.spread(samples.times["batched"]), f"{args.images / t_batch:.2f}"],
        ],
    )
    if memory:
        C.say(f"\n  memory: one block of {args.batch_size} images per probe")
        C.table(C.MEMORY_HEADER, C.memory_rows(memory, list(VARIANTS)))
    C.say(f"\n  same seeds, batched vs per-image: largest pixel difference {diff} (of 255; float rounding only if small)")
    C.say("  " + samples.note())
    C.say(f"  RESULT: images/s batched/per-image = {speedup:.2f}x (target >= {TARGET:g}x): {C.verdict(speedup >= TARGET)}")


if __name__ == "__main__":
    main()
