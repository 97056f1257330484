"""AR sampling throughput: `ARStudentBundle.generate(..., use_cache=True)` vs `use_cache=False`.

Both variants are the project's sampler on the same tiny-llamagen student wrapped in an (unmerged)
peft LoRA, as the evaluation stage samples it; 16x16 = 256 codes per image, classifier-free
guidance 4.0 (cond and uncond rows in one batch), top-k 100, temperature 1 (specs/dog.yaml).
use_cache=True decodes incrementally with a transformers DynamicCache; use_cache=False re-runs the
whole prefix (caption slots + codes so far) at every one of the 256 steps.
Throughput counts sampled image tokens: images x 256 per call.

Target (issue): tokens/s with cache / without >= 3 at 256 tokens.

    python benchmarks/sampling_kv_cache.py      # ~1 minute on 2 cores
"""

from __future__ import annotations

import gc
import json
import os

import _common as C

SCRIPT = os.path.abspath(__file__)
TARGET = 3.0
PROMPT = "a S* dog"


def load_bundle(config: dict):
    import torch
    from peft import LoraConfig, get_peft_model

    from proxytune.backends.students.llamagen import backend as llamagen
    from proxytune.spec.student import StudentLoraSpec

    bundle = llamagen.load_student(config["model"])
    lora = StudentLoraSpec()
    torch.manual_seed(0)
    bundle.model = get_peft_model(bundle.model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha,
                                                           target_modules=llamagen.LORA_TARGET_MODULES)).eval()
    return bundle


def sampler(bundle, config: dict, use_cache: bool):
    prompts, seeds = [PROMPT] * config["images"], list(range(config["images"]))

    def run():
        return bundle.generate(prompts, seeds, cfg_scale=config["cfg_scale"], top_k=config["top_k"],
                               temperature=config["temperature"], use_cache=use_cache)

    return run


VARIANTS = {"no cache": False, "kv cache": True}


def main() -> None:
    p = C.parser(__doc__.splitlines()[0], warmup=0, repeats=5, inner=1)  # warm-up: the comparison call below
    p.add_argument("--images", type=int, default=4, help="images per generate call (default 4)")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--top-k", type=int, default=100)
    args = p.parse_args()
    C.prepare_env()
    config = {"model": "tiny-llamagen", "images": args.images, "cfg_scale": args.cfg_scale, "top_k": args.top_k,
              "temperature": 1.0}
    if args.probe:
        config = json.loads(args.probe_config)
        C.probe_memory(lambda: sampler(load_bundle(config), config, VARIANTS[args.probe]), steps=1)
        return
    C.say(f"sampling_kv_cache: {C.now()}; {C.machine()}")
    C.say(f"timing: one call per variant (compared below) + {args.warmup} warm-up call(s), then median of "
          f"{args.repeats} interleaved rounds of {args.inner} call(s); target tokens/s cache/no cache >= {TARGET}")
    bundle = load_bundle(config)
    length = bundle.config.seq_len
    tokens = args.images * length
    C.say(f"\n== {config['model']} + LoRA, {args.images} images x {length} codes per call, cfg {args.cfg_scale}, "
          f"top-k {args.top_k}")
    runs = {name: sampler(bundle, config, use_cache) for name, use_cache in VARIANTS.items()}
    outputs = {name: run() for name, run in runs.items()}  # also the warm-up
    same = bool((outputs["no cache"] == outputs["kv cache"]).all())
    agree = float((outputs["no cache"] == outputs["kv cache"]).float().mean())
    samples = C.time_interleaved(runs, warmup=args.warmup, repeats=args.repeats, inner=args.inner)
    del bundle, runs, outputs
    gc.collect()
    memory = {} if args.no_memory else C.run_probes(SCRIPT, list(VARIANTS), config)

    t_plain, t_cache = C.median(samples.times["no cache"]), C.median(samples.times["kv cache"])
    speedup = t_plain / t_cache
    C.say("")
    C.table(
        ["variant", "median s/call", "min-max s", "image tokens/s"],
        [
            ["no cache (use_cache=False)", f"{t_plain:.3f}", C.spread(samples.times["no cache"]), f"{tokens / t_plain:.0f}"],
            ["kv cache (use_cache=True)", f"{t_cache:.3f}", C.spread(samples.times["kv cache"]), f"{tokens / t_cache:.0f}"],
        ],
    )
    if memory:
        C.say("\n  memory: one generate call per probe")
        C.table(C.MEMORY_HEADER, C.memory_rows(memory, list(VARIANTS)))
    C.say(f"\n  same seeds, cache vs no cache: identical codes: {same} ({agree:.1%} of codes equal)")
    C.say("  " + samples.note())
    C.say(f"  RESULT: tokens/s cache/no cache = {speedup:.2f}x at {length} tokens (target >= {TARGET:g}x): "
          f"{C.verdict(speedup >= TARGET)}")


if __name__ == "__main__":
    main()
