"""Multi-subject: one student learns several subjects (each its own token) from the union of their
proxy sets; every subject is still evaluated on its own."""

import pytest
import yaml

from conftest import make_params, tiny_spec
from proxytune.stages.params import load_params
from proxytune.stages.student import StudentTrainer
from test_student import fake_proxy_set

TWO = [{"name": "dog", "class": "dog", "images": "dreambench:dog", "token": "S1*"},
       {"name": "cat", "class": "cat", "images": "dreambench:cat", "token": "S2*"}]


def two_subjects(**student):
    spec = tiny_spec(student={"multi_subject": True, "steps": 6, "batch_size": 4, "checkpoint_every": 100, **student})
    spec["subjects"] = [dict(s) for s in TWO]
    return spec


def test_compile_wires_one_joint_student_and_per_subject_evaluation(project):
    make_params(project, two_subjects())
    dvc = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert "t.dog" not in dvc["student"]["foreach"] if "student" in dvc else True
    joint = dvc["student-joint.t"]
    assert joint["cmd"] == "proxytune stage student --params runs/t/_joint/params.yaml"
    assert joint["deps"] == ["runs/t/dog/proxy", "runs/t/dog/codes", "runs/t/cat/proxy", "runs/t/cat/codes"]
    assert joint["outs"] == ["runs/t/_joint/student"]
    assert dvc["evaluate"]["foreach"]["t.cat"]["student"] == "runs/t/_joint/student"
    assert "${item.student}" in dvc["evaluate"]["do"]["deps"]
    assert set(dvc["codes"]["foreach"]) == {"t.dog", "t.cat"}
    joint_params = load_params(project / "runs/t/_joint/params.yaml")
    assert joint_params.joint_subjects == ["runs/t/dog", "runs/t/cat"]
    assert load_params(project / "runs/t/cat/params.yaml").student_out().as_posix() == "runs/t/_joint/student"
    # back to one student per subject: the joint stage disappears
    spec = two_subjects()
    spec["student"]["multi_subject"] = False
    make_params(project, spec)
    dvc = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert "student-joint.t" not in dvc and set(dvc["student"]["foreach"]) == {"t.dog", "t.cat"}


@pytest.mark.parametrize("change, message", [
    (lambda s: s["subjects"][1].update(token="S1*"), "every subject needs its own token"),
    (lambda s: s["subjects"].pop(), "needs at least two subjects"),
    (lambda s: s["student"].update(recipe="direct-lora"), "only the proxy recipe"),
])
def test_bad_multi_subject_specs_are_one_line_errors(project, change, message):
    from proxytune.errors import SpecError

    spec = two_subjects()
    change(spec)
    with pytest.raises(SpecError, match=message):
        make_params(project, spec)


def test_the_joint_student_trains_on_the_union_of_the_proxy_sets(project):
    make_params(project, two_subjects())
    for subject, count in (("dog", 3), ("cat", 2)):
        params = load_params(project / f"runs/t/{subject}/params.yaml")
        fake_proxy_set(params, count)
        manifest = (params.out("proxy") / "manifest.json")
        manifest.write_text(manifest.read_text().replace("a S* dog", f"a {params.subject.token} {params.subject.class_noun}"))
    # the codes were made before the prompt edit: redo them as the codes stage would
    from safetensors.torch import save

    from proxytune.stages import codes

    for subject in ("dog", "cat"):
        params = load_params(project / f"runs/t/{subject}/params.yaml")
        tensors, metadata = codes.encode_proxies(params)
        (params.out("codes") / "codes.safetensors").write_bytes(save(tensors, metadata=metadata))
    recipe = StudentTrainer(load_params(project / "runs/t/_joint/params.yaml"))
    recipe.setup()
    assert len(recipe.codes) == 5 and recipe.conds.shape[0] == 2  # one prompt per subject
    assert recipe.prompt_index.tolist() == [0, 0, 0, 1, 1]
    assert recipe.proxy["subjects"] == ["dog", "cat"]
    recipe.train()
    assert recipe.progress.losses[-1] < recipe.progress.losses[0]
