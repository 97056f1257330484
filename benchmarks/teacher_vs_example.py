"""Teacher step against the diffusers DreamBooth-LoRA example script (issue 13, item 3).

Runs diffusers' `examples/dreambooth/train_dreambooth_lora.py` (a copy you provide; it is not part of
proxytune) and proxytune's teacher recipe on the same setting in one process, alternating step by
step: each time the example's progress bar advances (once per optimiser step), one proxytune step
runs, exactly as `TeacherTrainer.train()` runs it. Each program's step is timed on its own (wall and
process CPU time), so load that drifts during the run hits both alike. Prints the median time per
step of each after a warm-up and the ratio proxytune / example, for each of `--pairs` fresh pairs of
runs, and the median over pairs. Target (issue): <= 0.7.

Setting: the built-in tiny-sd, saved as a diffusers pipeline folder, used by both; DreamBench dog;
64 px, centre crop; batch 1; LoRA rank 4, alpha 4, on to_q/to_k/to_v/to_out.0; AdamW lr 1e-4,
weight decay 1e-2, constant schedule; clip 1.0; no prior preservation; no checkpoints inside the
timed steps. Each program runs as its users run it: the example loads and encodes its batch with
the VAE and the prompt with the text encoder every step (its default, without
--pre_compute_text_embeddings; `--example-args` adds flags), proxytune caches both. torch's
deterministic-algorithms switch, which the recipe turns on, is on only during proxytune's steps.

The example imports torchvision. Where the real one does not load (the CPU torch here), pass
`--torchvision DIR` with a stand-in package (DIR/torchvision/) providing the transforms the script
uses; DIR is on sys.path only while the example is imported, so transformers and diffusers never
see it. See the README (Benchmarks) for the stand-in and the figures.

    python benchmarks/teacher_vs_example.py --example PATH/train_dreambooth_lora.py --torchvision DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as C

TARGET = 0.7


def _median_after(times: list[float], skip: int) -> float:
    return statistics.median(times[skip:])


class ProxytuneSteps:
    """proxytune's teacher recipe, set up once, stepping on request like `TeacherTrainer.train()`'s loop."""

    def __init__(self, steps: int):
        import torch
        from conftest import make_params, tiny_spec

        from proxytune.stages.teacher import SERIES, TeacherTrainer

        project = C.temp_project("teacher-vs-example")
        spec = tiny_spec(name="teacher-vs-example",
                         teacher={"model": "tiny-sd", "resolution": 64, "batch_size": 1, "lora": {"rank": 4, "alpha": 4},
                                  "learning_rate": 1e-4, "lr_warmup_steps": 0, "steps": steps,
                                  "checkpoint_every": 1000000})
        self.recipe = TeacherTrainer(make_params(project, spec))
        self.recipe.setup()
        self.recipe.denoiser.train()
        self.series = SERIES
        self.bar = _quiet_bar(total=steps)
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._torch = torch

    def step(self) -> None:
        torch, recipe = self._torch, self.recipe
        torch.use_deterministic_algorithms(True, warn_only=True)  # as the recipe's setup left it
        wall, cpu = time.perf_counter(), time.process_time()
        # the body of TeacherTrainer.train()'s loop (no validation grids or checkpoints in this setting)
        values = recipe.train_step()
        recipe.progress.step += 1
        for key in self.series:
            recipe.progress.series[key].append(values[key])
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{values['loss']:.4f}")
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)
        torch.use_deterministic_algorithms(False)  # the example runs without it


def _quiet_bar(**kwargs):
    from tqdm.auto import tqdm

    return tqdm(file=open(os.devnull, "w"), **kwargs)


def _interleaving_bar(ours: ProxytuneSteps, example_wall: list[float], example_cpu: list[float]):
    """The example's progress bar: at each update it closes the example's step timing, runs one
    proxytune step, and restarts the example's timing; the bar itself still formats (to /dev/null)."""
    from tqdm.auto import tqdm

    class Interleaving(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["file"] = open(os.devnull, "w")
            super().__init__(*args, **kwargs)
            self.mark = (time.perf_counter(), time.process_time())

        def update(self, n=1):
            result = super().update(n)
            example_wall.append(time.perf_counter() - self.mark[0])
            example_cpu.append(time.process_time() - self.mark[1])
            ours.step()
            self.mark = (time.perf_counter(), time.process_time())
            return result

    return Interleaving


def run_pair(script: Path, torchvision_dir: str | None, model: str, references: Path, args) -> dict:
    import logging

    import torch

    ours = ProxytuneSteps(args.steps)  # first: its Accelerator resets accelerate's shared state
    torch.use_deterministic_algorithms(False)
    logging.root.handlers.clear()
    if torchvision_dir:
        sys.path.insert(0, torchvision_dir)
    try:
        spec = importlib.util.spec_from_file_location("dreambooth_example", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if torchvision_dir:
            sys.path.remove(torchvision_dir)
            for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
                del sys.modules[name]
    example_wall: list[float] = []
    example_cpu: list[float] = []
    module.tqdm = _interleaving_bar(ours, example_wall, example_cpu)
    out = tempfile.mkdtemp(prefix="example-out-")
    flags = ["--pretrained_model_name_or_path", model, "--instance_data_dir", str(references),
             "--instance_prompt", "a sks dog", "--resolution", "64", "--center_crop", "--train_batch_size", "1",
             "--rank", "4", "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
             "--max_train_steps", str(args.steps), "--checkpointing_steps", "1000000", "--seed", "0",
             "--output_dir", out, *args.example_args.split()]
    parsed = module.parse_args(flags)
    module.args = parsed  # the script reads a module-level `args`, which it sets only when run as __main__
    try:
        module.main(parsed)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if len(ours.wall) != args.steps or len(example_wall) != args.steps:
        raise SystemExit(f"expected {args.steps} steps each, got example {len(example_wall)}, proxytune {len(ours.wall)}")
    result = {"steps_timed": args.steps - args.skip,
              "example_wall_s": _median_after(example_wall, args.skip), "example_cpu_s": _median_after(example_cpu, args.skip),
              "proxytune_wall_s": _median_after(ours.wall, args.skip), "proxytune_cpu_s": _median_after(ours.cpu, args.skip),
              "proxytune_final_loss": ours.recipe.progress.losses[-1]}
    result["ratio_wall"] = result["proxytune_wall_s"] / result["example_wall_s"]
    result["ratio_cpu"] = result["proxytune_cpu_s"] / result["example_cpu_s"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--example", required=True, help="path to diffusers' examples/dreambooth/train_dreambooth_lora.py")
    p.add_argument("--torchvision", default=None, help="folder holding a torchvision stand-in package (see the docstring)")
    p.add_argument("--example-args", default="", help="extra flags for the example, e.g. '--pre_compute_text_embeddings'")
    p.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    p.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the median (default 10)")
    p.add_argument("--pairs", type=int, default=2, help="pairs of fresh runs (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    args = p.parse_args()
    C.prepare_env()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from proxytune.backends.teachers import diffusion

    model = diffusion.resolve("tiny-sd")  # the built-in tiny-sd as a diffusers pipeline folder
    references = C.dreambench_subject("dog")
    C.say(f"teacher_vs_example: {C.now()}; {C.machine()}; torch threads {torch.get_num_threads()}")
    C.say(f"  {args.pairs} pairs of runs, {args.steps} steps each, alternating step by step; median per step after "
          f"{args.skip} warm-up steps; model {model}")
    pairs = []
    for i in range(args.pairs):
        pairs.append(run_pair(Path(args.example).resolve(), args.torchvision, model, references, args))
        C.say(f"  pair {i + 1}: {json.dumps({k: round(v, 4) for k, v in pairs[-1].items()})}")
    C.say("")
    for clock in ("wall", "cpu"):
        example = statistics.median(p[f"example_{clock}_s"] for p in pairs)
        ours = statistics.median(p[f"proxytune_{clock}_s"] for p in pairs)
        ratios = [p[f"ratio_{clock}"] for p in pairs]
        ratio = statistics.median(ratios)
        per_pair = ", ".join(f"{r:.2f}" for r in ratios)
        C.say(f"  {clock:>4} per step (medians over pairs): example {example:.4f} s, proxytune {ours:.4f} s; ratio "
              f"{ratio:.2f} (per pair {per_pair}; target <= {TARGET}): {C.verdict(ratio <= TARGET)}")


if __name__ == "__main__":
    main()
