"""How strongly does a toy style teacher draw its style? Its curation images at several LoRA scales (issue 29 item 4).

Reads a project where `proxytune apply` of a toy-style spec (specs/toy-style.yaml) has trained the style teacher,
redraws the curation prompts ("P, in sks style", the curation stage's seeds and sampler) at each
`synthesis.lora_scale` / `guidance_scale` pair, and prints what the toy world's judges read: the style
detector's share (style acc.), the oracle's prompt accuracy and the median outline statistic. No training; the
first pair (1.0 at the spec's guidance) reproduces the curated set's detector share.

    python benchmarks/style_teacher_scale.py --project /tmp/style --settings 1,5 1.25,5 1.5,5 2,5 1,9
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import yaml


def draw(run: Path, params: dict, scale: float, guidance: float) -> list:
    """The curation stage's images of every curation prompt (image i: seed synthesis.seed + i) at `scale`, `guidance`."""
    from proxytune.backends.teachers import diffusion

    style, synthesis = params["style"], params["synthesis"]
    pipe = diffusion.load_pipeline_with_lora(params["teacher"]["model"], run / "teacher" / "adapter", scale=scale)
    pipe.set_progress_bar_config(disable=True)
    prompts, images = style["prompts"], []
    for start in range(0, len(prompts), 16):
        block = range(start, min(start + 16, len(prompts)))
        images += diffusion.generate(pipe, [f"{prompts[i]}, in {style['token']} style" for i in block],
                                     [synthesis["seed"] + i for i in block], steps=synthesis["num_inference_steps"],
                                     guidance=guidance, size=params["teacher"]["resolution"])
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", required=True, help="project folder of a finished toy-style apply")
    parser.add_argument("--settings", nargs="+", default=["1,5", "1.5,5"], help="LORA_SCALE,GUIDANCE pairs")
    args = parser.parse_args()
    from proxytune.toyworld.oracle import shipped_reader
    from proxytune.toyworld.style_metrics import toy_style_scores
    from proxytune.toyworld.styles import style_score

    runs = sorted((Path(args.project) / "runs").glob("*/*/teacher/adapter"))
    if not runs:
        raise SystemExit(f"{args.project}: no runs/EXP/STYLE/teacher/adapter; run proxytune apply on a toy-style spec first")
    run = runs[0].parents[1]
    params = yaml.safe_load((run / "params.yaml").read_text())
    style_name = params["style"]["images"].split(":", 1)[1]
    read = shipped_reader()
    print(f"{run}: {len(params['style']['prompts'])} curation prompts, style {style_name}")
    print("| lora_scale | guidance | style acc. (detector) | prompt acc. (oracle) | median style statistic | s |")
    print("|---|---|---|---|---|---|")
    for setting in args.settings:
        scale, guidance = (float(x) for x in setting.split(","))
        start = time.time()
        images = draw(run, params, scale, guidance)
        scores = toy_style_scores(read, images, params["style"]["prompts"], style_name)
        print(f"| {scale:g} | {guidance:g} | {np.mean(scores['style_acc']):.3f} | {np.mean(scores['prompt_acc']):.3f} | "
              f"{np.median(style_score(images, style_name)):.1f} | {time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
