"""proxytune plan: the estimator against the CPU allocator, its depth scaling, parameter counts, the
option search and the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from proxytune.cli import main
from proxytune.plan import estimate, measure, models, options, steps
from proxytune.plan.gpus import Gpu
from proxytune.plan.stages import plan_spec
from proxytune.plan.trace import trace_step


@pytest.fixture(autouse=True)
def fresh_traces(tmp_path, monkeypatch):
    """Every test traces for itself: no trace cached by an earlier run stands in for one."""
    monkeypatch.setattr(estimate, "_cache_dir", lambda: tmp_path / "traces")


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4], ids=["tiny-sd-unet", "tiny-llamagen", "tiny-llamagen-checkpointing",
                                                      "tiny-llamagen-bf16", "tiny-sd3-mmdit"])
def test_estimate_within_15_percent_of_the_cpu_allocator(index):
    case = measure.cases()[index]
    assert models.depth_knobs(case.component), "the case must exercise the depth scaling"
    real, est = measure.measured_peak(case), measure.estimated_peak(case)
    assert real > 1 << 20  # a step that allocates something worth comparing
    assert abs(est - real) / real < 0.15, (case.name, real, est)


def test_allocator_peak_ignores_frees_of_blocks_an_earlier_profiler_session_saw():
    """The CPU reporter keeps the sizes of blocks allocated under any earlier profiler session; freeing one
    during the step came back as -20 MB and hid the step's own 8 MB (CI measured half of tiny-sd's peak
    after another test's profiling)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        held = [torch.ones(5_000_000)]

    def step(_):
        held.clear()
        x = torch.ones(1_000_000)
        return x * 2

    assert 8_000_000 <= measure.allocator_peak(None, step) < 8_000_100  # two 4 MB tensors (and a few scalars)


def test_depth_scaling_matches_a_full_depth_trace():
    student = models.describe_student("tiny-llamagen", __import__("pathlib").Path("."))
    deep = models.Component("llamagen", {**student.parts["model"].config, "num_hidden_layers": 5})
    opts = steps.Options(lora_rank=4, lora_targets=("q_proj", "v_proj"))
    make = lambda part: steps.student_step(part, student.image_size, 0, opts)  # noqa: E731
    scaled = estimate.scaled_trace(deep, {"step": "test"}, make)
    full = trace_step(*make(deep))
    assert scaled["peak"] == pytest.approx(full.peak_bytes, rel=0.02)
    assert scaled["flops"] == pytest.approx(full.flops, rel=0.001)


def test_flops_are_flop_counter_modes():
    from torch.utils.flop_counter import FlopCounterMode

    from proxytune.plan.trace import LiveBytes

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8))
    x = torch.randn(16, 64)
    live, counter = LiveBytes(), FlopCounterMode(display=False)
    with live:
        model(x).sum().backward()
    with counter:
        model(x).sum().backward()
    assert live.flops == counter.get_total_flops() > 0


def test_lora_count_is_peft_on_the_meta_model():
    unet = models.describe_teacher("tiny-sd", __import__("pathlib").Path(".")).denoiser
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    counts = estimate.count(unet, steps.Options(lora_rank=8, lora_targets=targets))
    module = models.build(unet)  # real weights: count r * (in + out) of every targeted linear by hand
    expected = sum(8 * (m.in_features + m.out_features) for name, m in module.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.endswith(targets))
    assert counts["trainable"] == expected > 0
    assert counts["frozen"] == sum(p.numel() for p in module.parameters())


def test_sdxl_unet_size_from_the_built_in_table():
    sdxl = models.describe_teacher("stabilityai/stable-diffusion-xl-base-1.0", __import__("pathlib").Path("."))
    assert estimate.count(sdxl.denoiser)["frozen"] == 2_567_463_684  # the release's parameter count


def _gpu(gib: float) -> Gpu:
    return Gpu("test", gib, 100.0, 10.0, 1000)


def test_suggest_takes_the_fewest_changes_then_the_fastest():
    from proxytune.spec.teacher import TeacherSpec

    def fake(spec):  # bf16 halves the weights and time, checkpointing saves 3 GiB and costs time, an image 2 GiB
        half = spec.mixed_precision != "no"
        gib = (5 if half else 10) + 2 * spec.batch_size - 3 * spec.gradient_checkpointing
        est = estimate.StageEstimate("teacher", "", weights=int(gib * estimate.GIB))
        est.seconds = (2 if half else 4) + 5 * spec.gradient_checkpointing
        return est

    spec = TeacherSpec(batch_size=4)
    found = options.suggest("teacher", spec, fake, options.TEACHER_SWITCHES, _gpu(16.5))  # 15 usable
    assert found.text == "teacher.mixed_precision: bf16" and found.estimate.peak == 13 * estimate.GIB
    assert found.section == "teacher" and found.changes == {"mixed_precision": "bf16"}
    found = options.suggest("teacher", spec, fake, options.TEACHER_SWITCHES, _gpu(9.5))  # 8 usable
    assert "mixed_precision: bf16" in found.text and "batch_size: 1" in found.text
    assert found.changes == {"mixed_precision": "bf16", "batch_size": 1}
    assert options.suggest("teacher", spec, fake, options.TEACHER_SWITCHES, _gpu(4.0)) is None


SPEC = """
name: plan-test
subjects: [{name: dog, class: dog, images: "dreambench:dog", token: sks}]
teacher: {model: tiny-sd, resolution: 64, steps: 10}
synthesis: {num_images: 8, num_inference_steps: 4, batch_size: 2}
student: {model: tiny-llamagen, steps: 10, batch_size: 4}
"""


def test_plan_command_json(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC)
    runner = CliRunner()
    result = runner.invoke(main, ["plan", str(spec), "--gpu", "rtx4090", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # --json promises clean stdout; progress bars go to stderr
    assert [s["stage"] for s in data["stages"]] == ["teacher", "synthesis", "codes", "student", "evaluate (teacher)",
                                                    "evaluate (student)"]
    for stage in data["stages"]:
        assert stage["peak_bytes"] == max(stage["setup_bytes"], sum(
            stage[k] for k in ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes")))
        assert stage["fits"] is True and stage["seconds"] > 0
    teacher = data["stages"][0]
    assert teacher["gradients_bytes"] > 0 and teacher["optimizer_bytes"] == 2 * teacher["gradients_bytes"]


def test_report_shows_what_does_not_fit_and_the_way_under_budget():
    from proxytune.plan import report
    from proxytune.plan.stages import Plan

    over = estimate.StageEstimate("student", "llamagen LoRA", weights=30 * estimate.GIB, activations=2 * estimate.GIB,
                                  suggestion="student.gradient_checkpointing: true -> 20.0 GiB")
    under = estimate.StageEstimate("codes", "tokenizer", weights=estimate.GIB)
    plan = Plan("s.yaml", _gpu(24.0), 1, 1, [over, under])
    assert [over.check(plan.gpu), under.check(plan.gpu)] == [False, True]
    text = "\n".join(report.lines(plan))
    assert "32.00" in text and "to fit: student.gradient_checkpointing: true" in text
    data = report.as_json(plan)
    assert data["fits"] is False and [s["fits"] for s in data["stages"]] == [False, True]


def test_plan_command_refuses_bad_input_in_one_line(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC)
    runner = CliRunner()
    result = runner.invoke(main, ["plan", str(spec), "--gpu", "tpu-v9"])
    assert result.exit_code == 2 and "--gpu 'tpu-v9': unknown GPU" in result.output
    spec.write_text(SPEC.replace("steps: 10, batch_size: 4", "steps: 10, batch_size: 0"))
    result = runner.invoke(main, ["plan", str(spec)])
    assert result.exit_code == 2 and f"{spec}: student.batch_size" in result.output
    assert len(result.output.strip().splitlines()) == 1
    spec.write_text(SPEC.replace("model: tiny-llamagen", "model: nobody/not-downloaded"))
    result = runner.invoke(main, ["plan", str(spec)])
    assert result.exit_code == 2 and "student.model: cannot size 'nobody/not-downloaded'" in result.output


# -- the memory options plan weighs ----------------------------------------------------------------


def test_int8_denoiser_bytes_are_what_torchao_loads():
    """plan's int8 bill of a denoiser (1 byte a Linear weight + a scale and zero point a row, the rest as
    loaded) against the bytes of the tiny-flux transformer that `teacher.quantize: int8` really loads."""
    pytest.importorskip("torchao")
    from proxytune.backends.teachers import diffusion

    teacher = models.describe_teacher("tiny-flux", __import__("pathlib").Path("."))
    counts = estimate.count(teacher.denoiser)
    predicted = estimate.frozen_bytes(counts, "float32", "int8")
    loaded = diffusion.weight_bytes(diffusion.load_pipeline("tiny-flux", quantize="int8").transformer)
    assert predicted == loaded  # torchao's int8 data, a float32 scale and an int8 zero point per row
    assert predicted < 0.4 * estimate.frozen_bytes(counts, "float32")  # 0.29 of float32 (docs/memory.md)


def test_plan_weighs_quantize_text_encoders_offload_tiling_and_8bit_adam():
    from pathlib import Path

    from proxytune.plan.gpus import PCIE_GBS
    from proxytune.spec.student import StudentSettings
    from proxytune.spec.synthesis import SynthesisSpec
    from proxytune.spec.teacher import TeacherSpec

    gpu = _gpu(80)
    teacher = models.describe_teacher("tiny-flux", Path("."))
    plain = estimate.teacher_training(TeacherSpec(resolution=64), teacher, gpu)
    int8 = estimate.teacher_training(TeacherSpec(resolution=64, quantize="int8"), teacher, gpu)
    counts = estimate.count(teacher.denoiser)
    assert plain.weights - int8.weights == (estimate.frozen_bytes(counts, "float32")
                                            - estimate.frozen_bytes(counts, "float32", "int8")) > 0
    # the text encoders are on the GPU while the prompts are encoded, not while training; one that trains stays
    encoders = sum(estimate.count(p)["frozen"] for n, p in teacher.parts.items() if n not in ("transformer", "vae"))
    assert plain.setup - (plain.weights - plain.gradients) == 4 * encoders > 0  # LoRA: 4 bytes a weight and a grad
    assert "text encoders" in " ".join(plain.notes)
    sd = models.describe_teacher("tiny-sd", Path("."))
    kept = estimate.teacher_training(TeacherSpec(model="tiny-sd", resolution=64, train_text_encoder=True), sd, gpu)
    freed = estimate.teacher_training(TeacherSpec(model="tiny-sd", resolution=64), sd, gpu)
    assert kept.weights - freed.weights == 4 * estimate.count(sd.parts["text_encoder"])["frozen"]

    # CPU offload: the peak is the largest (model + what it computes); each batch copies every model in and out
    spec = SynthesisSpec(num_images=8, batch_size=2, num_inference_steps=4, dtype="float32")
    whole = estimate.synthesis(spec, teacher, 64, gpu)
    offload = estimate.synthesis(spec.model_copy(update={"cpu_offload": True}), teacher, 64, gpu)
    sizes = [estimate.count(p)["frozen"] * 4 for p in teacher.parts.values()]
    assert whole.weights == sum(sizes) and offload.weights == max(sizes) and offload.peak < whole.peak
    assert offload.seconds - whole.seconds == pytest.approx(4 * 2 * sum(sizes) / (PCIE_GBS * 1e9))
    # VAE tiling: a latent larger than the VAE's tile (tiny-flux: 32 px) decodes in tiles
    big = SynthesisSpec(num_images=2, batch_size=2, num_inference_steps=1, dtype="float32")
    untiled = estimate.synthesis(big, teacher, 256, gpu)
    tiled = estimate.synthesis(big.model_copy(update={"vae_tiling": True}), teacher, 256, gpu)
    assert tiled.activations < untiled.activations

    # 8-bit AdamW for the student: 2 bytes a trained parameter instead of 8
    student = models.describe_student("tiny-llamagen", Path("."))
    adam = estimate.student_training(StudentSettings(model="tiny-llamagen"), student, gpu)
    eight = estimate.student_training(StudentSettings(model="tiny-llamagen", use_8bit_adam=True), student, gpu)
    assert adam.optimizer == 4 * eight.optimizer == 4 * 2 * (adam.gradients // 4) > 0
    # LlamaGen's T5 leaves the GPU after its features are cached: counted at the setup only
    t5 = estimate.count(student.parts["text_encoder"])["frozen"] * 4
    assert adam.setup - (adam.weights - adam.gradients) == t5 > 0
    assert "leaves the GPU" in " ".join(adam.notes)


def test_student_evaluation_batch_is_planned_and_proposed():
    """A 7B student's evaluation over the card is brought under by `evaluation.student_batch_size`."""
    from proxytune.spec import load_spec

    path = Path(__file__).resolve().parents[1] / "specs" / "profiles" / "sdxl-lumina-24gb.yaml"
    spec = load_spec(path)
    whole = spec.model_copy(update={"evaluation": spec.evaluation.model_copy(update={"student_batch_size": None})})
    plan = plan_spec(whole, str(path), path.parent, _gpu(24.0))
    row = next(s for s in plan.stages if s.stage == "evaluate (student)")
    assert not row.fits and plan.suggestions["evaluate (student)"].changes == {"student_batch_size": 2}
    halved = next(s for s in plan_spec(spec, str(path), path.parent, _gpu(24.0)).stages if s.stage == "evaluate (student)")
    assert halved.fits and halved.peak < row.peak
