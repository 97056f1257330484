"""apply's fit check and the spec's memory: mode (proxytune.fitcheck, proxytune.plan.auto), on CPU through
the card seams: `proxytune.plan.card.detect` (what torch.cuda reports on a GPU machine) and `apply --memory`.

The cards are sized from the plan of the spec itself (the tiny models' stages take MiB, the card keeps
1.5 GiB for the CUDA context), so the tests follow the estimator rather than hard-coded numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from proxytune.cli import main
from proxytune.plan import card
from proxytune.plan.gpus import RESERVED_GIB, custom_gpu

GIB = 2**30
SPEC = {
    "name": "fit",
    "subjects": [{"name": "dog", "class": "dog", "images": "dreambench:dog", "token": "sks"}],
    "teacher": {"model": "tiny-sd", "resolution": 64, "steps": 10},
    "synthesis": {"num_images": 8, "num_inference_steps": 4, "batch_size": 2},
    "student": {"model": "tiny-llamagen", "steps": 10, "batch_size": 16},
    "evaluation": {"num_prompts": 2, "images_per_prompt": 2, "clip_model": "tiny-clip", "dino_model": "tiny-dino"},
}


@pytest.fixture(scope="module")
def usable() -> int:
    """A card size (bytes usable) between the student's planned peak with and without gradient checkpointing;
    every other stage fits it."""
    from proxytune.plan.stages import plan_spec
    from proxytune.spec import parse_spec

    def peaks(**student) -> dict[str, int]:
        spec = parse_spec({**SPEC, "memory": "manual", "student": {**SPEC["student"], **student}}, "s.yaml")
        return {stage.stage: stage.peak for stage in plan_spec(spec, "s.yaml", Path("."), custom_gpu(80)).stages}

    plain, checkpointed = peaks(), peaks(gradient_checkpointing=True)["student"]
    usable = (plain["student"] + checkpointed) // 2
    assert checkpointed < plain["student"] and all(peak < checkpointed for name, peak in plain.items() if name != "student")
    return usable


def _card_gib(usable: int) -> float:
    """A card on which only the student, as the spec writes it, does not fit."""
    return RESERVED_GIB + usable / GIB


def _write(project: Path, **top) -> str:
    spec = {**SPEC, **top}
    for key, value in top.items():
        if isinstance(value, dict):
            spec[key] = {**SPEC.get(key, {}), **value}
    (project / "specs" / "fit.yaml").write_text(yaml.safe_dump(spec))
    return "specs/fit.yaml"


def _apply(*args: str):
    return CliRunner().invoke(main, ["apply", *args])


def _params(project: Path) -> dict:
    return yaml.safe_load((project / "runs" / "fit" / "dog" / "params.yaml").read_text())


def test_card_names_match_plans_table():
    def name_of(device: str, mib: int) -> tuple[str, float, bool]:
        gpu, known = card.as_gpu(card.Card(device, mib * 2**20))
        return gpu.name, gpu.bf16_tflops, known

    assert name_of("NVIDIA GeForce RTX 4090", 24564) == ("NVIDIA GeForce RTX 4090", 165.2, True)
    assert name_of("NVIDIA H100 80GB HBM3", 81559)[1:] == (989.0, True)
    assert name_of("NVIDIA A100-SXM4-40GB", 40536)[1:] == (312.0, True)
    a100_80 = card.as_gpu(card.Card("NVIDIA A100-SXM4-80GB", 81920 * 2**20))[0]
    assert a100_80.bandwidth_gbs == 2039 and a100_80.memory_gib == 80.0  # the 80 GB one, at the memory found
    assert name_of("NVIDIA L4", 23034)[1:] == (121.0, True)
    assert name_of("NVIDIA L40S", 46068)[2] is False  # not an L4


def test_cpu_apply_finds_no_card_without_importing_torch(tmp_path):
    """No GPU driver here: apply's card lookup answers from file checks, never importing torch or plan's estimator."""
    code = ("import sys; from proxytune import fitcheck, apply; "
            "print(fitcheck.find_card(fitcheck.Request(), 'local', print), 'torch' in sys.modules, "
            "'proxytune.plan.estimate' in sys.modules)")
    if any(Path(path).exists() for path in card.DRIVER_FILES):
        pytest.skip("this machine has a GPU driver")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.split() == ["None", "False", "False"]


def test_detect_asks_torch_in_a_child_process(tmp_path, monkeypatch):
    import torch

    driver = tmp_path / "version"  # stands in for /proc/driver/nvidia/version: the probe runs
    driver.write_text("")
    monkeypatch.setattr(card, "DRIVER_FILES", (str(driver),))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    found = [card.Card(torch.cuda.get_device_properties(i).name, torch.cuda.get_device_properties(i).total_memory)
             for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    assert card.detect() == found
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # every device hidden: the stages will run on CPU
    assert card.detect() == []


def test_refuses_a_stage_that_cannot_fit_before_writing_anything(project, monkeypatch, usable):
    path = _write(project, memory="manual")
    total = int(_card_gib(usable) * GIB)
    monkeypatch.setattr(card, "detect", lambda: [card.Card("NVIDIA L4", total), card.Card("NVIDIA L4", 2 * total)])
    result = _apply(path)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: student@fit.dog needs about "), lines
    assert "usable on the NVIDIA L4" in lines[0] and "to fit: student." in lines[0]
    assert "(or memory: auto)" in lines[0] and "--no-fit-check runs anyway" in lines[0]
    assert sorted(p.name for p in project.iterdir()) == ["specs"]  # no dvc.yaml, params, .dvc, registry or lock

    # the override runs anyway, with one warning line (a dry run: the stages themselves are other tests')
    result = _apply(path, "--no-fit-check", "--dry-run")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "student@fit.dog needs about" in warnings[0] and warnings[0].endswith("(--no-fit-check)")
    assert "stages to run: " in result.output and (project / "dvc.yaml").exists()
    assert "memory" in _params(project) and _params(project)["student"]["batch_size"] == 16  # manual: as written


def test_memory_auto_applies_plans_suggestion_and_plan_shows_the_same(project, usable):
    from proxytune.plan.stages import plan_spec
    from proxytune.spec import load_spec

    path = _write(project, memory="auto")
    memory = _card_gib(usable)
    expected = plan_spec(load_spec(path), path, project, custom_gpu(memory)).suggestions["student"].changes
    assert expected, "the card must need a change"
    result = _apply(path, "--memory", repr(memory), "--dry-run")
    assert result.exit_code == 0, result.output
    params = _params(project)
    for key, value in expected.items():
        assert params["student"][key] == value != SPEC["student"].get(key, None)
    if "batch_size" in expected:  # the optimiser still sees 16 images a step
        assert params["student"]["batch_size"] * params["student"]["gradient_accumulation_steps"] == 16
    record = params["memory"]
    assert record["mode"] == "auto" and record["changes"] == {f"student.{k}": v for k, v in {
        **expected, **({"gradient_accumulation_steps": 16 // expected["batch_size"]} if "batch_size" in expected else {})}.items()}
    shown = [line for line in result.output.splitlines() if line.startswith("memory: auto on a ")]
    assert len(shown) == 1 and all(f"student.{key}: " in shown[0] for key in expected)
    assert "fit check: every planned stage to run fits" in result.output
    assert params["teacher"] == yaml.safe_load(yaml.safe_dump(load_spec(path).teacher.model_dump(mode="json")))

    planned = CliRunner().invoke(main, ["plan", path, "--memory", repr(memory), "--json"])
    assert planned.exit_code == 0, planned.output
    data = json.loads(planned.output[planned.output.index("{"):])
    assert data["memory"]["changes"] == record["changes"] and data["fits"] is True


def test_default_turns_on_checkpointing_only_where_it_is_needed_and_unset(project, usable):
    memory = repr(_card_gib(usable))
    path = _write(project)  # memory: checkpointing, the default
    result = _apply(path, "--memory", memory, "--dry-run")
    assert result.exit_code == 0, result.output
    params = _params(project)
    assert params["student"]["gradient_checkpointing"] is True and params["teacher"]["gradient_checkpointing"] is False
    assert params["memory"]["changes"] == {"student.gradient_checkpointing": True}

    path = _write(project, student={"gradient_checkpointing": False})  # written by the user: kept, and refused
    result = _apply(path, "--memory", memory, "--dry-run")
    assert result.exit_code == 2 and "student@fit.dog needs about" in result.output

    result = _apply(path, "--memory", "80", "--dry-run")  # a card it fits: nothing changes
    assert result.exit_code == 0 and _params(project)["memory"]["changes"] == {}


def test_only_stages_dvc_will_run_are_checked_and_a_refusal_restores_the_files(project, monkeypatch, usable):
    from proxytune import project as project_module

    memory = repr(_card_gib(usable))
    path = _write(project, memory="manual")
    assert _apply(path, "--memory", "80", "--dry-run").exit_code == 0
    (project / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # the project has run before
    before = {p: p.read_bytes() for p in [project / "dvc.yaml", *project.glob("runs/**/params.yaml")]}

    path = _write(project, memory="manual", student={"learning_rate": 0.01})
    result = _apply(path, "--memory", memory, "--dry-run")  # DVC finds every stage stale: the student is refused
    assert result.exit_code == 2 and "student@fit.dog needs about" in result.output
    assert {p: p.read_bytes() for p in before} == before

    stale = project_module.stale_stages
    monkeypatch.setattr(project_module, "stale_stages",
                        lambda root, targets: [s for s in stale(root, targets) if not s.startswith("student@")])
    result = _apply(path, "--memory", memory, "--dry-run")  # the student is in dvc.lock: nothing to refuse
    assert result.exit_code == 0, result.output
    assert "student@" not in result.output and "evaluate@fit.dog" in result.output


def test_memory_auto_on_cpu_changes_nothing_and_says_so(project, monkeypatch):
    monkeypatch.setattr(card, "detect", lambda: [])
    path = _write(project, memory="auto")
    result = _apply(path, "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"memory: auto ({path}): no CUDA GPU here, so the spec's own settings are used" in result.output
    params = _params(project)
    assert "memory" not in params and params["student"]["batch_size"] == 16

    def broken(*args, **kwargs):
        raise RuntimeError("no such block kind\nsecond line")

    from proxytune.plan import auto

    monkeypatch.setattr(card, "detect", lambda: [card.Card("NVIDIA L4", 2 * GIB)])
    monkeypatch.setattr(auto, "adapt", broken)  # the estimate failing must not stop a GPU run
    result = _apply(path, "--dry-run")
    assert result.exit_code == 0, result.output
    assert (f"warning: {path}: fit check skipped (memory: auto not applied): plan failed: RuntimeError: no such block "
            "kind\n") in result.output
