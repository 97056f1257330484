"""Student variants: the paper's baselines and proxy-set size sweeps in one spec, sharing its teacher,
proxy set and codes (trained and generated once); each variant is its own registered student and
evaluation, shows up in the report, and editing one re-runs only its own stages."""

import json

import pytest
import yaml

from test_team_scale import cli, client_for, mini_spec, new_project

VARIANTS = {"direct": {"recipe": "direct-lora"}, "n2": {"num_proxy_images": 2}}


@pytest.fixture(scope="module")
def project(tmp_path_factory, photos):
    spec = mini_spec()
    spec["student"]["variants"] = VARIANTS
    root = new_project(tmp_path_factory.mktemp("variants"), {"t": spec})
    cli(root, photos, "apply", "specs/t.yaml")
    return root


def record(project, folder):
    return json.loads((project / folder / "record.json").read_text())


def test_variants_share_the_teacher_and_proxies_and_train_their_own_student(project):
    main, direct, n2 = (project / "runs" / name / "dog" for name in ("t", "t--direct", "t--n2"))
    for variant in (direct, n2):  # no teacher, proxies or codes of their own
        assert sorted(p.name for p in variant.iterdir() if not p.name.startswith(".")) == ["eval", "metrics.json", "params.yaml", "student"]
    proxy = record(main, "proxy")
    assert record(n2, "student")["proxy_digest"] == proxy["digest"]
    assert record(n2, "student")["model"] == "t--n2.dog.student"
    assert record(direct, "student")["recipe"] == "direct-lora" and record(direct, "student")["proxy_digest"] is None
    teacher_version = f"{record(main, 'teacher')['model']}@{record(main, 'teacher')['version']}"
    for variant in (direct, n2):
        assert record(variant, "eval")["teacher_version"] == teacher_version  # compared with the shared teacher
        metrics = json.loads((variant / "metrics.json").read_text())
        assert {"teacher", "student"} <= set(metrics)
    # the three students differ: the same seed, other data or other recipe
    digests = {record(folder, "student")["adapter_digest"] for folder in (main, direct, n2)}
    assert len(digests) == 3


def test_variant_runs_are_children_of_the_apply_and_registered(project):
    uri = f"sqlite:///{project / 'registry' / 'mlflow.db'}"
    client = client_for(uri)
    experiment = client.get_experiment_by_name("t")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("proxytune.kind") == "apply")
    stages = {r.data.tags["proxytune.dvc_stage"]: r for r in runs if r.data.tags.get("proxytune.kind") == "stage"}
    assert {"student@t--direct.dog", "evaluate@t--direct.dog", "student@t--n2.dog", "evaluate@t--n2.dog"} <= set(stages)
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in stages.values())
    assert stages["student@t--n2.dog"].data.tags["proxytune.proxy_images"] == "2"
    names = {m.name for m in client.search_registered_models()}
    assert {"t.dog.student", "t--direct.dog.student", "t--n2.dog.student", "t.dog.teacher"} <= names
    assert "t--direct.dog.teacher" not in names


def test_report_lists_each_variant_and_audit_passes(project, photos):
    cli(project, photos, "report", "specs/t.yaml")
    markdown = (project / "runs" / "t" / "report.md").read_text()
    assert "| dog / direct | student |" in markdown and "| dog / n2 | student |" in markdown
    assert "## Subject dog / direct" in markdown
    audit = cli(project, photos, "audit")
    assert audit.returncode == 0, audit.stdout


def test_editing_one_variant_reruns_only_its_stages(project, photos):
    spec_path = project / "specs" / "t.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    spec["student"]["variants"]["n2"]["steps"] = 3
    spec_path.write_text(yaml.safe_dump(spec))
    result = cli(project, photos, "apply", "specs/t.yaml", "--dry-run")
    line = next(l for l in result.stdout.splitlines() if l.startswith("stages to run: "))
    # (its evaluation follows once the new student differs: DVC lists the stages whose own inputs changed)
    assert line.removeprefix("stages to run: ").split(", ") == ["student@t--n2.dog"]
