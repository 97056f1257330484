"""Evaluation stage: the DreamBench protocol for teacher and student, side by side.

Every model sees the same prompts and seeds (image k of prompt p: seed + 1000 p + k). Scores follow
the DreamBench conventions: CLIP-I and DINO are means over all generated x reference pairs, CLIP-T
the raw cosine between each image and its prompt with the identifier removed. Each mean comes with
a 95% bootstrap interval that resamples prompts (each with all its images: the images of one prompt are
not independent draws, see `stats.cluster_bootstrap_ci`). The feature-distribution analysis of the paper's
supplement (total variance of DINO features of M samples of the proxy prompt, and their L2
distances to the samples' centroid) and the promotion gate run here too.

The metrics are the subject metrics of `proxytune.metrics` whose needs are met: every subject gets proxytune's
(CLIP-I, CLIP-T, DINO, proxytune.backends.subject_scores); a world's item (images: WORLD:NAME, e.g. the toy
world's subjects) also gets that world's judges (the toy world's oracle: subject and prompt accuracy).
With `evaluation.base_models` (default: on for a world's subject) the untuned teacher and student are
sampled on the same prompts and seeds and scored as "base-teacher" and "base-student".

The stage is four steps: `sample` (every model's images) -> `score` (per image, every metric) ->
`summarise` (means, intervals, per-prompt rows, gate) -> `record` (files, MLflow, promotion).

A step of a growing proxy count (`grow_evaluate`, stages/proxy_count.py) is this evaluation of the student
alone (the stop rule reads nothing else) on its held-out images; it also writes eval/proxy_count.json, the
growth after the step (or hands it on untouched, scoring nothing, once the growth has stopped).

Writes `metrics.json` (DVC metrics) beside the output folder `eval/`: metrics.json (with
intervals), prompts.json, per_prompt.json, variance.json, gate.json, encoders.json, table.md,
grid.png, images/MODEL/pPP_kK.png, record.json.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from proxytune import builtins, faults, layout
from proxytune import metrics as registry_of_metrics
from proxytune import stats
from proxytune.backends import dreambench_prompts, encoders
from proxytune.errors import ProxytuneError
from proxytune.files import digest_files, sha256_file, staged_dir, write_bytes_atomic, write_text_atomic
from proxytune.images import grid, list_images, open_rgb
from proxytune.outputs import (Bootstrap, EvaluateRecord, EvaluationMetrics, FlatMetrics, Gate, PerPrompt, Prompts,
                               StudentRecord, SubjectEncoders, TeacherRecord, Variance, read_record, write_record)
from proxytune.stages import proxy_count
from proxytune.stages.params import StageParams, load_params
from proxytune.stages.runtime import config_key, seed_everything, stage_run
from proxytune.stages.sampling import StudentSampler, TeacherSampler, sample_prompts
from proxytune.tracking import registry

BASE = {"teacher": "base-teacher", "student": "base-student"}  # the untuned models' names in every output
VARIANCE_SEED_OFFSET = 100_000  # variance samples never reuse the DreamBench seeds


def eval_prompts(params: StageParams) -> list[str]:
    evaluation, subject = params.evaluation, params.subject
    if evaluation.prompts == "dreambench":
        prompts = dreambench_prompts.dreambench_prompts(subject.token, subject.class_noun)
    elif isinstance(evaluation.prompts, str):  # a world's prompts, e.g. "toyworld"
        world = builtins.world(evaluation.prompts)
        if world is None:
            raise ProxytuneError(f"{params.source.spec_file}: evaluation.prompts: no world {evaluation.prompts!r} is "
                                 f"installed (installed: {', '.join(builtins.world_names()) or 'none'}); use 'dreambench'")
        prompts = world.subject_prompts(subject.token, subject.class_noun)
    else:
        prompts = [p.format(token=subject.token, **{"class": subject.class_noun}) for p in evaluation.prompts]
    return prompts[: evaluation.num_prompts] if evaluation.num_prompts else prompts


def wants_base_models(params: StageParams) -> bool:
    """evaluation.base_models, where null means: on for a world's subject (e.g. the toy world's), off otherwise."""
    chosen = params.evaluation.base_models
    return chosen if chosen is not None else builtins.world_item(params.subject.images)[0] is not None


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
def score_images(chosen: tuple, inputs: registry_of_metrics.ScoringInputs) -> dict[str, np.ndarray]:
    """metric -> (N,) scores of one model's images, one entry per metric of `chosen`, in its order.

    Raises:
        ValueError: a scorer returned other than one value per image (names the metric and its provider).
    """
    count = sum(len(group) for group in inputs.images)
    scores = {}
    for metric in chosen:
        values = np.asarray(metric.score(inputs), dtype=np.float64)
        if values.shape != (count,):
            raise ValueError(f"metric {metric.name} ({metric.provider}): {values.shape} scores for {count} images")
        scores[metric.name] = values
    return scores


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
                  "attributes off each image.")  # printed when every model and encoder is a world's (folder marker)


def table(metrics: dict, random_init: bool, n_prompts: int, k: int, toy_world: bool = False) -> str:
    shown = [m for m in registry_of_metrics.metrics("subject") if any(m.name in values for values in metrics.values())]
    columns = [m.name for m in shown]
    lines = ["| model | " + " | ".join(m.label for m in shown) + " |", "|---|" + "---|" * len(columns)]
    for model, values in metrics.items():
        cells = [f"{values[m]['mean']:.4f} [{values[m]['ci95'][0]:.4f}, {values[m]['ci95'][1]:.4f}]" if m in values
                 else "—" for m in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    notes = list(dict.fromkeys(m.note for m in shown if m.note))  # a note shared by several metrics: once
    lines += ["", f"{n_prompts} prompts x {k} images per model; mean [95% bootstrap interval, resampling prompts "
              "with all their images]. " + " ".join(notes)]
    if any(name in metrics for name in BASE.values()):
        lines[-1] += " base-teacher / base-student: the untuned models, same prompts and seeds."
    if random_init:
        lines += ["", "**Random-initialised models or encoders were used: these numbers test the pipeline, they say nothing about quality.**"]
    elif toy_world:
        lines += ["", f"*{TOY_WORLD_NOTE}*"]
    return "\n".join(lines) + "\n"


# -- the four steps -----------------------------------------------------------------------------
@dataclass
class Samples:
    """What `sample` hands on: every model's images for the evaluation's prompts, and where they came from."""

    prompts: list[str]
    proxy_prompt: str  # the variance samples' prompt
    reference_files: list[Path]
    references: list  # the subject's photos (PIL)
    generated: dict[str, list[list]] = field(default_factory=dict)  # model -> per prompt, its images
    variance_images: dict[str, list] = field(default_factory=dict)  # teacher/student -> proxy-prompt samples
    random_models: list[bool] = field(default_factory=list)
    model_paths: list[str] = field(default_factory=list)
    student_sampling: dict | None = None


@dataclass
class Scores:
    """What `score` hands on: per model and metric the (N,) per-image scores, and what scored them."""

    per_image: dict[str, dict[str, np.ndarray]]
    described: dict  # encoders.json's content, paths included (record.json keeps them)
    variance: dict | None
    random_init: bool
    toy_world: bool


@dataclass
class Summary:
    """What `summarise` hands on: means with intervals, per-prompt rows, the gate's verdict."""

    metrics: dict[str, dict]
    breakdown: dict[str, list[dict]]
    means: dict[str, dict[str, float]]
    gate: Gate | None
    output: EvaluationMetrics


def sample(params: StageParams) -> Samples:
    """Every model's images (teacher and student, with their untuned bases when asked), same prompts and seeds."""
    evaluation = params.evaluation
    files = list_images(params.references_dir)
    proxy_prompt = params.synthesis.prompt.format(token=params.subject.token, **{"class": params.subject.class_noun})
    samples = Samples(eval_prompts(params), proxy_prompt, files, [open_rgb(p) for p in files])
    base = wants_base_models(params)
    models = (("teacher", TeacherSampler), ("student", StudentSampler))
    if params.grow is not None and params.grow.index is not None:  # a growth step: the rule reads its student alone
        models = models[1:]
    for name, make in models:
        for tuned in (False, True) if base else (True,):
            sampler = make(params, tuned=tuned)
            label = name if tuned else BASE[name]
            samples.random_models.append(sampler.random_init)
            samples.model_paths.append(sampler.path)
            samples.student_sampling = getattr(sampler, "sampling", samples.student_sampling)
            samples.generated[label] = sample_prompts(sampler, params, samples.prompts, label)
            if evaluation.variance_samples and tuned:
                samples.variance_images[name] = sample_variance(sampler, params, proxy_prompt, name)
            del sampler
    return samples


def variance_analysis(params: StageParams, samples: Samples, dino) -> dict | None:
    """The paper supplement's feature-distribution analysis of the proxy-prompt samples (None: turned off)."""
    if not samples.variance_images:
        return None
    evaluation = params.evaluation
    variance = {"feature": f"DINO CLS of last_hidden_state, unnormalised ({evaluation.dino_model})",
                "samples": evaluation.variance_samples, "prompt": samples.proxy_prompt,
                "centroid": "mean feature of the model's own samples", "models": {}}
    for name, images in samples.variance_images.items():
        features = dino.image_features(images).numpy()
        variance["models"][name] = {"total_variance": stats.total_variance(features),
                                    "distances": stats.centroid_distances(features).tolist()}
    return variance


def score(params: StageParams, samples: Samples) -> Scores:
    """Every applicable metric of the registry on every model's images, per image."""
    evaluation = params.evaluation
    clip, dino = encoders.load_clip(evaluation.clip_model), encoders.load_dino(evaluation.dino_model)
    ref_clip, ref_dino = reference_embeddings(params, clip, dino, samples.references, samples.reference_files)
    world, item = builtins.world_item(params.subject.images)
    chosen = registry_of_metrics.applicable("subject", world)
    session: dict = {}  # shared by every model's scoring (a judge loaded once)
    per_image = {}
    for name, images in samples.generated.items():
        inputs = registry_of_metrics.ScoringInputs(images=images, prompts=samples.prompts, token=params.subject.token,
                                                   encoders={"clip": clip, "dino": dino},
                                                   references={"clip": ref_clip, "dino": ref_dino}, world=world,
                                                   item=item, session=session)
        per_image[name] = score_images(chosen, inputs)
    random_init = any([clip.describe()["random_init"], dino.describe()["random_init"], *samples.random_models])
    toy_world = not random_init and all(builtins.from_world(path) for path in [*samples.model_paths, clip.path, dino.path])
    described = {"clip": clip.describe(), "dino": dino.describe(), "random_init": random_init, "toy_world": toy_world}
    for describe in dict.fromkeys(m.describe for m in chosen if m.describe is not None):  # a judge's metrics share one
        described.update(describe(world, item))
    return Scores(per_image, described, variance_analysis(params, samples, dino), random_init, toy_world)


def summarise(params: StageParams, samples: Samples, scores: Scores, student_version: str) -> Summary:
    """Means and prompt-bootstrap intervals per model and metric, per-prompt rows, and the gate's verdict."""
    evaluation = params.evaluation
    k, resamples, seed = evaluation.images_per_prompt, evaluation.bootstrap_resamples, evaluation.seed
    metrics = {name: summarize(values, resamples, seed, k) for name, values in scores.per_image.items()}
    breakdown = {name: per_prompt(values, samples.prompts, k) for name, values in scores.per_image.items()}
    means = {name: {m: v["mean"] for m, v in values.items()} for name, values in metrics.items()}
    gate = None
    if evaluation.gate:
        intervals = [gate_difference_ci(rule, scores.per_image, k, resamples, seed) for rule in evaluation.gate]
        passed, details = evaluate_gate(evaluation.gate, means, intervals)
        gate = Gate(rule=" and ".join(r.describe() for r in evaluation.gate), passed=passed, details=details,
                    difference_ci95=[list(interval) for interval in intervals], student_version=student_version)
    output = EvaluationMetrics(models=metrics, random_init=scores.random_init, toy_world=scores.toy_world,
                               prompts=len(samples.prompts), images_per_prompt=k,
                               bootstrap=Bootstrap(resamples=resamples, seed=seed, unit="prompt"))
    return Summary(metrics, breakdown, means, gate, output)


def write_outputs(tmp: Path, params: StageParams, samples: Samples, scores: Scores, summary: Summary) -> None:
    """The eval/ folder's files (images, metrics, prompts, per-prompt scores, encoders, variance, gate, table, grid)."""
    evaluation = params.evaluation
    for name, groups in samples.generated.items():
        (tmp / "images" / name).mkdir(parents=True)
        for p, group in enumerate(groups):
            for k, image in enumerate(group):
                image.save(tmp / "images" / name / f"p{p:02d}_k{k}.png")
    summary.output.write(tmp / layout.METRICS_FILE)
    Prompts(samples.prompts).write(tmp / layout.PROMPTS_FILE)
    PerPrompt(summary.breakdown).write(tmp / layout.PROMPT_SCORES_FILE)
    write_text_atomic(tmp / PER_PROMPT_CSV, per_prompt_csv(summary.breakdown))
    # Weights paths differ by machine (model cache, HF cache): record.json has them, the output does not.
    SubjectEncoders(**{name: ({k: v for k, v in entry.items() if k != "path"} if isinstance(entry, dict) else entry)
                       for name, entry in scores.described.items()}).write(tmp / layout.ENCODERS_FILE)
    if scores.variance:
        Variance(**scores.variance).write(tmp / layout.VARIANCE_FILE)
    if summary.gate:
        summary.gate.write(tmp / layout.GATE_FILE)
    write_text_atomic(tmp / "table.md", table(summary.metrics, scores.random_init, len(samples.prompts),
                                              evaluation.images_per_prompt, scores.toy_world))
    rows = []
    for p in range(min(evaluation.grid_prompts, len(samples.prompts))):
        rows += [samples.references[:4], *(groups[p] for groups in samples.generated.values())]
    grid(rows, cell=128).save(tmp / "grid.png")


def record(params: StageParams, samples: Samples, scores: Scores, summary: Summary, versions: tuple[str, str],
           growth=None):
    """Write eval/ (all at once), log it to MLflow, record the gate on the student version (its alias), and
    write the subject's metrics.json for DVC. Returns the growth after this step (a growing proxy count's)."""
    evaluation, gate, means = params.evaluation, summary.gate, summary.means
    tags = {"teacher_version": versions[0], "student_version": versions[1], "random_init": str(scores.random_init),
            "toy_world": str(scores.toy_world), "clip_model": evaluation.clip_model, "dino_model": evaluation.dino_model}
    with stage_run(params, "evaluate", tags) as run, staged_dir(params.out("eval")) as tmp:
        write_outputs(tmp, params, samples, scores, summary)
        if growth is not None:
            growth = proxy_count.after_step(growth, params, summary.metrics["student"], scores.per_image["student"],
                                            samples.prompts)
            growth.write(tmp / layout.COUNT_FILE)
            step, name = growth.steps[-1], f"held_out.{growth.metric}"
            run.log_metrics({name: step.mean})
            if step.difference is not None:  # the gain over the previous step, image by image
                run.log_metrics({f"{name}.difference": step.difference})
        run.log_params({"evaluation": evaluation.model_dump(mode="json"), "encoders": scores.described,
                        "student_sampling": samples.student_sampling})
        run.log_metrics({f"{name}.{m}": v for name, values in means.items() for m, v in values.items()})
        if scores.variance:
            run.log_metrics({f"{name}.total_variance": v["total_variance"] for name, v in scores.variance["models"].items()})
        if gate:
            run.log_metrics({"gate_passed": float(gate.passed)})
            registry.record_gate(run.uri, gate.student_version, gate.passed, gate.rule)
        run.log_artifacts(tmp, "eval")
        write_record(tmp, EvaluateRecord(stage="evaluate", run_id=run.run_id, **tags, metrics=means,
                                         gate=gate.passed if gate else None, student_sampling=samples.student_sampling,
                                         encoder_paths={name: entry["path"] for name, entry in scores.described.items()
                                                        if isinstance(entry, dict) and "path" in entry}))
        FlatMetrics(**means, random_init=scores.random_init, toy_world=scores.toy_world,
                    **({"gate_passed": gate.passed} if gate else {})).write(params.subject_dir / layout.METRICS_FILE)
    return growth


def run(params_path: str | Path) -> None:
    params = load_params(params_path)
    growth = None  # a step of a growing proxy count: the growth its student handed on
    if params.grow is not None and params.grow.index is not None:
        growth = proxy_count.read_state(params.student_out())
        if growth.stopped is not None:
            proxy_count.hand_on(growth, params.out("eval"))
            tqdm.write(f"evaluate: skipped, the proxy count was chosen before this step ({growth.stopped})")
            return
    seed_everything(params.seed)
    versions = (read_record(params.out("teacher"), TeacherRecord).registered,
                read_record(params.student_out(), StudentRecord).registered)
    samples = sample(params)
    faults.kill_point("evaluate", "generated")
    scores = score(params, samples)
    summary = summarise(params, samples, scores, versions[1])
    growth = record(params, samples, scores, summary, versions, growth)
    tqdm.write(table(summary.metrics, scores.random_init, len(samples.prompts), params.evaluation.images_per_prompt,
                     scores.toy_world))
    if growth is not None:
        tqdm.write(f"proxy count: {growth.stopped or 'growing'}")
    if summary.gate:
        tqdm.write("gate: " + ("passed: alias 'champion' set" if summary.gate.passed else "failed: no alias") + "\n  "
                   + "\n  ".join(summary.gate.details))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", required=True)
    run(parser.parse_args().params)
