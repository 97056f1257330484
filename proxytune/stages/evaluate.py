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
from proxytune.backends import diffusion, encoders, hub, students
from proxytune.backends.student_api import sampling_settings
from proxytune.files import (digest_dir, digest_files, sha256_file, staged_dir, write_bytes_atomic, write_json_atomic,
                             write_png_atomic, write_text_atomic)
from proxytune.images import grid, list_images, open_rgb
from proxytune.spec.evaluation import ORACLE_METRICS  # toy world subjects only
from proxytune.stages import common
from proxytune.stages.params import StageParams, load_params
from proxytune.tracking import registry
from proxytune.toyworld.oracle import shipped_reader as oracle_reader  # images -> attribute readings
from proxytune.toyworld.builtins import is_toy

METRICS = ("clip_i", "clip_t", "dino")
BASE = {"teacher": "base-teacher", "student": "base-student"}  # the untuned models' names in every output
VARIANCE_SEED_OFFSET = 100_000  # variance samples never reuse the DreamBench seeds


def eval_prompts(params: StageParams) -> list[str]:
    cfg, subject = params.evaluation, params.subject
    if cfg.prompts == "dreambench":
        prompts = encoders.dreambench_prompts(subject.token, subject.class_noun)
    elif cfg.prompts == "toyworld":
        from proxytune.toyworld.subjects import toy_prompts

        prompts = toy_prompts(subject.token, subject.class_noun)
    else:
        prompts = [p.format(token=subject.token, **{"class": subject.class_noun}) for p in cfg.prompts]
    return prompts[: cfg.num_prompts] if cfg.num_prompts else prompts


def wants_base_models(params: StageParams) -> bool:
    """evaluation.base_models, where null means: on for a toy world subject, off otherwise."""
    chosen = params.evaluation.base_models
    return chosen if chosen is not None else params.subject.toy_subject is not None


def seeds_for(params: StageParams, prompt_index: int) -> list[int]:
    cfg = params.evaluation
    return [cfg.seed + 1000 * prompt_index + k for k in range(cfg.images_per_prompt)]


# -- generators: one object per model with the same call --------------------------------------
TEACHER_SAMPLES = Path(".proxytune") / "teacher_samples"  # under the project root (the stage's cwd)
STUDENT_SAMPLES = Path(".proxytune") / "student_samples"


class SampleCache:
    """One model's images, a folder per call: FOLDER/KEY/NNN.png, KEY a digest of `setting` (everything
    the images depend on besides the call) and the call's prompts and seeds.

    A call is always one batch, so cached bytes equal generated ones (PNG is lossless). A missing or
    damaged file means the whole call is generated again.
    """

    def __init__(self, folder: Path, setting: tuple):
        self.folder, self.setting = folder, setting

    def __call__(self, prompts: list[str], seeds: list[int], generate) -> list:
        from proxytune.errors import ProxytuneError

        folder = self.folder / common.config_key(*self.setting, prompts, seeds)
        paths = [folder / f"{i:03d}.png" for i in range(len(prompts))]
        try:
            return [open_rgb(path) for path in paths]
        except ProxytuneError:
            pass
        images = generate(prompts, seeds)
        for path, image in zip(paths, images):
            write_png_atomic(path, image)
        return images


class TeacherSampler:
    """The teacher pipeline with its LoRA (or, `tuned=False`, the base pipeline), behind a sample cache.

    A teacher's images depend only on its adapter files and the sampler settings, so each call's
    images are kept under .proxytune/teacher_samples/KEY. Re-evaluating after a student change, a
    student variant, or a crash after sampling reuses them, and the pipeline is loaded only when
    something is missing. The base teacher has no adapter: its key says "base" (and, for a toy model,
    the digest of its shipped weights) instead of the adapter digest and LoRA scale, so every
    evaluation of the same base model, prompts and seeds shares its images.
    """

    def __init__(self, params: StageParams, tuned: bool = True):
        self.params = params
        self.adapter = params.out("teacher") / "adapter" if tuned else None
        t, s = params.teacher, params.synthesis
        # a toy model's name stays while its shipped weights may change: the base key carries their digest
        base = "base:" + common.base_model_tags(t.model).get("base_model_digest", "")
        self.cache = SampleCache(TEACHER_SAMPLES, (digest_dir(self.adapter) if tuned else base, t.model, t.revision,
                                                   t.resolution, s.lora_scale if tuned else None,
                                                   s.num_inference_steps, s.guidance_scale))
        self._pipe = None
        self.path = diffusion.resolve(params.teacher.model)
        self.random_init = hub.is_random_init(self.path)

    @property
    def pipe(self):
        if self._pipe is None:
            params = self.params
            if self.adapter is None:
                self._pipe = diffusion.load_pipeline(params.teacher.model, revision=params.teacher.revision)
            else:
                self._pipe = diffusion.load_pipeline_with_lora(
                    params.teacher.model, self.adapter, revision=params.teacher.revision, scale=params.synthesis.lora_scale,
                )
            self._pipe.to(common.device())
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    def __call__(self, prompts: list[str], seeds: list[int]) -> list:
        s = self.params.synthesis
        return self.cache(prompts, seeds, lambda p, k: diffusion.generate(
            self.pipe, p, k, steps=s.num_inference_steps, guidance=s.guidance_scale, size=self.params.teacher.resolution))


class StudentSampler:
    """The tuned student (its adapter or full weights), or with `tuned=False` the base student, behind
    a sample cache (.proxytune/student_samples/KEY) like the teacher's: every variant of an experiment
    evaluates the same base student on the same prompts and seeds, and draws it once. The key holds
    the tuned weights' digest (or "base" and the resolved checkpoint folder), and the sampler settings;
    the model is loaded only when something is missing."""

    def __init__(self, params: StageParams, tuned: bool = True):
        self.params = params
        student = params.student
        self.path = hub.resolve(student.model, students.TINY_STUDENTS, what="student model")
        self.random_init = hub.is_random_init(self.path)
        self.sampling = sampling_settings(students.detect_backend(self.path, student.model), student.sampling)
        self.weights = self._weights_file(params) if tuned else None
        if self.weights is None:
            identity = "base:" + common.base_model_tags(student.model).get("base_model_digest", "")
        elif self.weights.parent.name == "adapter":
            identity = digest_dir(self.weights.parent)
        else:
            identity = sha256_file(self.weights)
        self.cache = SampleCache(STUDENT_SAMPLES, (identity, student.model, str(self.path), self.sampling))
        self._bundle = None

    @staticmethod
    def _weights_file(params: StageParams) -> Path:
        # the student stage's record names its weights: a peft adapter, or full weights (direct-full)
        folder = params.student_out()  # the subject's own, or the experiment's multi-subject student
        return folder / common.read_record(folder).get("weights", "adapter/adapter_model.safetensors")

    @property
    def bundle(self):
        if self._bundle is None:
            self._bundle = students.load_student(self.params.student.model, device=str(common.device()))
            if self.weights is not None and self.weights.parent.name == "adapter":
                from peft import PeftModel

                self._bundle.model = PeftModel.from_pretrained(self._bundle.model, str(self.weights.parent)).eval()
            elif self.weights is not None:
                from safetensors.torch import load_file

                self._bundle.model.load_state_dict(load_file(self.weights))
        return self._bundle

    def __call__(self, prompts: list[str], seeds: list[int]) -> list:
        return self.cache(prompts, seeds, lambda p, k: self.bundle.decode_codes(self.bundle.generate(p, k, **self.sampling)))


@torch.no_grad()
def sample_dreambench(sampler, params: StageParams, prompts: list[str], name: str) -> list[list]:
    return [sampler([p] * params.evaluation.images_per_prompt, seeds_for(params, i))
            for i, p in enumerate(tqdm(prompts, desc=f"evaluate: {name}", unit="prompt"))]


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
    texts = [encoders.strip_identifier(p, token) for p, group in zip(prompts, images) for _ in group]
    gen_clip = clip.image_embeds(flat)
    return {
        "clip_i": encoders.per_image_pairwise_cosine(gen_clip, ref_clip).numpy(),
        "clip_t": encoders.per_image_clip_t(gen_clip, clip.text_embeds(texts)).numpy(),
        "dino": encoders.per_image_pairwise_cosine(dino.image_embeds(flat), ref_dino).numpy(),
    }


def oracle_scores(read, images: list[list], prompts: list[str], token: str, subject) -> dict:
    """(N,) arrays of the oracle's subject and prompt accuracy per generated image, prompt-major order.

    Args:
        read: images -> attribute readings ({"cls": "box", "colour": ...} per image), e.g. `oracle_reader()`.
        images: per prompt, its generated images.
        prompts: the prompts, identifier included.
        token: the identifier, removed before the prompt is parsed.
        subject: the toy subject (`proxytune.toyworld.subjects.Subject`).
    Returns:
        {"subject_acc": 1.0 where the image shows all of distinctive(subject, prompt) else 0.0,
         "prompt_acc": fraction of the prompt's attributes shown (NaN where the prompt names none),
         "subject_prompt_acc": 1.0 where the image shows the subject and every attribute the prompt asks
         for, else 0.0 (what personalisation is for: a model that copies its references scores on
         subject_acc but not here)}.
    """
    from proxytune.toyworld import oracle as oracle_lib
    from proxytune.toyworld.subjects import distinctive
    from proxytune.toyworld.world import parse_prompt

    seen = iter(read([image for group in images for image in group]))
    subject_acc, prompt_acc, both = [], [], []
    for prompt, group in zip(prompts, images):
        text = encoders.strip_identifier(prompt, token)
        look, asked = distinctive(subject, text), parse_prompt(text)
        for _ in group:
            reading = next(seen)
            subject_acc.append(float(oracle_lib.shows_subject(reading, look)))
            accuracy = oracle_lib.prompt_accuracy(reading, asked)
            prompt_acc.append(np.nan if accuracy is None else accuracy)
            both.append(float(subject_acc[-1] == 1.0 and accuracy in (None, 1.0)))
    return {"subject_acc": np.asarray(subject_acc), "prompt_acc": np.asarray(prompt_acc),
            "subject_prompt_acc": np.asarray(both)}


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
    cache = params.work("evaluate") / f"refs-{common.config_key(clip.ref, dino.ref, digest)}.safetensors"
    if cache.exists():
        tensors = load_file(cache)
        return tensors["clip"], tensors["dino"]
    ref_clip, ref_dino = clip.image_embeds(references), dino.image_embeds(references)
    write_bytes_atomic(cache, save({"clip": ref_clip.contiguous(), "dino": ref_dino.contiguous()}))
    return ref_clip, ref_dino


LABELS = {"clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino": "DINO", "subject_acc": "subject acc.", "prompt_acc": "prompt acc.",
          "subject_prompt_acc": "subject+prompt acc."}
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
    cfg = params.evaluation
    common.seed_everything(params.seed)
    teacher_record = common.read_record(params.out("teacher"))
    student_record = common.read_record(params.student_out())
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
            generated[label] = sample_dreambench(sampler, params, prompts, label)
            if cfg.variance_samples and tuned:
                variance_images[name] = sample_variance(sampler, params, proxy_prompt, name)
            del sampler
    faults.kill_point("evaluate", "generated")

    clip, dino = encoders.load_clip(cfg.clip_model), encoders.load_dino(cfg.dino_model)
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
        metrics[name] = summarize(scores, cfg.bootstrap_resamples, cfg.seed, cfg.images_per_prompt)
        breakdown[name] = per_prompt(scores, prompts, cfg.images_per_prompt)
    variance = None
    if variance_images:
        variance = {"feature": f"DINO CLS of last_hidden_state, unnormalised ({cfg.dino_model})",
                    "samples": cfg.variance_samples, "prompt": proxy_prompt,
                    "centroid": "mean feature of the model's own samples", "models": {}}
        for name, images in variance_images.items():
            features = dino.image_features(images).numpy()
            variance["models"][name] = {"total_variance": stats.total_variance(features),
                                        "distances": stats.centroid_distances(features).tolist()}
    means = {name: {m: v["mean"] for m, v in values.items()} for name, values in metrics.items()}
    gate = None
    if cfg.gate:
        intervals = [gate_difference_ci(rule, all_scores, cfg.images_per_prompt, cfg.bootstrap_resamples, cfg.seed)
                     for rule in cfg.gate]
        passed, details = evaluate_gate(cfg.gate, means, intervals)
        gate = {"rule": " and ".join(r.describe() for r in cfg.gate), "passed": passed, "details": details,
                "difference_ci95": [list(interval) for interval in intervals],
                "student_version": f"{student_record['model']}@{student_record['version']}"}
    random_init = any([clip.describe()["random_init"], dino.describe()["random_init"], *random_models])
    toy_world = not random_init and all(is_toy(path) for path in [*model_paths, clip.path, dino.path])
    described = {"clip": clip.describe(), "dino": dino.describe(), "random_init": random_init, "toy_world": toy_world}
    if toy is not None:
        described["oracle"] = oracle_description(toy)
    summary = {"models": metrics, "random_init": random_init, "toy_world": toy_world, "prompts": len(prompts),
               "images_per_prompt": cfg.images_per_prompt,
               "bootstrap": {"resamples": cfg.bootstrap_resamples, "seed": cfg.seed, "unit": "prompt"}}

    tags = {
        "teacher_version": f"{teacher_record['model']}@{teacher_record['version']}",
        "student_version": f"{student_record['model']}@{student_record['version']}",
        "random_init": str(random_init),
        "toy_world": str(toy_world),
        "clip_model": cfg.clip_model,
        "dino_model": cfg.dino_model,
    }
    out_dir = params.out("eval")
    with common.stage_run(params, "evaluate", tags) as run, staged_dir(out_dir) as tmp:
        for name, groups in generated.items():
            (tmp / "images" / name).mkdir(parents=True)
            for p, group in enumerate(groups):
                for k, image in enumerate(group):
                    image.save(tmp / "images" / name / f"p{p:02d}_k{k}.png")
        write_json_atomic(tmp / "metrics.json", summary)
        write_json_atomic(tmp / "prompts.json", prompts)
        write_json_atomic(tmp / "per_prompt.json", breakdown)
        write_text_atomic(tmp / PER_PROMPT_CSV, per_prompt_csv(breakdown))
        # Weights paths differ by machine (model cache, HF cache): record.json has them, the output does not.
        write_json_atomic(tmp / "encoders.json", {name: ({k: v for k, v in entry.items() if k != "path"}
                                                         if isinstance(entry, dict) else entry)
                                                  for name, entry in described.items()})
        if variance:
            write_json_atomic(tmp / "variance.json", variance)
        if gate:
            write_json_atomic(tmp / "gate.json", gate)
        write_text_atomic(tmp / "table.md", table(metrics, random_init, len(prompts), cfg.images_per_prompt, toy_world))
        rows = []
        for p in range(min(cfg.grid_prompts, len(prompts))):
            rows += [references[:4], *(groups[p] for groups in generated.values())]
        grid(rows, cell=128).save(tmp / "grid.png")
        run.log_params({"evaluation": cfg.model_dump(mode="json"), "encoders": described, "student_sampling": student_sampling})
        run.log_metrics({f"{name}.{m}": v for name, values in means.items() for m, v in values.items()})
        if variance:
            run.log_metrics({f"{name}.total_variance": v["total_variance"] for name, v in variance["models"].items()})
        if gate:
            run.log_metrics({"gate_passed": float(gate["passed"])})
            registry.record_gate(run.uri, gate["student_version"], gate["passed"], gate["rule"])
        run.log_artifacts(tmp, "eval")
        common.write_record(tmp, {"stage": "evaluate", "run_id": run.run_id, **tags, "metrics": means,
                                  "gate": gate["passed"] if gate else None, "student_sampling": student_sampling,
                                  "encoder_paths": {name: entry["path"] for name, entry in described.items()
                                                    if isinstance(entry, dict) and "path" in entry}})
        flat = {**means, "random_init": random_init, "toy_world": toy_world}
        if gate:
            flat["gate_passed"] = gate["passed"]
        write_json_atomic(params.subject_dir / "metrics.json", flat)
    tqdm.write(table(metrics, random_init, len(prompts), cfg.images_per_prompt, toy_world))
    if gate:
        tqdm.write("gate: " + ("passed: alias 'champion' set" if gate["passed"] else "failed: no alias") + "\n  " + "\n  ".join(gate["details"]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", required=True)
    run(parser.parse_args().params)
