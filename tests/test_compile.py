"""Compile is a pure function: stage wiring, per-stage params, several experiments in one dvc.yaml."""

from proxytune import compile as compiler
from proxytune.spec import parse_spec


def resolved(name: str, subjects=("dog",), **sections):
    spec = parse_spec(
        {"name": name, "subjects": [{"name": s, "class": "dog", "images": f"refs/{s}"} for s in subjects], **sections},
        "x.yaml",
    )
    return compiler.ResolvedSpec(spec, f"specs/{name}.yaml", "0" * 64, {s: f"refs/{s}" for s in subjects})


def expand(dvc: dict) -> dict:
    """Stage name -> (deps, params keys, outs), as DVC expands foreach items."""
    stages = {}
    for step, group in dvc["stages"].items():
        for key, item in group["foreach"].items():
            sub = lambda s: (s.replace("${item.dir}", item["dir"]).replace("${item.refs}", item["refs"])  # noqa: E731
                             .replace("${item.student}", item["student"]).replace("${item.up}", item["up"]))
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
    assert p["subject"] == {"name": "dog", "class": "dog", "token": "sks"}
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


def test_student_variants_share_teacher_proxies_and_codes():
    """Baselines and size sweeps of one spec: extra student and evaluate stages per variant, reading
    the main experiment's teacher, proxies and codes; each variant's params only change its own stages."""
    variants = {"direct": {"recipe": "direct-lora"}, "n250": {"num_proxy_images": 250, "lora": {"rank": 4}}}
    dvc, params = compiler.compile_specs([resolved("exp", student={"steps": 7, "variants": variants})])
    stages = expand(dvc)
    assert [n for n in stages if n.startswith(("teacher", "synthesis", "codes"))] == \
        ["teacher@exp.dog", "synthesis@exp.dog", "codes@exp.dog"]  # trained and generated once
    assert stages["student@exp--n250.dog"]["deps"] == ["runs/exp/dog/proxy", "runs/exp/dog/codes"]
    assert stages["student@exp--n250.dog"]["outs"] == ["runs/exp--n250/dog/student"]
    assert set(stages["evaluate@exp--direct.dog"]["deps"]) == {"refs/dog", "runs/exp/dog/teacher", "runs/exp--direct/dog/student"}
    main, n250 = params["runs/exp/dog/params.yaml"], params["runs/exp--n250/dog/params.yaml"]
    assert "variants" not in main["student"]  # editing a variant does not touch the main student's params
    assert n250["student"]["num_proxy_images"] == 250 and n250["student"]["steps"] == 7  # merged over the main section
    assert n250["student"]["lora"] == {**main["student"]["lora"], "rank": 4}
    assert n250["upstream_dir"] == "runs/exp/dog" and n250["experiment"] == "exp--n250"
    assert n250["tracking"]["experiment"] == "exp"  # one MLflow experiment for the spec
    assert params["runs/exp--direct/dog/params.yaml"]["student"]["recipe"] == "direct-lora"
    assert compiler.targets([resolved("exp", student={"variants": variants})]) == \
        ["evaluate@exp.dog", "evaluate@exp--direct.dog", "evaluate@exp--n250.dog"]
    # recompiling without variants removes their stages
    dvc2, _ = compiler.compile_specs([resolved("exp")], existing=dvc)
    assert not [n for n in expand(dvc2) if "--" in n]


def plot_files(dvc: dict) -> dict[str, list]:
    """Top-level plot id -> the files it reads."""
    out = {}
    for plot in dvc.get("plots", []):
        (name, props), = plot.items()
        out[name] = list(props["y"]) if isinstance(props["y"], dict) else [name]
    return out


def test_plots_declare_training_curves_and_per_prompt_metrics():
    """`dvc plots show` finds every stage's curves (teacher, each student: own, variant, joint) and the
    per-prompt metrics; recompiling replaces an experiment's plots and keeps the others and the user's own."""
    variants = {"direct": {"recipe": "direct-lora"}}
    dvc, _ = compiler.compile_specs([resolved("exp", student={"variants": variants})])
    plots = plot_files(dvc)
    assert plots["runs/exp/dog/teacher/loss.csv"] == ["runs/exp/dog/teacher/loss.csv"]
    assert "runs/exp/dog/student/loss.csv" in plots and "runs/exp--direct/dog/student/loss.csv" in plots
    assert "runs/exp--direct/dog/teacher/loss.csv" not in plots  # variants share the main teacher
    for key in ("exp.dog", "exp--direct.dog"):
        assert plots[f"dino per prompt {key}"] == [f"runs/{key.split('.')[0]}/dog/eval/per_prompt.csv"]
    teacher = next(p for p in dvc["plots"] if "runs/exp/dog/teacher/loss.csv" in p)["runs/exp/dog/teacher/loss.csv"]
    assert (teacher["x"], teacher["y"]) == ("step", "loss")
    dino = next(p for p in dvc["plots"] if "dino per prompt exp.dog" in p)["dino per prompt exp.dog"]
    assert dino["x"] == "prompt" and dino["y"] == {"runs/exp/dog/eval/per_prompt.csv": ["teacher_dino", "student_dino"]}

    spec = parse_spec({"name": "j", "subjects": [{"name": s, "class": "dog", "images": f"refs/{s}", "token": f"s{s}"}
                                                 for s in ("a", "b")], "student": {"multi_subject": True}}, "x.yaml")
    both = compiler.ResolvedSpec(spec, "specs/j.yaml", "0" * 64, {"a": "refs/a", "b": "refs/b"})
    user = {"my-plot": {"y": {"elsewhere/curve.csv": "acc"}}}
    dvc2, _ = compiler.compile_specs([both], existing={**dvc, "plots": [*dvc["plots"], user]})
    plots2 = plot_files(dvc2)
    assert "runs/j/_joint/student/loss.csv" in plots2 and "runs/j/a/student/loss.csv" not in plots2
    assert plots2["my-plot"] == ["elsewhere/curve.csv"] and "dino per prompt exp.dog" in plots2
    dvc3, _ = compiler.compile_specs([resolved("exp")], existing=dvc2)  # variant removed: its plots go
    assert not [name for name in plot_files(dvc3) if "exp--direct" in name]
    assert "runs/j/_joint/student/loss.csv" in plot_files(dvc3)
