"""Evaluation stage: the DreamBench protocol for teacher and student, side by side.

Every model sees the same prompts and seeds (image k of prompt p: seed + 1000 p + k). Scores follow
the DreamBench conventions: CLIP-I and DINO are means over all generated x reference pairs, CLIP-T
the raw cosine between each image and its prompt with the identifier removed. Each mean comes with
a 95% bootstrap interval that resamples prompts (each with all its images: the images of one prompt are
not independent draws, see `stats.cluster_bootstrap_ci`). The feature-distribution analysis of the paper's
supplement (total variance of DINO features of M samples of the proxy prompt, and their L2
distances to the samples' centroid) and the promotion gate run here too.

For a toy world subject (images: toyworld:NAME) the world's oracle reads every image's attributes,
which gives two exact, model-free scores per image: subject accuracy (1 when the image shows every
distinctive attribute of the subject that the prompt does not change, else 0) and prompt accuracy
(the fraction of the attributes the prompt asks for, identifier removed, that the image shows).
With `evaluation.base_models` (default: on for toy subjects) the untuned teacher and student are
sampled on the same prompts and seeds and scored as "base-teacher" and "base-student".

A step of a growing proxy count (`grow_evaluate`, stages/proxy_count.py) is this evaluation on its held-out
images; it also writes eval/proxy_count.json, the growth after the step (or hands it on untouched, scoring
nothing, once the growth has stopped).

Writes `metrics.json` (DVC metrics) beside the output folder `eval/`: metrics.json (with
intervals), prompts.json, per_prompt.json, variance.json, gate.json, encoders.json, table.md,
grid.png, images/MODEL/pPP_kK.png, record.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from proxytune import faults, layout
from proxytune import stats
from proxytune.backends import dreambench_prompts, encoders
from proxytune.files import digest_files, sha256_file, staged_dir, write_bytes_atomic, write_text_atomic
from proxytune.images import grid, list_images, open_rgb
from proxytune.outputs import (Bootstrap, EvaluateRecord, EvaluationMetrics, FlatMetrics, Gate, PerPrompt, Prompts,
                               StudentRecord, SubjectEncoders, TeacherRecord, Variance, read_record, write_record)
from proxytune.spec.evaluation import ENCODER_METRICS as METRICS, METRIC_LABELS as LABELS, ORACLE_METRICS  # oracle: toy subjects
from proxytune.stages import proxy_count
from proxytune.stages.params import StageParams, load_params
from proxytune.stages.runtime import config_key, seed_everything, stage_run
from proxytune.stages.sampling import StudentSampler, TeacherSampler, sample_prompts
from proxytune.tracking import registry
from proxytune.toy_judges import oracle_reader, oracle_scores  # the toy world's oracle, through its one seam
from proxytune.toyworld.builtins import is_toy

BASE = {"teacher": "base-teacher", "student": "base-student"}  # the untuned models' names in every output
VARIANCE_SEED_OFFSET = 100_000  # variance samples never reuse the DreamBench seeds


def eval_prompts(params: StageParams) -> list[str]:
    evaluation, subject = params.evaluation, params.subject
    if evaluation.prompts == "dreambench":
        prompts = dreambench_prompts.dreambench_prompts(subject.token, subject.class_noun)
    elif evaluation.prompts == "toyworld":
        from proxytune.toyworld.subjects import toy_prompts

        prompts = toy_prompts(subject.token, subject.class_noun)
    else:
        prompts = [p.format(token=subject.token, **{"class": subject.class_noun}) for p in evaluation.prompts]
    return prompts[: evaluation.num_prompts] if evaluation.num_prompts else prompts


def wants_base_models(params: StageParams) -> bool:
    """evaluation.base_models, where null means: on for a toy world subject, off otherwise."""
    chosen = params.evaluation.base_models
    return chosen if chosen is not None else params.subject.toy_subject is not None


@torch.no_grad()
def sample_variance(sampler, params: StageParams, prompt: str, name: str, batch: int = 8) -> list:
    count = params.evaluation.variance_samples
    seeds = [params.evaluation.seed + VARIANCE_SEED_OFFSET + i for i in range(count)]
    images = []
    for start in tqdm(range(0, count, batch), desc=f"evaluate: {name} variance samples", unit="batch"):
        chunk = seeds[start : start + batch]
        images += sampler([prompt] * len(chunk), chunk)
    return images


# -- scoring ----------------------------------------------------------------------------------
def per_image_scores(images: list[list], prompts: list[str], token: str, clip, dino, ref_clip, ref_dino) -> dict:
    """(N,) arrays of CLIP-I, CLIP-T and DINO per generated image, prompt-major order."""
    flat = [image for group in images for image in group]
    texts = [dreambench_prompts.strip_identifier(p, token) for p, group in zip(prompts, images) for _ in group]
    gen_clip = clip.image_embeds(flat)
    return {
        "clip_i": encoders.per_image_pairwise_cosine(gen_clip, ref_clip).numpy(),
        "clip_t": encoders.per_image_clip_t(gen_clip, clip.text_embeds(texts)).numpy(),
        "dino": encoders.per_image_pairwise_cosine(dino.image_embeds(flat), ref_dino).numpy(),
    }


def summarize(scores: dict, resamples: int, seed: int, images_per_prompt: int = 1) -> dict:
    """Mean and 95% bootstrap interval per metric, resampling prompts (their `images_per_prompt` images
    together; 1 resamples single images); NaN entries (an image a metric does not apply to) are left out,
    and a metric with no value at all is dropped."""
    summary = {}
    for metric, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        clusters = stats.prompt_clusters(values.size, images_per_prompt)
        if (~np.isnan(values)).any():
            summary[metric] = {"mean": float(np.nanmean(values)),
                               "ci95": list(stats.cluster_bootstrap_ci(values, clusters, resamples, seed))}
    return summary


def per_prompt(scores: dict, prompts: list[str], k: int) -> list[dict]:
    def mean(values: np.ndarray) -> float | None:
        values = values[~np.isnan(values)]
        return float(values.mean()) if values.size else None

    return [{"prompt": p, **{m: mean(np.asarray(v[i * k : (i + 1) * k], dtype=np.float64)) for m, v in scores.items()}}
            for i, p in enumerate(prompts)]


PER_PROMPT_CSV = layout.PER_PROMPT_FILE  # DVC plots read it: one row per prompt, MODEL_METRIC columns


def per_prompt_csv(breakdown: dict[str, list[dict]]) -> str:
    """per_prompt.json as one CSV: `prompt` (the prompt's index), a `MODEL_METRIC` column per model and
    metric (empty where the metric has no value), and the prompt's text last."""
    import csv
    import io

    columns = [(model, metric) for model, rows in breakdown.items() for metric in rows[0] if metric != "prompt"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["prompt", *(f"{model}_{metric}" for model, metric in columns), "text"])
    first = next(iter(breakdown.values()))
    for i, row in enumerate(first):
        cells = [breakdown[model][i][metric] for model, metric in columns]
        writer.writerow([i, *("" if v is None else repr(v) for v in cells), row["prompt"]])
    return out.getvalue()


def gate_difference_ci(rule, scores: dict[str, dict], images_per_prompt: int, resamples: int,
                       seed: int) -> tuple[float, float]:
    """95% interval of student - target for one rule (target: the teacher's score + margin, or the number +
    margin), resampling prompts. Against the teacher the difference is paired image by image: both models
    saw the same prompts and seeds."""
    student = np.asarray(scores["student"][rule.metric], dtype=np.float64)
    if rule.vs == "teacher":
        difference = student - np.asarray(scores["teacher"][rule.metric], dtype=np.float64)
    else:
        difference = student - float(rule.vs)
    clusters = stats.prompt_clusters(difference.size, images_per_prompt)
    low, high = stats.cluster_bootstrap_ci(difference - rule.margin, clusters, resamples, seed)
    return low, high


def evaluate_gate(rules, means: dict[str, dict[str, float]],
                  intervals: list[tuple[float, float]] | None = None) -> tuple[bool, list[str]]:
    """Check every rule: on the means (`require: mean`) or on the lower end of the 95% prompt-bootstrap
    interval of student - target (`require: interval`), one detail line per rule.

    Args:
        intervals: per rule, the interval of `gate_difference_ci`; needed for `require: interval` rules.
    Raises:
        ValueError: a `require: interval` rule without its interval.
    """
    details, passed = [], True
    for i, rule in enumerate(rules):
        student = means["student"][rule.metric]
        target = (means["teacher"][rule.metric] if rule.vs == "teacher" else float(rule.vs)) + rule.margin
        interval = intervals[i] if intervals is not None else None
        if rule.require == "interval":
            if interval is None:
                raise ValueError(f"gate rule {rule.describe()} requires the interval of the difference")
            ok = interval[0] >= 0
        else:
            ok = student >= target
        passed &= ok
        line = f"{rule.describe()}: {student:.4f} {'>=' if student >= target else '<'} {target:.4f}"
        if interval is not None:
            line += f", difference {student - target:+.4f} [95% over prompts {interval[0]:+.4f}, {interval[1]:+.4f}]"
        details.append(f"{line} {'pass' if ok else 'FAIL'}")
    return passed, details


def oracle_description(subject) -> dict:
    """What encoders.json records about the oracle scores: the oracle's weights and the subject's look."""
    from proxytune.toyworld.builtins import manifest, oracle_folder

    return {"model": "toy-oracle", "path": str(oracle_folder()), "digest": manifest().get("toy-oracle", {}).get("digest"),
            "subject": subject.name, "look": subject.description(),
            "subject_acc": "1 when the oracle reads every attribute of distinctive(subject, prompt) off the image, else 0",
            "prompt_acc": "fraction of parse_prompt(prompt without identifier) the oracle reads off the image",
            "subject_prompt_acc": "1 when subject_acc is 1 and the oracle reads all of parse_prompt(...), else 0"}


def reference_embeddings(params: StageParams, clip, dino, references: list, files: list[Path]):
    """CLIP and DINO embeddings of the references, computed once per encoder pair and cached."""
    from safetensors.torch import load_file, save

    digest = digest_files([(p.name, sha256_file(p)) for p in files])
    cache = params.work("evaluate") / f"refs-{config_key(clip.ref, dino.ref, digest)}.safetensors"
    if cache.exists():
        tensors = load_file(cache)
        return tensors["clip"], tensors["dino"]
    ref_clip, ref_dino = clip.image_embeds(references), dino.image_embeds(references)
    write_bytes_atomic(cache, save({"clip": ref_clip.contiguous(), "dino": ref_dino.contiguous()}))
    return ref_clip, ref_dino


TOY_WORLD_NOTE = ("Toy world: models pretrained on proxytune's procedural world (proxytune/toyworld); CLIP-I, CLIP-T "
                  "and DINO come from its toy encoders, subject and prompt accuracy from its oracle, which reads the "
                  "attributes off each image.")


def table(metrics: dict, random_init: bool, n_prompts: int, k: int, toy_world: bool = False) -> str:
    columns = [m for m in (*METRICS, *ORACLE_METRICS) if any(m in values for values in metrics.values())]
    lines = ["| model | " + " | ".join(LABELS[m] for m in columns) + " |", "|---|" + "---|" * len(columns)]
    for model, values in metrics.items():
        cells = [f"{values[m]['mean']:.4f} [{values[m]['ci95'][0]:.4f}, {values[m]['ci95'][1]:.4f}]" if m in values
                 else "—" for m in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", f"{n_prompts} prompts x {k} images per model; mean [95% bootstrap interval, resampling prompts "
              "with all their images]. "
              "CLIP-I and DINO: mean cosine over all generated x reference pairs; CLIP-T: raw cosine, identifier removed."]
    if any(m in columns for m in ORACLE_METRICS):
        lines[-1] += (" Subject acc.: fraction of images in which the oracle finds every distinctive attribute of the "
                      "subject the prompt does not change; prompt acc.: per image, the fraction of the attributes the "
                      "prompt asks for that the oracle finds, averaged; subject+prompt acc.: fraction of images "
                      "showing the subject and everything the prompt asks.")
    if any(name in metrics for name in BASE.values()):
        lines[-1] += " base-teacher / base-student: the untuned models, same prompts and seeds."
    if random_init:
        lines += ["", "**Random-initialised models or encoders were used: these numbers test the pipeline, they say nothing about quality.**"]
    elif toy_world:
        lines += ["", f"*{TOY_WORLD_NOTE}*"]
    return "\n".join(lines) + "\n"


def run(params_path: str | Path) -> None:
    params = load_params(params_path)
    evaluation = params.evaluation
    growth = None  # a step of a growing proxy count: the growth its student handed on
    if params.grow is not None and params.grow.index is not None:
        growth = proxy_count.read_state(params.student_out())
        if growth.stopped is not None:
            proxy_count.hand_on(growth, params.out("eval"))
            tqdm.write(f"evaluate: skipped, the proxy count was chosen before this step ({growth.stopped})")
            return
    seed_everything(params.seed)
    teacher_record = read_record(params.out("teacher"), TeacherRecord)
    student_record = read_record(params.student_out(), StudentRecord)
    prompts = eval_prompts(params)
    proxy_prompt = params.synthesis.prompt.format(token=params.subject.token, **{"class": params.subject.class_noun})
    reference_files = list_images(params.references_dir)
    references = [open_rgb(p) for p in reference_files]

    generated, variance_images = {}, {}
    random_models, model_paths, student_sampling = [], [], None
    base = wants_base_models(params)
    for name, make in (("teacher", TeacherSampler), ("student", StudentSampler)):
        for tuned in (False, True) if base else (True,):
            sampler = make(params, tuned=tuned)
            label = name if tuned else BASE[name]
            random_models.append(sampler.random_init)
            model_paths.append(sampler.path)
            student_sampling = getattr(sampler, "sampling", student_sampling)
            generated[label] = sample_prompts(sampler, params, prompts, label)
            if evaluation.variance_samples and tuned:
                variance_images[name] = sample_variance(sampler, params, proxy_prompt, name)
            del sampler
    faults.kill_point("evaluate", "generated")

    clip, dino = encoders.load_clip(evaluation.clip_model), encoders.load_dino(evaluation.dino_model)
    ref_clip, ref_dino = reference_embeddings(params, clip, dino, references, reference_files)
    toy = None
    if params.subject.toy_subject is not None:
        from proxytune.toyworld.subjects import SUBJECTS

        toy = SUBJECTS[params.subject.toy_subject]
        read = oracle_reader()
    metrics, breakdown, all_scores = {}, {}, {}
    for name, images in generated.items():
        scores = per_image_scores(images, prompts, params.subject.token, clip, dino, ref_clip, ref_dino)
        if toy is not None:
            scores.update(oracle_scores(read, images, prompts, params.subject.token, toy))
        all_scores[name] = scores
        metrics[name] = summarize(scores, evaluation.bootstrap_resamples, evaluation.seed, evaluation.images_per_prompt)
        breakdown[name] = per_prompt(scores, prompts, evaluation.images_per_prompt)
    variance = None
    if variance_images:
        variance = {"feature": f"DINO CLS of last_hidden_state, unnormalised ({evaluation.dino_model})",
                    "samples": evaluation.variance_samples, "prompt": proxy_prompt,
                    "centroid": "mean feature of the model's own samples", "models": {}}
        for name, images in variance_images.items():
            features = dino.image_features(images).numpy()
            variance["models"][name] = {"total_variance": stats.total_variance(features),
                                        "distances": stats.centroid_distances(features).tolist()}
    means = {name: {m: v["mean"] for m, v in values.items()} for name, values in metrics.items()}
    gate = None
    if evaluation.gate:
        intervals = [gate_difference_ci(rule, all_scores, evaluation.images_per_prompt, evaluation.bootstrap_resamples, evaluation.seed)
                     for rule in evaluation.gate]
        passed, details = evaluate_gate(evaluation.gate, means, intervals)
        gate = Gate(rule=" and ".join(r.describe() for r in evaluation.gate), passed=passed, details=details,
                    difference_ci95=[list(interval) for interval in intervals], student_version=student_record.registered)
    random_init = any([clip.describe()["random_init"], dino.describe()["random_init"], *random_models])
    toy_world = not random_init and all(is_toy(path) for path in [*model_paths, clip.path, dino.path])
    described = {"clip": clip.describe(), "dino": dino.describe(), "random_init": random_init, "toy_world": toy_world}
    if toy is not None:
        described["oracle"] = oracle_description(toy)
    summary = EvaluationMetrics(models=metrics, random_init=random_init, toy_world=toy_world, prompts=len(prompts),
                                images_per_prompt=evaluation.images_per_prompt,
                                bootstrap=Bootstrap(resamples=evaluation.bootstrap_resamples, seed=evaluation.seed, unit="prompt"))

    tags = {
        "teacher_version": teacher_record.registered,
        "student_version": student_record.registered,
        "random_init": str(random_init),
        "toy_world": str(toy_world),
        "clip_model": evaluation.clip_model,
        "dino_model": evaluation.dino_model,
    }
    out_dir = params.out("eval")
    with stage_run(params, "evaluate", tags) as run, staged_dir(out_dir) as tmp:
        for name, groups in generated.items():
            (tmp / "images" / name).mkdir(parents=True)
            for p, group in enumerate(groups):
                for k, image in enumerate(group):
                    image.save(tmp / "images" / name / f"p{p:02d}_k{k}.png")
        summary.write(tmp / layout.METRICS_FILE)
        Prompts(prompts).write(tmp / layout.PROMPTS_FILE)
        PerPrompt(breakdown).write(tmp / layout.PROMPT_SCORES_FILE)
        write_text_atomic(tmp / PER_PROMPT_CSV, per_prompt_csv(breakdown))
        # Weights paths differ by machine (model cache, HF cache): record.json has them, the output does not.
        SubjectEncoders(**{name: ({k: v for k, v in entry.items() if k != "path"} if isinstance(entry, dict) else entry)
                           for name, entry in described.items()}).write(tmp / layout.ENCODERS_FILE)
        if variance:
            Variance(**variance).write(tmp / layout.VARIANCE_FILE)
        if gate:
            gate.write(tmp / layout.GATE_FILE)
        if growth is not None:
            growth = proxy_count.after_step(growth, params, metrics["student"])
            growth.write(tmp / layout.COUNT_FILE)
            run.log_metrics({f"held_out.{growth.metric}": growth.steps[-1].mean})
        write_text_atomic(tmp / "table.md", table(metrics, random_init, len(prompts), evaluation.images_per_prompt, toy_world))
        rows = []
        for p in range(min(evaluation.grid_prompts, len(prompts))):
            rows += [references[:4], *(groups[p] for groups in generated.values())]
        grid(rows, cell=128).save(tmp / "grid.png")
        run.log_params({"evaluation": evaluation.model_dump(mode="json"), "encoders": described, "student_sampling": student_sampling})
        run.log_metrics({f"{name}.{m}": v for name, values in means.items() for m, v in values.items()})
        if variance:
            run.log_metrics({f"{name}.total_variance": v["total_variance"] for name, v in variance["models"].items()})
        if gate:
            run.log_metrics({"gate_passed": float(gate.passed)})
            registry.record_gate(run.uri, gate.student_version, gate.passed, gate.rule)
        run.log_artifacts(tmp, "eval")
        write_record(tmp, EvaluateRecord(stage="evaluate", run_id=run.run_id, **tags, metrics=means,
                                         gate=gate.passed if gate else None, student_sampling=student_sampling,
                                         encoder_paths={name: entry["path"] for name, entry in described.items()
                                                        if isinstance(entry, dict) and "path" in entry}))
        flat = FlatMetrics(**means, random_init=random_init, toy_world=toy_world,
                           **({"gate_passed": gate.passed} if gate else {}))
        flat.write(params.subject_dir / layout.METRICS_FILE)
    tqdm.write(table(metrics, random_init, len(prompts), evaluation.images_per_prompt, toy_world))
    if growth is not None:
        tqdm.write(f"proxy count: {growth.stopped or 'growing'}")
    if gate:
        tqdm.write("gate: " + ("passed: alias 'champion' set" if gate.passed else "failed: no alias") + "\n  " + "\n  ".join(gate.details))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", required=True)
    run(parser.parse_args().params)
