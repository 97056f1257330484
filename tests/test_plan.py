"""proxytune plan: the estimator against the CPU allocator, its depth scaling, parameter counts, the
option search and the command."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from proxytune.cli import main
from proxytune.plan import estimate, measure, models, options, steps
from proxytune.plan.gpus import Gpu
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
    assert found.changes["batch_size"] == 1 and found.changes["mixed_precision"] == "bf16"
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
    data = json.loads(result.output)
    assert [s["stage"] for s in data["stages"]] == ["teacher", "synthesis", "codes", "student", "evaluate (teacher)",
                                                    "evaluate (student)"]
    for stage in data["stages"]:
        assert stage["peak_bytes"] == sum(stage[k] for k in ("weights_bytes", "gradients_bytes", "optimizer_bytes",
                                                            "activations_bytes"))
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
