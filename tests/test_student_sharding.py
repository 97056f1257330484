"""`student.sharding: fsdp`: a direct-full student sharded over 2 CPU processes (gloo, FSDP2) trains as one
process does, checkpoints and saves whole weights, and resumes after a crash; the spec's bad combinations."""

import csv
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import copy_images, make_params, tiny_spec
from proxytune.spec.student import StudentSettings
from proxytune.stages.student import FULL_WEIGHTS, StudentTrainer

# One reference photo, no caption dropout, no dropout: every process draws the same batch, so two sharded
# processes must follow the one-process run step for step (the mean of equal gradients is that gradient).
STUDENT = {"recipe": "direct-full", "steps": 3, "batch_size": 2, "checkpoint_every": 2, "learning_rate": 1e-3,
           "cfg_dropout": 0.0, "dropout": 0.0}


def _spec(project, photos, name: str, **student) -> dict:
    copy_images(photos / "dog", project / "one-dog", count=1)
    spec = tiny_spec(name, student={**tiny_spec()["student"], **STUDENT, **student})
    spec["subjects"][0]["images"] = "../one-dog"
    return spec


def _launch(params, project, **extra) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PROXYTUNE_LAUNCHED", "PROXYTUNE_CRASH_AT")}
    done = subprocess.run([sys.executable, "-m", "proxytune.cli", "stage", "student", "--params", str(params.path)],
                          cwd=project, env={**env, **extra}, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def test_sharded_direct_full_matches_one_process_saves_whole_weights_and_resumes(project, photos):
    from safetensors.torch import load_file

    from proxytune.backends import students

    one = StudentTrainer(make_params(project, _spec(project, photos, "one")))
    one.setup()
    one.train()
    expected = {k: v.detach().clone() for k, v in one.bundle.model.state_dict().items()}

    params = make_params(project, _spec(project, photos, "two", processes=2, sharding="fsdp"))
    code, log = _launch(params, project, PROXYTUNE_CRASH_AT="student:step:2")
    assert code != 0 and "simulated crash at student:step:2" in log, log[-3000:]
    assert "launching 2 processes" in log
    # the step-2 checkpoint holds the whole weights (gathered), not one process's shard
    [checkpoint] = [p for p in params.work("student").glob("*/checkpoint-2")]
    saved = load_file(checkpoint / "trained.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in expected.items()}

    code, log = _launch(params, project)
    assert code == 0, log[-3000:]
    assert "student: resuming from step 2" in log and "gathered" in log

    # the saved student: whole, equal to the one-process run's, and it loads into a fresh model
    weights = load_file(params.out("student") / FULL_WEIGHTS)
    assert weights.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6, msg=key)
    fresh = students.load_student("tiny-llamagen")
    assert not torch.equal(fresh.model.lm_head.weight, weights["lm_head.weight"])  # training moved the weights
    fresh.model.load_state_dict(weights)
    cond, codes, keep = one.conds[:1], one.codes[:1], torch.zeros(1, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(fresh.image_logits(cond, codes, keep), one.bundle.image_logits(cond, codes, keep),
                                   rtol=1e-4, atol=1e-5)
    # every step's loss, the two before the crash and the resumed one, is the one-process run's
    with open(params.out("student") / "loss.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert losses == pytest.approx(one.progress.losses, rel=1e-5)
    assert len(set(losses)) == 3  # the loss moved each step


@pytest.mark.parametrize("student,message", [
    ({"sharding": "fsdp"}, "student.sharding: fsdp shards over student.processes, which is 1; set processes: 2"),
    ({"sharding": "fsdp", "processes": 2, "use_8bit_adam": True}, "student.sharding: fsdp with use_8bit_adam is not"),
    ({"sharding": "fsdp", "processes": 2, "mixed_precision": "fp16"}, "student.sharding: fsdp with mixed_precision: fp16"),
    ({"sharding": "fsdp", "processes": 2, "compile": True}, "student.sharding: fsdp with compile: true is not"),
])
def test_bad_sharding_is_one_line_naming_the_field(project, student, message):
    from click.testing import CliRunner

    from proxytune.cli import main

    path = project / "specs" / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_spec("bad", student={**tiny_spec()["student"], **student})))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"error: {path}: ") and message in result.output
    assert StudentSettings(sharding="fsdp", processes=2).sharding == "fsdp"


def test_direct_full_with_tied_weights_saves_and_reloads(project, photos, tmp_path):
    """tiny-janus ties its head to its embeddings (one tensor, two keys): the saved state gives each key a copy,
    which safetensors writes (it refuses shared memory) and which loads back into the tied model."""
    from safetensors.torch import load_file

    from proxytune.backends import students

    r = StudentTrainer(make_params(project, _spec(project, photos, "tied", model="tiny-janus", steps=1, dropout=None,
                                                  sampling={})))
    r.setup()
    r.train()
    weights = load_file(r._save_weights(tmp_path))
    assert torch.equal(weights["lm_head.weight"], weights["model.language_model.embed_tokens.weight"])
    fresh = students.load_student("tiny-janus")
    assert not torch.equal(fresh.model.lm_head.weight, weights["lm_head.weight"])  # the step moved them
    fresh.model.load_state_dict(weights)
    assert fresh.model.lm_head.weight is fresh.model.get_input_embeddings().weight  # still tied
    torch.testing.assert_close(fresh.model.lm_head.weight, r.bundle.model.lm_head.weight, rtol=0, atol=0)
