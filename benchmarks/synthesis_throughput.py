"""Synthesis throughput: batched generation (8 images per pipeline call) vs one call per image, and
the stage's batched call against a plain batched diffusers call.

Both use the same pipeline, loaded as the synthesis stage loads it: tiny-sd with a teacher LoRA
fused in (`diffusion.load_pipeline_with_lora`; the LoRA here is freshly initialised and saved by
`diffusion.save_lora`, which costs the same per step as a trained one).
optimised: `diffusion.generate(pipe, [prompt] * 8, seeds, ...)`, as the stage calls it per block.
           It runs under the stage's global settings (`runtime.seed_everything`: deterministic
           algorithms, without the NaN fill of new tensors).
baseline:  a loop of `pipe(prompt, generator=torch.Generator().manual_seed(seed), ...)`, one image
           per call.
plain:     one plain diffusers call per block, `pipe([prompt] * 8, generator=[one per image], ...)`,
           without deterministic mode: the peer a user would write.
nan-fill:  the stage's call with deterministic mode's NaN fill of every new tensor turned back on
           (what `seed_everything` did before; issue 27 item 4).
compiled:  the stage's call on a second copy of the pipeline whose denoiser is compiled as
           `synthesis.compile: true` compiles it (`diffusion.denoiser(pipe).compile(dynamic=False)`);
           its first block (the one-off compile, 140-200 s on 2 busy cores) is timed apart.
Settings as specs/dog.yaml: 64 px, 10 denoising steps, guidance 7.5 (so every call runs the UNet on
the conditional and unconditional halves).

Targets (issue): images/s batched / per-image >= 1.3; time stage / plain <= 0.9 (issue 27).

    python benchmarks/synthesis_throughput.py      # ~1 minute on 2 cores
"""

from __future__ import annotations

import gc
import json
import os
import time

import _common as C

SCRIPT = os.path.abspath(__file__)  # the cwd moves into a temp folder later
TARGET = 1.3
TARGET_PLAIN = 0.9  # time per block, stage / plain diffusers call
PROMPT = "a S* dog"


def load_pipe(config: dict):
    """tiny-sd + a saved-and-reloaded teacher LoRA, fused, as synthesis.generate_missing loads it."""
    import torch

    from proxytune.backends.teachers import diffusion
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
    from proxytune.backends.teachers import diffusion

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


def plain(pipe, config: dict):
    import torch

    def run(seeds):
        images = []
        for start in range(0, len(seeds), config["batch_size"]):
            block = seeds[start : start + config["batch_size"]]
            out = pipe([PROMPT] * len(block), num_inference_steps=config["steps"], guidance_scale=config["guidance"],
                       height=config["size"], width=config["size"],
                       generator=[torch.Generator("cpu").manual_seed(s) for s in block], output_type="pil")
            images += out.images
        return images

    return run


def under(run, deterministic: bool, nan_fill: bool = False):
    """`run` with torch's global determinism flags set for its call (they are per process)."""
    import torch

    def wrapped(seeds):
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = nan_fill
        return run(seeds)

    return wrapped


def stage_batched(pipe, config: dict):
    from proxytune.stages.runtime import seed_everything

    seed_everything(0)  # the stage's global settings; `under` re-applies them before every call
    return under(batched(pipe, config), deterministic=True)


VARIANTS = {
    "per-image": lambda pipe, config: under(per_image(pipe, config), deterministic=False),
    "batched": stage_batched,
    "plain": lambda pipe, config: under(plain(pipe, config), deterministic=False),
    "nan-fill": lambda pipe, config: under(batched(pipe, config), deterministic=True, nan_fill=True),
}


def main() -> None:
    p = C.parser(__doc__.splitlines()[0], warmup=0, repeats=5, inner=1)  # warm-up: see below
    p.add_argument("--images", type=int, default=16, help="images per timed round (default 16 = 2 batches)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batched call (default 8, as specs/dog.yaml)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps (default 10, as specs/dog.yaml)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--size", type=int, default=64, help="pixels (default 64, the tiny teacher's resolution)")
    p.add_argument("--no-compile", action="store_true", help="leave out the synthesis.compile variant (its compile "
                   "took 140-200 s on 2 busy cores)")
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
    first_compiled = None
    if not args.no_compile:
        from proxytune.backends.teachers import diffusion

        compiled_pipe = load_pipe(config)
        diffusion.denoiser(compiled_pipe).compile(dynamic=False)  # as synthesis.generate_missing does
        runs["compiled"] = stage_batched(compiled_pipe, config)
        C.say("  compiling (synthesis.compile: the first block compiles the denoiser) ...")
        start = time.perf_counter()
        outputs["compiled"] = runs["compiled"](seeds[: args.batch_size])
        first_compiled = time.perf_counter() - start
    import numpy as np

    diff = max(int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
               for a, b in zip(outputs["per-image"], outputs["batched"]))
    samples = C.time_interleaved({name: (lambda run=run: run(seeds)) for name, run in runs.items()},
                                 warmup=args.warmup, repeats=args.repeats, inner=args.inner)
    compiled_diff = None if first_compiled is None else max(
        int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
        for a, b in zip(outputs["compiled"], outputs["batched"]))
    del pipe, runs, outputs
    gc.collect()
    memory = {} if args.no_memory else C.run_probes(SCRIPT, list(VARIANTS), config)

    t_single, t_batch = C.median(samples.times["per-image"]), C.median(samples.times["batched"])
    t_plain, t_fill = C.median(samples.times["plain"]), C.median(samples.times["nan-fill"])
    speedup = t_single / t_batch
    C.say("")
    C.table(
        ["variant", f"median s / {args.images} images", "min-max s", "images/s"],
        [
            ["per-image (one pipeline call each)", f"{t_single:.3f}", C.spread(samples.times["per-image"]), f"{args.images / t_single:.2f}"],
            [f"batched (diffusion.generate, batch {args.batch_size})", f"{t_batch:.3f}", C.spread(samples.times["batched"]), f"{args.images / t_batch:.2f}"],
            [f"plain diffusers call, batch {args.batch_size}", f"{t_plain:.3f}", C.spread(samples.times["plain"]), f"{args.images / t_plain:.2f}"],
            ["batched with the NaN fill on (before)", f"{t_fill:.3f}", C.spread(samples.times["nan-fill"]), f"{args.images / t_fill:.2f}"],
            *([["compiled denoiser (synthesis.compile: true)", f"{C.median(samples.times['compiled']):.3f}",
                C.spread(samples.times["compiled"]), f"{args.images / C.median(samples.times['compiled']):.2f}"]]
              if first_compiled is not None else []),
        ],
    )
    if memory:
        C.say(f"\n  memory: one block of {args.batch_size} images per probe")
        C.table(C.MEMORY_HEADER, C.memory_rows(memory, list(VARIANTS)))
    C.say(f"\n  same seeds, batched vs per-image: largest pixel difference {diff} (of 255; float rounding only if small)")
    C.say("  " + samples.note())
    C.say(f"  NaN fill: {t_fill / t_batch - 1:+.1%} time per round over the stage's call without it")
    C.say(f"  RESULT: images/s batched/per-image = {speedup:.2f}x (target >= {TARGET:g}x): {C.verdict(speedup >= TARGET)}")
    C.say(f"  RESULT: time stage/plain diffusers call = {t_batch / t_plain:.3f}x (target <= {TARGET_PLAIN:g}x): "
          f"{C.verdict(t_batch / t_plain <= TARGET_PLAIN)}")
    if first_compiled is not None:
        C.say(f"  compiled vs eager stage call, same seeds: largest pixel difference {compiled_diff} (of 255)")
        t_compiled = C.median(samples.times["compiled"])
        block = t_compiled * args.batch_size / args.images  # the first call ran one block of batch_size images
        C.say(C.compile_summary("time compiled stage/plain diffusers call", t_compiled, t_plain, t_batch,
                                max(first_compiled - block, 0.0), TARGET_PLAIN, unit=f"rounds of {args.images} images"))


if __name__ == "__main__":
    main()
