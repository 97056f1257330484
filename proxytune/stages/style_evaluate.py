"""Style evaluation stage (StyleAR, issue 15): the style teacher and the style student on a fixed prompt set.

Prompts: `evaluation.prompts` as a list (used as written, no identifier), else a built-in set: 'dreambench'
gives STYLE_PROMPTS (ten everyday subjects, none of them a style reference's usual content), 'toyworld' ten
toy world captions (seed 12345); `evaluation.num_prompts` keeps the first N. Image k of prompt p gets seed
`evaluation.seed + 1000 p + k` for every model. With several references, image k of the student is drawn in
the style of reference k mod R.

Models: "teacher" (the style LoRA, prompt "P, in {token} style": what curation makes for an unseen prompt),
"student" (prompt P + the reference image, style-enhanced tokens at `style_student.noise_strength`) and,
for each of `style_student.eval_noise_strengths`, "student@noise=X" (the same seeds: the leakage/style trade).
Each score is a mean with a 95% bootstrap interval resampling prompts.

Which scores: every style metric of the registry (`proxytune.metrics`, scope "style") whose needs this
evaluation has: proxytune's (backends/style_metrics.py: style_clip, style_gram, clip_t, leakage, content_dino)
always, a plugin's world metrics only for a style of that world (`styles[i].images: toyworld:NAME`: the toy
world's style_acc, prompt_acc and content_leak, proxytune/toyworld/style_metrics.py). A metric that does not
apply to every image (NaN: leakage without `styles[i].content`, an oracle score some prompt leaves undefined)
is left out. For a world's style, `evaluation.prompts: toyworld` takes the world's style prompts (naming a
class, colour and scene other than the references' and none of the curation prompts), and "base-student"
(the untuned student on the prompt alone, no style) is scored too: its style accuracy and leakage are the floors.

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

from proxytune import builtins, faults, layout, stats
from proxytune import metrics as registry
from proxytune.backends import encoders, students
from proxytune.backends.style_metrics import reference_embeds
from proxytune.backends.stylear.style_student import SAMPLING, StyleStudent
from proxytune.backends.students.api import sampling_settings
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

STYLE_PROMPTS = ("a cat", "a red bicycle", "a house by a lake", "a bowl of fruit", "a sailing boat", "a mountain at dawn",
                 "a portrait of a woman", "a city street at night", "an owl on a branch", "a teapot on a table")
WORLD_PROMPT_SEED = 12345  # `evaluation.prompts: toyworld`: the world's prompts are drawn with this seed


def style_world(params: StageParams) -> tuple[builtins.World | None, str | None]:
    """The built-in world the style comes from (`images: WORLD:NAME`) and the style's name there, or (None, None)."""
    ref = builtins.world_ref(params.style.images)
    if ref is None:
        return None, None
    world = builtins.world(ref[0])
    if world is None:
        raise ProxytuneError(f"style {params.style.name}: images: {params.style.images} needs the {ref[0]} plugin, which is "
                             "not installed; reinstall proxytune (pip install -e .) or give a folder of reference images")
    return world, ref[1]


def eval_prompts(params: StageParams, world: builtins.World | None = None) -> list[str]:
    evaluation = params.evaluation
    if isinstance(evaluation.prompts, list):
        prompts = list(evaluation.prompts)
    elif evaluation.prompts == "toyworld" and world is not None:
        count = evaluation.num_prompts or 10
        try:
            return world.style_prompts(count, WORLD_PROMPT_SEED, exclude=set(params.style.prompts))
        except ValueError as err:  # the world composes a fixed number of held-out prompts
            raise ProxytuneError(f"{params.source.spec_file}: evaluation.num_prompts: {count} is more than the world's "
                                 f"held-out style prompts for style {params.style.name} ({err}); set a smaller "
                                 "num_prompts") from None
    elif evaluation.prompts == "toyworld":
        prompts = generated_prompts(GeneratedPrompts(generate=10, vocabulary="toyworld", seed=WORLD_PROMPT_SEED))
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


def sample(params: StageParams, prompts: list[str], references: list, weights: str, world) -> tuple[dict, object, dict]:
    """Every evaluated model's images (model -> per prompt, its images), the student bundle and its sampler settings."""
    style_student = params.style_student
    generated = {"teacher": teacher_images(params, prompts)}
    bundle = students.load_student(params.student.model, device=str(device()))
    sampling = sampling_settings(SAMPLING[bundle.backend], params.student.sampling)
    if world is not None:  # the untuned student, before the style student's LoRA wraps the same model
        # the prompt alone, no style tokens: the floor of style accuracy and leakage (cached like evaluate's)
        base = StudentSampler(params, tuned=False, sampling=sampling, bundle=bundle)
        generated["base-student"] = sample_prompts(base, params, prompts, "base-student", stage="style evaluate")
    clip_style = encoders.load_clip(style_student.clip_model, device=str(device()))
    style = StyleStudent.load(params.out("student") / weights, bundle, clip_style)
    generated["student"] = student_images(style, sampling, params, prompts, references, style_student.noise_strength, "student")
    for strength in style_student.eval_noise_strengths:
        label = f"student@noise={strength:g}"
        generated[label] = student_images(style, sampling, params, prompts, references, strength, label)
    faults.kill_point("style_evaluate", "generated")
    return generated, bundle, sampling


def scored_metrics(world) -> tuple[registry.Metric, ...]:
    """The registry's style metrics this evaluation computes: those of the encoders always (CLIP and DINO are
    always loaded), a world's judges only for a style of that world (`needs` "world", provider = the world's name)."""
    return registry.applicable("style", world)


def score(generated: dict[str, list[list]], prompts: list[str], chosen, **inputs) -> dict[str, dict[str, np.ndarray]]:
    """model -> metric -> (N,) scores, prompt-major; a metric NaN for some image does not apply and is left out.

    Args:
        generated: model -> per prompt, its images.
        prompts: the evaluation prompts.
        chosen: the metrics to compute (`scored_metrics`).
        **inputs: the rest of `proxytune.metrics.ScoringInputs` (encoders, references, content, world, item).
    """
    scores = {}
    for model, groups in generated.items():
        scoring = registry.ScoringInputs(images=groups, prompts=prompts, **inputs)  # a fresh cache per model
        values = {metric.name: np.asarray(metric.score(scoring)) for metric in chosen}
        scores[model] = {name: v for name, v in values.items() if not np.isnan(v).any()}
    return scores


def mean_and_interval(scores: dict, resamples: int, seed: int, k: int) -> dict:
    """Mean and 95% bootstrap interval per metric, resampling prompts with all their images."""
    summary = {}
    for metric, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        clusters = stats.prompt_clusters(values.size, k)
        summary[metric] = {"mean": float(values.mean()), "ci95": list(stats.cluster_bootstrap_ci(values, clusters, resamples, seed))}
    return summary


def summarise(scores: dict, prompts: list[str], params: StageParams) -> tuple[dict, dict]:
    """Per model: each metric's mean and interval (metrics.json), and each prompt's means (per_prompt.json)."""
    evaluation, k = params.evaluation, params.evaluation.images_per_prompt
    metrics = {model: mean_and_interval(values, evaluation.bootstrap_resamples, evaluation.seed, k) for model, values in scores.items()}
    breakdown = {model: [{"prompt": p, **{m: float(np.mean(v[i * k : (i + 1) * k])) for m, v in values.items()}}
                         for i, p in enumerate(prompts)] for model, values in scores.items()}
    return metrics, breakdown


def table(metrics: dict, random_init: bool, n_prompts: int, k: int) -> str:
    """table.md: per model, each measured metric's mean and interval (registry order), then what each one is."""
    columns = [m for m in registry.metrics("style") if any(m.name in v for v in metrics.values())]
    lines = ["| model | " + " | ".join(m.label for m in columns) + " |", "|---|" + "---|" * len(columns)]
    for model, values in metrics.items():
        cells = [f"{values[m.name]['mean']:.4f} [{values[m.name]['ci95'][0]:.4f}, {values[m.name]['ci95'][1]:.4f}]"
                 if m.name in values else "—" for m in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", f"{n_prompts} prompts x {k} images per model; mean [95% bootstrap interval, resampling prompts]. "
              + " ".join(f"{m.label}: {m.description}." for m in columns)]
    if random_init:
        lines += ["", "**Random-initialised models or encoders were used: these numbers test the pipeline, they say "
                  "nothing about quality.**"]
    return "\n".join(lines) + "\n"


def describe(params: StageParams, clip, dino, random_init: bool, sampling: dict, chosen, world, item) -> dict:
    """encoders.json: the encoders, what each computed metric measures, and the judges behind them."""
    described = {"clip": clip.describe(), "dino": dino.describe(), "style_encoder": params.style_student.clip_model,
                 "metrics": {m.name: m.description for m in chosen}, "random_init": random_init,
                 "content": params.style.content, "noise_strength": params.style_student.noise_strength, "sampling": sampling}
    for metric in chosen:  # a world's judges: what they are and which weights (the toy world's: "toy_style")
        if metric.describe is not None:
            described.update(metric.describe(world, item))
    return described


def run(params_path: str | Path) -> None:
    params = load_params(params_path)
    if params.style is None or params.style_student is None:
        raise ProxytuneError(f"{params_path}: the style_evaluate stage is for styles (no style section)")
    evaluation = params.evaluation
    seed_everything(params.seed)
    teacher_record = read_record(params.out("teacher"), TeacherRecord)
    student_record = read_record(params.out("student"), StyleStudentRecord)
    world, item = style_world(params)
    prompts = eval_prompts(params, world)
    references = [open_rgb(p) for p in list_images(params.references_dir)]
    generated, bundle, sampling = sample(params, prompts, references, student_record.weights, world)

    clip, dino = encoders.load_clip(evaluation.clip_model), encoders.load_dino(evaluation.dino_model)
    chosen = scored_metrics(world)
    scores = score(generated, prompts, chosen, encoders={"clip": clip, "dino": dino},
                   references=reference_embeds(clip, dino, references), content=params.style.content, world=world, item=item)
    metrics, breakdown = summarise(scores, prompts, params)
    random_init = any([clip.describe()["random_init"], dino.describe()["random_init"], bundle.random_init,
                       diffusion_random(params)])
    described = describe(params, clip, dino, random_init, sampling, chosen, world, item)
    tags = {"teacher_version": teacher_record.registered, "student_version": student_record.registered,
            "random_init": str(random_init), "clip_model": evaluation.clip_model, "dino_model": evaluation.dino_model,
            "style": params.style.name, "dvc_stage": layout.stage_name("style_evaluate", params.experiment, params.subject.name)}
    record(params, generated, prompts, references, metrics, breakdown, described, tags)
    tqdm.write(table(metrics, random_init, len(prompts), evaluation.images_per_prompt))


def record(params: StageParams, generated: dict, prompts: list[str], references: list, metrics: dict, breakdown: dict,
           described: dict, tags: dict) -> None:
    """Write eval/ (staged, renamed into place at the end), log it to the stage's MLflow run, write metrics.json."""
    evaluation, random_init, k = params.evaluation, described["random_init"], params.evaluation.images_per_prompt
    means = {name: {m: v["mean"] for m, v in values.items()} for name, values in metrics.items()}
    summary = EvaluationMetrics(models=metrics, random_init=random_init, prompts=len(prompts), images_per_prompt=k,
                                bootstrap=Bootstrap(resamples=evaluation.bootstrap_resamples, seed=evaluation.seed, unit="prompt"),
                                kind="style")
    with stage_run(params, "style_evaluate", tags) as run, staged_dir(params.out("eval")) as tmp:
        write_images(tmp / "images", generated)
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
        run.log_params({"evaluation": evaluation.model_dump(mode="json"),
                        "style_student": params.style_student.model_dump(mode="json"), "encoders": described})
        run.log_metrics({f"{mlflow_name(name)}.{m}": v for name, values in means.items() for m, v in values.items()})
        run.log_artifacts(tmp, "eval")
        write_record(tmp, StyleEvaluateRecord(stage="style_evaluate", run_id=run.run_id, **tags, metrics=means))
        FlatMetrics(**means, random_init=random_init).write(params.subject_dir / layout.METRICS_FILE)


def write_images(folder: Path, generated: dict) -> None:
    """images/MODEL/pPP_kK.png (a model label's '@' and '=' left out of its folder name)."""
    for name, groups in generated.items():
        model_folder = folder / name.replace("@", "_").replace("=", "")
        model_folder.mkdir(parents=True)
        for p, group in enumerate(groups):
            for j, image in enumerate(group):
                image.save(model_folder / f"p{p:02d}_k{j}.png")


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
