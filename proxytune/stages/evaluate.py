"""Evaluation stage: DreamBench prompts, CLIP-I / CLIP-T / DINO of teacher and student.

Both models see the same prompts and seeds (image k of prompt p: seed + 1000 p + k). Metrics are
means over all generated x reference pairs (CLIP-I, DINO) and over generated images against their
prompt with the identifier removed (CLIP-T, raw cosine). Writes metrics.json (DVC metrics) beside
the output folder `eval/`: table.md, per_prompt.json, encoders.json, grid.png, record.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from proxytune.backends import ar, diffusion, encoders
from proxytune.files import staged_dir, write_json_atomic, write_text_atomic
from proxytune.images import grid, list_images, open_rgb
from proxytune.stages import common
from proxytune.stages.params import StageParams, load_params

METRICS = ("clip_i", "clip_t", "dino")


def eval_prompts(params: StageParams) -> list[str]:
    cfg, subject = params.evaluation, params.subject
    if cfg.prompts == "dreambench":
        prompts = encoders.dreambench_prompts(subject.token, subject.class_noun)
    else:
        prompts = [p.format(token=subject.token, **{"class": subject.class_noun}) for p in cfg.prompts]
    return prompts[: cfg.num_prompts] if cfg.num_prompts else prompts


def seeds_for(params: StageParams, prompt_index: int) -> list[int]:
    cfg = params.evaluation
    return [cfg.seed + 1000 * prompt_index + k for k in range(cfg.images_per_prompt)]


@torch.no_grad()
def teacher_images(params: StageParams, prompts: list[str]) -> list[list]:
    pipe = diffusion.load_pipeline_with_lora(
        params.teacher.model, params.out("teacher") / "adapter", revision=params.teacher.revision,
        scale=params.synthesis.lora_scale,
    )
    pipe.to(common.device())
    pipe.set_progress_bar_config(disable=True)
    out = []
    for p, prompt in enumerate(tqdm(prompts, desc="evaluate: teacher", unit="prompt")):
        seeds = seeds_for(params, p)
        out.append(
            diffusion.generate(
                pipe, [prompt] * len(seeds), seeds, steps=params.synthesis.num_inference_steps,
                guidance=params.synthesis.guidance_scale, size=params.teacher.resolution,
            )
        )
    return out


@torch.no_grad()
def student_images(params: StageParams, prompts: list[str]) -> list[list]:
    from peft import PeftModel

    bundle = ar.load_student(params.student.model, device=str(common.device()))
    bundle.model = PeftModel.from_pretrained(bundle.model, str(params.out("student") / "adapter"))
    bundle.model.eval()
    sampling = params.student.sampling
    out = []
    for p, prompt in enumerate(tqdm(prompts, desc="evaluate: student", unit="prompt")):
        seeds = seeds_for(params, p)
        codes = bundle.generate(
            [prompt] * len(seeds), seeds, cfg_scale=sampling.cfg_scale, top_k=sampling.top_k,
            temperature=sampling.temperature,
        )
        out.append(bundle.decode_codes(codes))
    return out


def score(images: list[list], prompts: list[str], token: str, clip, dino, ref_clip, ref_dino) -> tuple[dict, list[dict]]:
    """Overall and per-prompt CLIP-I, CLIP-T and DINO for one model's images."""
    per_prompt, all_clip, all_text, all_dino = [], [], [], []
    for prompt, group in zip(prompts, images):
        gen_clip = clip.image_embeds(group)
        text = clip.text_embeds([encoders.strip_identifier(prompt, token)] * len(group))
        gen_dino = dino.image_embeds(group)
        per_prompt.append(
            {
                "prompt": prompt,
                "clip_i": encoders.clip_i(gen_clip, ref_clip),
                "clip_t": encoders.clip_t(gen_clip, text),
                "dino": encoders.dino(gen_dino, ref_dino),
            }
        )
        all_clip.append(gen_clip), all_text.append(text), all_dino.append(gen_dino)
    gen_clip, text, gen_dino = torch.cat(all_clip), torch.cat(all_text), torch.cat(all_dino)
    overall = {
        "clip_i": encoders.clip_i(gen_clip, ref_clip),
        "clip_t": encoders.clip_t(gen_clip, text),
        "dino": encoders.dino(gen_dino, ref_dino),
    }
    return overall, per_prompt


def table(metrics: dict[str, dict], random_init: bool, n_prompts: int, k: int) -> str:
    lines = ["| model | CLIP-I | CLIP-T | DINO |", "|---|---|---|---|"]
    for model, values in metrics.items():
        lines.append(f"| {model} | " + " | ".join(f"{values[m]:.4f}" for m in METRICS) + " |")
    lines.append("")
    lines.append(f"{n_prompts} prompts x {k} images per model; CLIP-I and DINO: mean cosine over all generated x reference pairs.")
    if random_init:
        lines.append("")
        lines.append("**Random-initialised models or encoders were used: these numbers test the pipeline, they say nothing about quality.**")
    return "\n".join(lines) + "\n"


def run(params_path: str | Path) -> None:
    params = load_params(params_path)
    common.seed_everything(params.seed)
    teacher_record = common.read_record(params.out("teacher"))
    student_record = common.read_record(params.out("student"))
    prompts = eval_prompts(params)
    references = [open_rgb(p) for p in list_images(params.references_dir)]

    generated = {"teacher": teacher_images(params, prompts), "student": student_images(params, prompts)}

    clip = encoders.load_clip(params.evaluation.clip_model)
    dino = encoders.load_dino(params.evaluation.dino_model)
    ref_clip, ref_dino = clip.image_embeds(references), dino.image_embeds(references)  # once, shared by both models
    metrics, per_prompt = {}, {}
    for model, images in generated.items():
        metrics[model], per_prompt[model] = score(images, prompts, params.subject.token, clip, dino, ref_clip, ref_dino)
    random_init = any(
        [clip.describe()["random_init"], dino.describe()["random_init"], params.teacher.model.startswith("tiny-"),
         params.student.model.startswith("tiny-")]
    )
    described = {"clip": clip.describe(), "dino": dino.describe(), "random_init": random_init,
                 "prompts": len(prompts), "images_per_prompt": params.evaluation.images_per_prompt}

    tags = {
        "teacher_version": f"{teacher_record['model']}@{teacher_record['version']}",
        "student_version": f"{student_record['model']}@{student_record['version']}",
        "random_init": str(random_init),
    }
    out_dir = params.out("eval")
    with common.stage_run(params, "evaluate", tags) as run, staged_dir(out_dir) as tmp:
        write_text_atomic(tmp / "table.md", table(metrics, random_init, len(prompts), params.evaluation.images_per_prompt))
        write_json_atomic(tmp / "per_prompt.json", per_prompt)
        write_json_atomic(tmp / "encoders.json", described)
        rows = []
        for p in range(min(params.evaluation.grid_prompts, len(prompts))):
            rows += [references[:4], generated["teacher"][p], generated["student"][p]]
        grid(rows, cell=128).save(tmp / "grid.png")
        run.log_metrics({f"{model}.{m}": v for model, values in metrics.items() for m, v in values.items()})
        run.log_params({"evaluation": params.evaluation.model_dump(mode="json")})
        run.log_artifacts(tmp, "eval")
        common.write_record(tmp, {"stage": "evaluate", "run_id": run.run_id, **tags, "metrics": metrics})
        write_json_atomic(params.subject_dir / "metrics.json", {**metrics, "random_init": random_init})
    tqdm.write(table(metrics, random_init, len(prompts), params.evaluation.images_per_prompt))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", required=True)
    run(parser.parse_args().params)
