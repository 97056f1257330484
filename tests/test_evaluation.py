"""Evaluation protocol: bootstrap intervals, feature-distribution statistics, gate, shared seeds."""

import numpy as np
import pytest
import torch

from conftest import make_params, tiny_spec
from proxytune import stats
from proxytune.backends import dreambench_prompts, encoders
from proxytune.spec.evaluation import GateRule
from proxytune.stages import evaluate, sampling


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    rng = np.random.default_rng(1)
    values = rng.normal(0.3, 0.05, size=200)
    low, high = stats.bootstrap_ci(values, resamples=2000, seed=0)
    assert low < values.mean() < high
    # ~ mean +- 1.96 * sd / sqrt(n) for a normal sample
    half = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    assert abs((high - low) / 2 - half) < 0.2 * half
    assert stats.bootstrap_ci(values, resamples=2000, seed=0) == (low, high)
    narrow = stats.bootstrap_ci(np.tile(values, 16), resamples=2000, seed=0)
    assert narrow[1] - narrow[0] < (high - low) / 2


def prompt_effect_scores(prompts: int = 25, images: int = 4, seed: int = 3) -> np.ndarray:
    """(prompts * images,) prompt-major scores: a strong shared effect per prompt plus per-image noise."""
    rng = np.random.default_rng(seed)
    return (0.5 + rng.normal(0, 0.1, size=(prompts, 1)) + rng.normal(0, 0.05, size=(prompts, images))).ravel()


def test_intervals_resample_prompts_not_images():
    """The 4 images of a prompt share it: the evaluation's interval must resample prompts, and is then
    about 1.8x wider than one that resamples single images (sd 0.1 between prompts, 0.05 within)."""
    values = prompt_effect_scores()
    per_image = stats.bootstrap_ci(values, resamples=4000, seed=0)
    summary = evaluate.summarize({"dino": values}, 4000, 0, 4)["dino"]
    low, high = summary["ci95"]
    assert summary["mean"] == pytest.approx(values.mean()) and low < values.mean() < high
    ratio = (high - low) / (per_image[1] - per_image[0])
    assert 1.5 < ratio < 2.2, ratio
    # resampling clusters of one image each is the per-image bootstrap
    single = stats.cluster_bootstrap_ci(values, np.arange(values.size), resamples=4000, seed=0)
    assert single[1] - single[0] == pytest.approx(per_image[1] - per_image[0], rel=0.1)
    # NaN images are left out; a prompt with none left is dropped, not counted as empty
    holes = values.copy()
    holes[:4] = np.nan
    low, high = stats.cluster_bootstrap_ci(holes, stats.prompt_clusters(100, 4), resamples=2000, seed=0)
    assert low < np.nanmean(holes) < high


def test_compare_interval_pairs_prompts_when_both_runs_used_the_same():
    """compare's interval of B - A from per-prompt means: paired, the shared prompt effects cancel."""
    a = prompt_effect_scores().reshape(25, 4).mean(axis=1)
    b = a + 0.02
    paired = stats.prompt_difference_ci(list(a), list(b), paired=True, resamples=2000)
    unpaired = stats.prompt_difference_ci(list(a), list(b), paired=False, resamples=2000)
    assert paired == pytest.approx((0.02, 0.02)) and unpaired[0] < 0 < 0.02 < unpaired[1]
    assert stats.prompt_difference_ci([None, None], [0.5, 0.6], paired=False) is None


def test_gate_can_require_the_interval_of_the_difference():
    """Paired over prompts: a student better on every prompt by a little clears the interval rule; one
    better on the mean only through two lucky prompts does not, though it passes the mean rule."""
    teacher = prompt_effect_scores()
    steady = {"teacher": {"dino": teacher}, "student": {"dino": teacher + 0.01}}
    lucky_student = teacher.copy()
    lucky_student[:8] += 0.2  # two prompts x 4 images
    lucky = {"teacher": {"dino": teacher}, "student": {"dino": lucky_student - 0.01}}
    rule = GateRule(metric="dino", require="interval")
    for scores, expected in ((steady, True), (lucky, False)):
        means = {m: {"dino": float(v["dino"].mean())} for m, v in scores.items()}
        interval = evaluate.gate_difference_ci(rule, scores, 4, 2000, 0)
        assert evaluate.evaluate_gate([GateRule(metric="dino")], means, [interval])[0] is True
        passed, details = evaluate.evaluate_gate([rule], means, [interval])
        assert passed is expected, details
        assert "95% over prompts" in details[0] and "lower end" in details[0]


def test_total_variance_and_centroid_distances_match_direct_computation():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(50, 8)) * np.arange(1, 9)
    assert stats.total_variance(features) == pytest.approx(np.trace(np.cov(features, rowvar=False)))
    distances = stats.centroid_distances(features)
    assert distances.shape == (50,)
    assert distances[3] == pytest.approx(np.linalg.norm(features[3] - features.mean(axis=0)))
    tight = features * 0.5
    assert stats.total_variance(tight) == pytest.approx(stats.total_variance(features) / 4)


def test_per_image_scores_average_to_the_dreambench_metric():
    gen, ref = torch.randn(6, 16), torch.randn(4, 16)
    per_image = encoders.per_image_pairwise_cosine(gen, ref)
    assert per_image.shape == (6,)
    assert float(per_image.mean()) == pytest.approx(encoders.clip_i(gen, ref), abs=1e-6)
    direct = torch.nn.functional.cosine_similarity(gen[:, None], ref[None], dim=-1).mean()
    assert encoders.dino(gen, ref) == pytest.approx(float(direct), abs=1e-6)
    texts = torch.randn(6, 16)
    assert float(encoders.per_image_clip_t(gen, texts).mean()) == pytest.approx(encoders.clip_t(gen, texts), abs=1e-6)


def test_gate_rules():
    means = {"teacher": {"clip_i": 0.80, "clip_t": 0.32, "dino": 0.72}, "student": {"clip_i": 0.81, "clip_t": 0.28, "dino": 0.74}}
    passed, details = evaluate.evaluate_gate([GateRule(metric="dino")], means)
    assert passed and "pass" in details[0]
    passed, details = evaluate.evaluate_gate([GateRule(metric="dino"), GateRule(metric="clip_t")], means)
    assert not passed and "FAIL" in details[1]
    assert evaluate.evaluate_gate([GateRule(metric="dino", margin=0.05)], means)[0] is False
    assert evaluate.evaluate_gate([GateRule(metric="clip_t", vs=0.25)], means)[0] is True


def test_every_model_sees_the_same_prompts_and_seeds(project):
    params = make_params(project, tiny_spec(evaluation={"num_prompts": 3, "images_per_prompt": 2}))
    prompts = evaluate.eval_prompts(params)
    assert prompts == dreambench_prompts.dreambench_prompts(params.subject.token, "dog")[:3]
    calls = {"teacher": [], "student": []}
    for name in calls:
        sampler = lambda p, s, name=name: calls[name].append((p, s)) or [None] * len(s)  # noqa: E731
        sampling.sample_prompts(sampler, params, prompts, name)
    assert calls["teacher"] == calls["student"]
    seeds = [s for _, batch in calls["teacher"] for s in batch]
    assert len(set(seeds)) == 6 and seeds[:2] == [0, 1] and seeds[2:4] == [1000, 1001]


def test_student_samples_are_cached_and_the_model_loaded_only_when_missing(project, monkeypatch):
    """Every variant of an experiment evaluates the same base student on the same prompts and seeds: it is
    drawn once. A tuned student's images are keyed by its weights: new weights are drawn again."""
    from peft import LoraConfig, get_peft_model

    from proxytune.backends import students
    from proxytune.outputs import write_record

    params = make_params(project, tiny_spec())
    loads = []
    real_load = students.load_student
    monkeypatch.setattr(students, "load_student", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    prompts, seeds = ["a sks dog", "a sks dog"], [5, 6]
    first = evaluate.StudentSampler(params, tuned=False)(prompts, seeds)
    again = evaluate.StudentSampler(params, tuned=False)(prompts, seeds)
    assert len(loads) == 1 and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    assert len(list((project / sampling.STUDENT_SAMPLES).rglob("*.png"))) == 2

    bundle = real_load(params.student.model)
    model = get_peft_model(bundle.model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = params.student_out() / "adapter"
    model.save_pretrained(str(adapter), save_embedding_layers=False)
    write_record(params.student_out(), {"weights": "adapter/adapter_model.safetensors"})
    tuned = evaluate.StudentSampler(params)(prompts, seeds)
    assert len(loads) == 2 and any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, tuned))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(tuned, evaluate.StudentSampler(params)(prompts, seeds)))
    assert len(loads) == 2
    with torch.no_grad():  # other weights: another key, drawn again
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.add_(0.5)
    model.save_pretrained(str(adapter), save_embedding_layers=False)
    other = evaluate.StudentSampler(params)(prompts, seeds)
    assert len(loads) == 3 and any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(tuned, other))


def test_custom_prompt_list(project):
    params = make_params(project, tiny_spec(evaluation={"prompts": ["a {token} {class} on the moon"], "num_prompts": None}))
    assert evaluate.eval_prompts(params) == [f"a {params.subject.token} dog on the moon"]


def test_teacher_samples_are_cached_by_adapter_and_settings(project, monkeypatch):
    """Re-evaluating (a new student, a variant, a resumed crash) reuses the teacher's images without
    loading its pipeline; a damaged cache file or another adapter means generating again."""
    import numpy as np

    from proxytune.backends.teachers import diffusion

    params = make_params(project, tiny_spec(synthesis={"num_inference_steps": 2}))
    pipe = diffusion.load_pipeline("tiny-sd")
    diffusion.add_lora(pipe.unet, rank=4, alpha=4, target_modules=["to_q", "to_v"])
    diffusion.save_lora(pipe, params.out("teacher") / "adapter")
    prompts, seeds = ["a S* dog", "a S* dog"], [3, 4]
    first = evaluate.TeacherSampler(params)(prompts, seeds)
    cached = sorted((project / sampling.TEACHER_SAMPLES).rglob("*.png"))
    assert len(cached) == 2

    loads = []
    real_load = diffusion.load_pipeline_with_lora
    monkeypatch.setattr(diffusion, "load_pipeline_with_lora", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    again = evaluate.TeacherSampler(params)(prompts, seeds)
    assert loads == [] and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))

    cached[0].write_bytes(b"truncated")  # a damaged entry: the call is generated again, same pixels
    regenerated = evaluate.TeacherSampler(params)(prompts, seeds)
    assert len(loads) == 1 and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, regenerated))

    with torch.no_grad():  # another adapter: another key
        for name, weight in pipe.unet.named_parameters():
            if "lora_B" in name:
                weight.add_(0.5)
    (params.out("teacher") / "adapter" / "pytorch_lora_weights.safetensors").unlink()
    diffusion.save_lora(pipe, params.out("teacher") / "adapter")
    other = evaluate.TeacherSampler(params)(prompts, seeds)
    assert len(loads) == 2 and not np.array_equal(np.asarray(other[0]), np.asarray(first[0]))


def test_student_samples_evaluation_student_batch_size_images_at_a_time(tmp_path):
    """`evaluation.student_batch_size` splits a prompt's images into batches, each its own cache entry, and
    the images come back in seed order; a re-run reads them all from the cache."""
    from types import SimpleNamespace

    from PIL import Image

    from proxytune.stages.sampling import SampleCache, StudentSampler

    calls = []

    class Bundle:
        def generate(self, prompts, seeds, **_):
            calls.append(list(seeds))
            return seeds

        def decode_codes(self, seeds):
            return [Image.new("RGB", (4, 4), (s % 256, 0, 0)) for s in seeds]

    sampler = object.__new__(StudentSampler)
    sampler.params = SimpleNamespace(evaluation=SimpleNamespace(student_batch_size=2))
    sampler.sampling, sampler._bundle = {}, Bundle()
    sampler.cache = SampleCache(tmp_path, ("setting",))
    images = sampler(["p"] * 5, [10, 11, 12, 13, 14])
    assert calls == [[10, 11], [12, 13], [14]]
    assert [im.getpixel((0, 0))[0] for im in images] == [10, 11, 12, 13, 14]
    assert [im.getpixel((0, 0))[0] for im in sampler(["p"] * 5, [10, 11, 12, 13, 14])] == [10, 11, 12, 13, 14]
    assert len(calls) == 3  # the second call generated nothing
