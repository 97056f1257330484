"""Style evaluation stage (StyleAR, issue 15): the style teacher and the style student on a fixed prompt set.

Prompts: `evaluation.prompts` as a list (used as written, no identifier), else a built-in set: 'dreambench'
gives STYLE_PROMPTS (ten everyday subjects, none of them a style reference's usual content), 'toyworld' ten
toy world captions (seed 12345); `evaluation.num_prompts` keeps the first N. Image k of prompt p gets seed
`evaluation.seed + 1000 p + k` for every model. With several references, image k of the student is drawn in
the style of reference k mod R.

Models: "teacher" (the style LoRA, prompt "P, in {token} style": what curation makes for an unseen prompt),
"student" (prompt P + the reference image, style-enhanced tokens at `style_student.noise_strength`) and,
for each of `style_student.eval_noise_strengths`, "student@noise=X" (the same seeds: the leakage/style trade).
Scores (backends/style_metrics.py): style_clip, style_gram (Gram matrices of DINO patch tokens), clip_t,
leakage (CLIP similarity to `styles[i].content`, when given) and content_dino; each mean with a 95%
bootstrap interval resampling prompts.

A toy world style (`styles[i].images: toyworld:NAME`, proxytune/toyworld/styles.py) adds three model-free
scores per image, like the oracle scores of a toy subject: style_acc (the style detector finds the style: 1/0),
prompt_acc (the fraction of the prompt's attributes the oracle reads off the image) and content_leak (of the
references' content attributes, a red ball on the beach, that the prompt asks to be otherwise, the fraction
the oracle reads off the image anyway); `evaluation.prompts: toyworld` then gives prompts naming a class,
colour and scene other than the references' and none of the curation prompts, and "base-student" (the
untuned student on the prompt alone, no style) is scored too: its style accuracy and leakage are the floors.

Writes `metrics.json` (DVC metrics) beside the output folder `eval/`: metrics.json, per_prompt.json,
prompts.json, encoders.json, table.md, grid.png (per prompt: reference | teacher (curated) | student images),
images/MODEL/pPP_kK.png, record.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from proxytune import faults, layout, stats
from proxytune.backends import encoders, students
from proxytune.backends.style_metrics import DESCRIPTIONS, STYLE_METRICS, reference_embeds, style_scores
from proxytune.backends.stylear.style_student import SAMPLING, StyleStudent
from proxytune.backends.student_api import sampling_settings
from proxytune.backends.teachers import diffusion
from proxytune.errors import ProxytuneError
from proxytune.files import staged_dir, write_png_atomic, write_text_atomic
from proxytune.images import center_crop_resize, grid, list_images, open_rgb
from proxytune.outputs import (Bootstrap, EvaluationMetrics, FlatMetrics, PerPrompt, Prompts, StyleEncoders,
                               StyleEvaluateRecord, StyleStudentRecord, TeacherRecord, read_record, write_record)
from proxytune.spec.style import STYLE_CURATION_PROMPT, GeneratedPrompts, generated_prompts
from proxytune.stages.params import StageParams, load_params
from proxytune.stages.runtime import device, generation_dtype, seed_everything, stage_run
from proxytune.stages.sampling import StudentSampler, sample_prompts, seeds_for
from proxytune.toyworld.oracle import shipped_reader as oracle_reader  # images -> attribute readings

STYLE_PROMPTS = ("a cat", "a red bicycle", "a house by a lake", "a bowl of fruit", "a sailing boat", "a mountain at dawn",
                 "a portrait of a woman", "a city street at night", "an owl on a branch", "a teapot on a table")
LABELS = {"style_clip": "style CLIP", "style_gram": "style Gram", "clip_t": "CLIP-T", "leakage": "leakage (CLIP)",
          "content_dino": "content (DINO)", "style_acc": "style acc. (detector)", "prompt_acc": "prompt acc. (oracle)",
          "content_leak": "content leak (oracle)"}
TOY_METRICS = ("style_acc", "prompt_acc", "content_leak")
TOY_DESCRIPTIONS = {
    "style_acc": "1 when the toy world's style detector (proxytune.toyworld.styles, pixel statistics) finds the style",
    "prompt_acc": "fraction of the prompt's attributes (parse_prompt) the toy oracle reads off the image",
    "content_leak": "fraction of the references' content attributes (class, colour, scene of a red ball on the beach) "
                    "that the prompt asks to be otherwise and the oracle reads off the image anyway; 0 = no copying",
}


def eval_prompts(params: StageParams) -> list[str]:
    evaluation = params.evaluation
    if isinstance(evaluation.prompts, list):
        prompts = list(evaluation.prompts)
    elif evaluation.prompts == "toyworld" and params.style.toy_style is not None:
        from proxytune.toyworld.styles import eval_prompts as toy_style_prompts

        return toy_style_prompts(evaluation.num_prompts or 10, 12345, exclude=set(params.style.prompts))
    elif evaluation.prompts == "toyworld":
        prompts = generated_prompts(GeneratedPrompts(generate=10, vocabulary="toyworld", seed=12345))
    else:
        prompts = list(STYLE_PROMPTS)
    return prompts[: evaluation.num_prompts] if evaluation.num_prompts else prompts


@torch.no_grad()
def teacher_images(params: StageParams, prompts: list[str]) -> list[list]:
    """The style teacher's images of "P, in {token} style" (what curation would add for P)."""
    s = params.synthesis
    pipe = diffusion.load_pipeline_with_lora(params.teacher.model, params.out("teacher") / "adapter",
                                             revision=params.teacher.revision, scale=s.lora_scale,
                                             dtype=generation_dtype(s.dtype), quantize=s.quantize)
    note = diffusion.place_for_generation(pipe, device(), cpu_offload=s.cpu_offload, vae_tiling=s.vae_tiling)
    if note:
        tqdm.write(note)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for p, prompt in enumerate(tqdm(prompts, desc="style evaluate: teacher", unit="prompt")):
        seeds = seeds_for(params, p)
        text = STYLE_CURATION_PROMPT.format(prompt=prompt, token=params.style.token)
        out.append(diffusion.generate(pipe, [text] * len(seeds), seeds, steps=s.num_inference_steps,
                                      guidance=s.guidance_scale, size=params.teacher.resolution))
    return out


@torch.no_grad()
def student_images(style: StyleStudent, sampling: dict, params: StageParams, prompts: list[str], references: list,
                   noise_strength: float, label: str) -> list[list]:
    """The style student's images: image k of each prompt in the style of reference k mod R."""
    features = style.image_features(references)  # (R, S, W)
    out = []
    for p, prompt in enumerate(tqdm(prompts, desc=f"style evaluate: {label}", unit="prompt")):
        seeds = seeds_for(params, p)
        chosen = features[[k % len(references) for k in range(len(seeds))]]
        codes = style.generate([prompt] * len(seeds), chosen, seeds, noise_strength=noise_strength, **sampling)
        out.append(style.student.decode_codes(codes))
    return out


def toy_style_scores(read, images: list, prompts: list[str], style_name: str) -> dict[str, np.ndarray]:
    """(N,) arrays of TOY_METRICS for images of a toy style, prompt-major (image i drawn for prompts[i]).

    Args:
        read: images -> the oracle's attribute readings (`oracle_reader()`).
        images: the generated images (PIL).
        prompts: each image's prompt, without identifier.
        style_name: one of proxytune.toyworld.styles.STYLES.

    A metric that some prompt does not define (a prompt naming no class, or asking for the references' own
    class, colour and scene) is left out.
    """
    from proxytune.toyworld import oracle as oracle_lib
    from proxytune.toyworld import styles as toy_styles
    from proxytune.toyworld.world import parse_prompt

    seen = read(images)
    scores = {"style_acc": toy_styles.detects(images, style_name).astype(np.float64)}
    per_image = {"prompt_acc": [oracle_lib.prompt_accuracy(r, parse_prompt(p)) for r, p in zip(seen, prompts)],
                 "content_leak": [toy_styles.leakage(r, p) for r, p in zip(seen, prompts)]}
    for name, values in per_image.items():
        if all(v is not None for v in values):
            scores[name] = np.asarray(values, dtype=np.float64)
    return scores


def summarize(scores: dict, resamples: int, seed: int, k: int) -> dict:
    """Mean and 95% bootstrap interval per metric, resampling prompts with all their images."""
    summary = {}
    for metric, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        clusters = stats.prompt_clusters(values.size, k)
        summary[metric] = {"mean": float(values.mean()), "ci95": list(stats.cluster_bootstrap_ci(values, clusters, resamples, seed))}
    return summary


def table(metrics: dict, random_init: bool, n_prompts: int, k: int) -> str:
    columns = [m for m in (*STYLE_METRICS, *TOY_METRICS) if any(m in v for v in metrics.values())]
    lines = ["| model | " + " | ".join(LABELS[m] for m in columns) + " |", "|---|" + "---|" * len(columns)]
    for model, values in metrics.items():
        cells = [f"{values[m]['mean']:.4f} [{values[m]['ci95'][0]:.4f}, {values[m]['ci95'][1]:.4f}]" if m in values else "—"
                 for m in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", f"{n_prompts} prompts x {k} images per model; mean [95% bootstrap interval, resampling prompts]. "
              + " ".join(f"{LABELS[m]}: {({**DESCRIPTIONS, **TOY_DESCRIPTIONS})[m]}." for m in columns)]
    if random_init:
        lines += ["", "**Random-initialised models or encoders were used: these numbers test the pipeline, they say "
                  "nothing about quality.**"]
    return "\n".join(lines) + "\n"


def run(params_path: str | Path) -> None:
    params = load_params(params_path)
    if params.style is None or params.style_student is None:
        raise ProxytuneError(f"{params_path}: the style_evaluate stage is for styles (no style section)")
    evaluation, style_student = params.evaluation, params.style_student
    seed_everything(params.seed)
    teacher_record = read_record(params.out("teacher"), TeacherRecord)
    student_record = read_record(params.out("student"), StyleStudentRecord)
    prompts = eval_prompts(params)
    references = [open_rgb(p) for p in list_images(params.references_dir)]

    toy = params.style.toy_style
    generated = {"teacher": teacher_images(params, prompts)}
    bundle = students.load_student(params.student.model, device=str(device()))
    sampling = sampling_settings(SAMPLING[bundle.backend], params.student.sampling)
    if toy is not None:  # the untuned student, before the style student's LoRA wraps the same model
        # the prompt alone, no style tokens: the floor of style accuracy and leakage (cached like evaluate's)
        base = StudentSampler(params, tuned=False, sampling=sampling, bundle=bundle)
        generated["base-student"] = sample_prompts(base, params, prompts, "base-student", stage="style evaluate")
    clip_style = encoders.load_clip(style_student.clip_model, device=str(device()))
    style = StyleStudent.load(params.out("student") / student_record.weights, bundle, clip_style)
    generated["student"] = student_images(style, sampling, params, prompts, references, style_student.noise_strength, "student")
    for strength in style_student.eval_noise_strengths:
        label = f"student@noise={strength:g}"
        generated[label] = student_images(style, sampling, params, prompts, references, strength, label)
    faults.kill_point("style_evaluate", "generated")

    clip, dino = encoders.load_clip(evaluation.clip_model), encoders.load_dino(evaluation.dino_model)
    refs = reference_embeds(clip, dino, references)
    k = evaluation.images_per_prompt
    metrics, breakdown = {}, {}
    read = oracle_reader() if toy is not None else None
    for name, groups in generated.items():
        flat = [image for group in groups for image in group]
        texts = [p for p in prompts for _ in range(k)]
        scores = style_scores(flat, texts, refs, clip, dino, params.style.content)
        if toy is not None:
            scores.update(toy_style_scores(read, flat, texts, toy))
        metrics[name] = summarize(scores, evaluation.bootstrap_resamples, evaluation.seed, k)
        breakdown[name] = [{"prompt": p, **{m: float(np.mean(v[i * k : (i + 1) * k])) for m, v in scores.items()}}
                           for i, p in enumerate(prompts)]
    means = {name: {m: v["mean"] for m, v in values.items()} for name, values in metrics.items()}
    random_init = any([clip.describe()["random_init"], dino.describe()["random_init"], bundle.random_init,
                       diffusion_random(params)])
    described = {"clip": clip.describe(), "dino": dino.describe(), "style_encoder": style_student.clip_model,
                 "metrics": {m: DESCRIPTIONS[m] for m in STYLE_METRICS}, "random_init": random_init,
                 "content": params.style.content, "noise_strength": style_student.noise_strength, "sampling": sampling}
    if toy is not None:
        from proxytune.toyworld import styles as toy_styles
        from proxytune.toyworld.builtins import manifest, oracle_folder

        described["metrics"].update(TOY_DESCRIPTIONS)
        described["toy_style"] = {"style": toy, "detector": toy_styles.DESCRIPTIONS[toy],
                                  "content": toy_styles.CONTENT_CAPTION, "oracle": str(oracle_folder()),
                                  "oracle_digest": manifest().get("toy-oracle", {}).get("digest")}
    summary = EvaluationMetrics(models=metrics, random_init=random_init, prompts=len(prompts), images_per_prompt=k,
                                bootstrap=Bootstrap(resamples=evaluation.bootstrap_resamples, seed=evaluation.seed, unit="prompt"),
                                kind="style")
    tags = {"teacher_version": teacher_record.registered,
            "student_version": student_record.registered,
            "random_init": str(random_init), "clip_model": evaluation.clip_model, "dino_model": evaluation.dino_model,
            "style": params.style.name, "dvc_stage": layout.stage_name("style_evaluate", params.experiment, params.subject.name)}
    with stage_run(params, "style_evaluate", tags) as run, staged_dir(params.out("eval")) as tmp:
        for name, groups in generated.items():
            folder = tmp / "images" / name.replace("@", "_").replace("=", "")
            folder.mkdir(parents=True)
            for p, group in enumerate(groups):
                for j, image in enumerate(group):
                    image.save(folder / f"p{p:02d}_k{j}.png")
        summary.write(tmp / layout.METRICS_FILE)
        Prompts(prompts).write(tmp / layout.PROMPTS_FILE)
        PerPrompt(breakdown).write(tmp / layout.PROMPT_SCORES_FILE)
        StyleEncoders(**described).write(tmp / layout.ENCODERS_FILE)
        write_text_atomic(tmp / "table.md", table(metrics, random_init, len(prompts), k))
        cell = 128
        rows = []
        for p in range(min(evaluation.grid_prompts, len(prompts))):  # reference | teacher (curated) | student
            rows.append([center_crop_resize(references[0], cell), *generated["teacher"][p], *generated["student"][p]])
        write_png_atomic(tmp / "grid.png", grid(rows, cell=cell))
        run.log_params({"evaluation": evaluation.model_dump(mode="json"), "style_student": style_student.model_dump(mode="json"),
                        "encoders": described})
        run.log_metrics({f"{mlflow_name(name)}.{m}": v for name, values in means.items() for m, v in values.items()})
        run.log_artifacts(tmp, "eval")
        write_record(tmp, StyleEvaluateRecord(stage="style_evaluate", run_id=run.run_id, **tags, metrics=means))
        FlatMetrics(**means, random_init=random_init).write(params.subject_dir / layout.METRICS_FILE)
    tqdm.write(table(metrics, random_init, len(prompts), k))


def mlflow_name(model: str) -> str:
    """A model label as an MLflow metric prefix: MLflow refuses '@' and '=' ("student@noise=1" -> "student.noise_1")."""
    return model.replace("@noise=", ".noise_")


def diffusion_random(params: StageParams) -> bool:
    from proxytune.backends import tiny_cache

    return tiny_cache.is_random_init(diffusion.resolve(params.teacher.model))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", required=True)
    run(parser.parse_args().params)
