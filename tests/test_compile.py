"""Compile is a pure function: stage wiring, per-stage params, several experiments in one dvc.yaml."""

from proxytune import compile as compiler
from proxytune.spec import parse_spec


def resolved(name: str, subjects=("dog",)):
    spec = parse_spec(
        {"name": name, "subjects": [{"name": s, "class": "dog", "images": f"refs/{s}"} for s in subjects]}, "x.yaml"
    )
    return compiler.ResolvedSpec(spec, f"specs/{name}.yaml", "0" * 64, {s: f"refs/{s}" for s in subjects})


def expand(dvc: dict) -> dict:
    """Stage name -> (deps, params keys, outs), as DVC expands foreach items."""
    stages = {}
    for step, group in dvc["stages"].items():
        for key, item in group["foreach"].items():
            sub = lambda s: (s.replace("${item.dir}", item["dir"]).replace("${item.refs}", item["refs"])  # noqa: E731
                             .replace("${item.student}", item["student"]))
            do = group["do"]
            (params_file, keys), = do["params"][0].items()
            stages[f"{step}@{key}"] = {
                "cmd": sub(do["cmd"]),
                "deps": [sub(d) for d in do["deps"]],
                "params": (sub(params_file), keys),
                "outs": [sub(o) for o in do["outs"]],
            }
    return stages


def test_stages_are_wired_teacher_to_evaluate():
    dvc, params = compiler.compile_specs([resolved("exp")])
    stages = expand(dvc)
    assert list(stages) == ["teacher@exp.dog", "synthesis@exp.dog", "codes@exp.dog", "student@exp.dog", "evaluate@exp.dog"]
    assert stages["teacher@exp.dog"]["deps"] == ["refs/dog"]
    assert stages["synthesis@exp.dog"]["deps"] == ["runs/exp/dog/teacher"]
    # the student never sees the references; proxy codes come from the codes stage
    assert stages["student@exp.dog"]["deps"] == ["runs/exp/dog/proxy", "runs/exp/dog/codes"]
    assert stages["codes@exp.dog"]["deps"] == ["runs/exp/dog/proxy"]
    assert stages["codes@exp.dog"]["params"] == ("runs/exp/dog/params.yaml", ["student.model"])
    assert set(stages["evaluate@exp.dog"]["deps"]) == {"refs/dog", "runs/exp/dog/teacher", "runs/exp/dog/student"}
    assert stages["student@exp.dog"]["cmd"] == "proxytune stage student --params runs/exp/dog/params.yaml"
    assert list(params) == ["runs/exp/dog/params.yaml"]


def test_each_stage_tracks_only_the_sections_it_reads():
    stages = expand(compiler.compile_specs([resolved("exp")])[0])
    keys = {name.split("@")[0]: set(stage["params"][1]) for name, stage in stages.items()}
    assert "student" not in keys["teacher"] and "student" not in keys["synthesis"]
    assert "student" in keys["student"] and "teacher" not in keys["student"]
    assert "tracking" not in set().union(*keys.values())  # moving the tracking server never retrains


def test_params_file_has_every_default_filled():
    _, params = compiler.compile_specs([resolved("exp")])
    p = params["runs/exp/dog/params.yaml"]
    assert p["teacher"]["lora"]["rank"] == 8 and p["synthesis"]["num_images"] == 1000
    assert p["subject"] == {"name": "dog", "class": "dog", "token": "S*"}
    assert p["source"]["references"] == "refs/dog"


def test_several_experiments_coexist_and_recompile_replaces_only_its_own():
    dvc, _ = compiler.compile_specs([resolved("a", ("dog", "cat"))])
    dvc, _ = compiler.compile_specs([resolved("b")], existing=dvc)
    assert set(expand(dvc)) >= {"teacher@a.dog", "teacher@a.cat", "teacher@b.dog"}
    dvc, _ = compiler.compile_specs([resolved("a", ("dog",))], existing=dvc)  # cat removed from spec a
    names = set(expand(dvc))
    assert "teacher@a.cat" not in names and "teacher@a.dog" in names and "evaluate@b.dog" in names


def test_compile_is_deterministic():
    first = compiler.compile_specs([resolved("b"), resolved("a", ("x", "y"))])
    second = compiler.compile_specs([resolved("b"), resolved("a", ("x", "y"))])
    assert first == second
    assert list(first[0]["stages"]["teacher"]["foreach"]) == ["a.x", "a.y", "b.dog"]


def test_targets_filter_by_subject():
    specs = [resolved("a", ("dog", "cat"))]
    assert compiler.targets(specs) == ["evaluate@a.dog", "evaluate@a.cat"]
    assert compiler.targets(specs, {"cat"}) == ["evaluate@a.cat"]
