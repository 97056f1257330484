"""`proxytune report`: the HTML page and Markdown summary built from what the evaluate stage writes.

The fixture builds the stage outputs by hand (records, eval/ JSON files, small real PNGs) in a
compiled tmp project, so these tests run no model and stay independent of the evaluate stage.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from proxytune import report
from proxytune.cli import main
from proxytune.errors import ProxytuneError

CHROMIUM = Path("/usr/bin/chromium")
EVIL_PROMPT = 'a S* dog <script>alert("x")</script> | on a "beach" & more'
PROMPTS = ["a S* dog in the jungle", EVIL_PROMPT, "a S* dog wearing a red hat"]
K = 2  # images per prompt
DIGEST = {name: f"{i}" * 64 for i, name in enumerate(["refs", "teacher", "proxy", "student", "prompts"], 1)}


def _spec(project: Path) -> Path:
    spec = {
        "name": "rep",
        "subjects": [
            {"name": "dog", "class": "dog", "images": "dreambench:dog"},
            {"name": "plain", "class": "toy", "images": "../refs/plain"},
        ],
        "teacher": {"model": "tiny-sd"},
        "student": {"model": "tiny-llamagen"},
        "evaluation": {"clip_model": "tiny-clip", "dino_model": "tiny-dino"},
    }
    path = project / "specs" / "rep.yaml"
    path.write_text("# report test spec\n" + yaml.safe_dump(spec, sort_keys=False))
    return path


def _png(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _metric(mean: float) -> dict:
    return {"mean": mean, "ci95": [round(mean - 0.05, 4), round(mean + 0.05, 4)]}


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def fake_stage_outputs(folder: Path, subject: str, photos: list[Path], *, models: list[str], random_init: bool,
                       variance: bool, gate: bool) -> None:
    """What teacher, synthesis, student and evaluate write for one subject (the documented contract)."""
    teacher_version, student_version = f"rep.{subject}.teacher@1", f"rep.{subject}.student@2"
    _write_json(folder / "teacher" / "record.json", {
        "stage": "teacher", "run_id": "a" * 32, "model": f"rep.{subject}.teacher", "version": "1",
        "base_model": "tiny-sd", "adapter_digest": DIGEST["teacher"], "references_digest": DIGEST["refs"]})
    _write_json(folder / "proxy" / "record.json", {
        "stage": "synthesis", "run_id": "b" * 32, "digest": DIGEST["proxy"], "prompts_digest": DIGEST["prompts"],
        "num_images": 6, "teacher_version": teacher_version})
    _write_json(folder / "student" / "record.json", {
        "stage": "student", "run_id": "c" * 32, "model": f"rep.{subject}.student", "version": "2",
        "base_model": "tiny-llamagen", "adapter_digest": DIGEST["student"], "proxy_digest": DIGEST["proxy"],
        "teacher_version": teacher_version})
    ev = folder / "eval"
    means = {m: 0.5 + 0.1 * i for i, m in enumerate(models)}
    _write_json(ev / "metrics.json", {
        "models": {m: {"clip_i": _metric(v), "clip_t": _metric(v / 2), "dino": _metric(v - 0.2)} for m, v in means.items()},
        "random_init": random_init, "prompts": len(PROMPTS), "images_per_prompt": K,
        "bootstrap": {"resamples": 200, "seed": 0, "unit": "prompt"}})
    _write_json(ev / "prompts.json", PROMPTS)
    _write_json(ev / "per_prompt.json", {
        m: [{"prompt": p, "clip_i": v + 0.01 * i, "clip_t": v / 2, "dino": v - 0.2} for i, p in enumerate(PROMPTS)]
        for m, v in means.items()})
    _write_json(ev / "encoders.json", {"clip": {"model": "tiny-clip", "random_init": random_init},
                                       "dino": {"model": "tiny-dino", "random_init": random_init}, "random_init": random_init})
    _write_json(ev / "record.json", {"stage": "evaluate", "run_id": "e" * 32, "teacher_version": teacher_version,
                                     "student_version": student_version})
    if variance:
        rng = np.random.default_rng(0)
        _write_json(ev / "variance.json", {
            "feature": "DINO CLS (tiny-dino)", "samples": 16, "prompt": f"a S* {subject}",
            "models": {m: {"total_variance": 2.0 + i, "distances": rng.normal(1.0 + i, 0.2, 16).tolist()}
                       for i, m in enumerate(models)}})
    if gate:
        _write_json(ev / "gate.json", {"rule": "dino >= teacher", "passed": False, "student_version": student_version,
                                       "details": ["dino >= teacher: 0.4000 < 0.3000 FAIL"]})
    colours = [(200, 40, 40), (40, 160, 60), (40, 70, 200), (230, 200, 40)]
    for mi, model in enumerate(models):
        for p in range(len(PROMPTS)):
            for k in range(K):
                if model == "teacher":  # real photo content, as a generator would give
                    image = Image.open(photos[(p + k) % len(photos)]).convert("RGB").resize((64, 64))
                else:
                    image = Image.new("RGB", (64, 64), colours[(mi + p + k) % len(colours)])
                    image.paste((255, 255, 255), (8 * k, 8 * p, 8 * k + 24, 8 * p + 24))
                _png(ev / "images" / model / f"p{p:02d}_k{k}.png", image)


@pytest.fixture
def evaluated(project, photos):
    """A compiled project with two evaluated subjects: dog (3 models, variance, gate, random init)
    and plain (2 models, no variance, no gate, references inside the project)."""
    from proxytune.project import resolve_spec, write_compiled

    plain = project / "refs" / "plain"
    for i, colour in enumerate([(250, 120, 0), (0, 120, 250), (90, 90, 90)]):
        _png(plain / f"{i:02d}.png", Image.new("RGB", (96, 80), colour))
    spec = _spec(project)
    write_compiled([resolve_spec(spec, project)], project)
    pictures = sorted((photos / "dog").iterdir())
    fake_stage_outputs(project / "runs/rep/dog", "dog", pictures, models=["teacher", "student", "direct-lora"],
                       random_init=True, variance=True, gate=True)
    fake_stage_outputs(project / "runs/rep/plain", "plain", pictures, models=["teacher", "student"],
                       random_init=False, variance=False, gate=False)
    return spec


def expected_images() -> int:
    """<img> tags on the page: per grid row the references (at most 4) and K images per model, + 2 charts."""
    refs = {"dog": min(report.GRID_REFERENCES, 5), "plain": 3}  # the stand-in dog has 5 photos, as DreamBench's
    models = {"dog": 3, "plain": 2}
    return sum(len(PROMPTS) * (refs[s] + models[s] * K) for s in refs) + 2


def section(page: str, subject: str) -> str:
    start = page.index(f'<section id="subject-{subject}">')
    return page[start : page.index("</section>", start)]


def test_report_is_written_self_contained_and_escaped(evaluated, project):
    files = report.write_report(evaluated, project)
    assert files.html == project / "runs/rep/report.html" and files.md == project / "runs/rep/report.md"
    page, summary = files.html.read_text(), files.md.read_text()

    # self-contained: nothing to fetch, every picture inline
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    sources = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)
    assert len(sources) == len(re.findall(r"<img\b", page)) == expected_images()
    assert all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in sources)
    assert all('alt="' in tag for tag in re.findall(r"<img\b[^>]*>", page))
    assert "Content-Security-Policy" in page

    # all text escaped: the prompt's <script> is text, the page's only script is its own
    assert "<script>alert" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert page.count("<script>") == 1
    assert "<script>alert" not in summary and "&lt;script&gt;" in summary and r"\| on a" in summary

    # the tables: Table 1 per subject (all models, mean [lo, hi]), per-prompt, summary across subjects
    dog, plain = section(page, "dog"), section(page, "plain")
    table = re.search(r'<table id="metrics-dog".*?</table>', dog, re.S).group(0)
    assert re.findall(r'<th scope="row">([^<]*)</th>', table) == ["teacher", "student", "direct-lora"]
    assert "0.5000 [0.4500, 0.5500]" in table and "<strong>0.7000 [0.6500, 0.7500]</strong>" in table
    assert "intervals resample prompts, each with all its images (200 resamples)" in table
    assert "intervals resample prompts, each with all its images" in summary
    assert 'class="per-prompt"' in dog and "0.5100" in dog
    summary_table = re.search(r'<table id="summary-table".*?</table>', page, re.S).group(0)
    assert "#subject-dog" in summary_table and "#subject-plain" in summary_table
    assert summary_table.count("<tr>") == 1 + 3 + 2

    # banner only where models/encoders were random-initialised
    assert report.RANDOM_INIT_BANNER in dog and report.RANDOM_INIT_BANNER not in plain
    assert page.index(report.RANDOM_INIT_BANNER) < page.index('id="summary"')  # also at the top

    # gate, variance charts, lineage, spec text
    assert 'class="fail">failed' in dog and "dino &gt;= teacher: 0.4000 &lt; 0.3000 FAIL" in dog
    assert "No promotion gate configured" in plain and "Not computed" in plain
    assert dog.count("<figure>") == 2
    for value in [DIGEST["refs"], DIGEST["teacher"], DIGEST["proxy"], DIGEST["student"], "rep.dog.teacher@1",
                  "rep.dog.student@2", "e" * 32, "6 images"]:
        assert value in dog and value in summary
    assert "(5 images)" in dog and "refs/plain (3 images)" in plain
    assert "# report test spec" in page and "dreambench:dog" in page

    # markdown: the same tables, no pictures, a link to the page
    assert "](report.html)" in summary and "data:image" not in summary
    assert "| dog | direct-lora | 0.7000 [0.6500, 0.7500]" in summary
    assert "| student | 0.6000 [0.5500, 0.6500] |" in summary
    assert "### Per-prompt scores" in summary and "### Lineage" in summary and "**failed**" in summary
    assert f"> **{report.RANDOM_INIT_BANNER}**" in summary


def test_lineage_disagreement_and_stale_spec_are_flagged(evaluated, project):
    student = project / "runs/rep/plain/student/record.json"
    record = json.loads(student.read_text())
    student.write_text(json.dumps({**record, "proxy_digest": "f" * 64}))
    evaluated.write_text(evaluated.read_text() + "\n# edited\n")
    loaded = report.load_report(evaluated, project)
    plain = next(s for s in loaded.subjects if s.name == "plain")
    warnings = report.lineage_warnings(plain, loaded.spec_digest)
    assert any("names proxy set " + "f" * 64 in w for w in warnings)
    assert any("spec changed" in w for w in warnings)


def test_shared_and_upstream_folders_are_followed_for_records(evaluated, project):
    """A multi-subject subject's student lives in the experiment's _joint folder (params student_dir);
    a variant's teacher and proxies in the main experiment's folder (params upstream_dir)."""
    import yaml

    params_path = project / "runs/rep/plain/params.yaml"
    params = yaml.safe_load(params_path.read_text())
    shutil.move(project / "runs/rep/plain/student", project / "runs/rep/_joint/student")
    params_path.write_text(yaml.safe_dump({**params, "student_dir": "runs/rep/_joint/student"}))
    plain = next(s for s in report.load_report(evaluated, project).subjects if s.name == "plain")
    assert plain.records.student.model == "rep.plain.student"
    assert not [w for w in report.lineage_warnings(plain, "") if "no student record" in w]

    variant = project / "runs/rep--v/plain"
    shutil.copytree(project / "runs/rep/plain/eval", variant / "eval")
    shutil.copytree(project / "runs/rep/_joint/student", variant / "student")
    (variant / "params.yaml").write_text(yaml.safe_dump({**params, "experiment": "rep--v", "upstream_dir": "runs/rep/plain"}))
    loaded = report.load_subject(project, "rep--v", "plain", "specs/rep.yaml", "plain / v")
    assert loaded.name == "plain / v" and loaded.records.teacher.model == "rep.plain.teacher"
    assert loaded.records.proxy.digest == plain.records.proxy.digest


def test_missing_eval_is_a_one_line_error(evaluated, project):
    shutil.rmtree(project / "runs/rep/plain/eval")
    with pytest.raises(ProxytuneError, match=r"runs/rep/plain/eval: .*run `proxytune apply .*rep.yaml` first"):
        report.write_report(evaluated, project)
    result = CliRunner().invoke(main, ["report", "specs/rep.yaml"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "proxytune apply specs/rep.yaml" in lines[0]
    assert not (project / "runs/rep/report.html").exists()


def test_malformed_metrics_is_a_one_line_error(evaluated, project):
    (project / "runs/rep/dog/eval/metrics.json").write_text("{not json")
    with pytest.raises(ProxytuneError, match="metrics.json: not valid JSON"):
        report.load_report(evaluated, project)


def test_cli_writes_and_logs_to_mlflow(evaluated, project):
    from proxytune.tracking import store

    result = CliRunner().invoke(main, ["report", "specs/rep.yaml"])
    assert result.exit_code == 0, result.output + result.stderr
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", result.output).group(1)
    client = store.connect(store.resolve_uri(None, project))
    run = client.get_run(run_id)
    assert run.info.run_name == "report" and run.info.status == "FINISHED"
    assert run.data.tags["proxytune.kind"] == "report" and run.data.tags["proxytune.subjects"] == "dog,plain"
    assert client.get_experiment(run.info.experiment_id).name == "rep"
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["report.html", "report.md"]


# -- a real browser ------------------------------------------------------------------------------
def _chromium() -> Path:
    found = shutil.which("chromium") or (str(CHROMIUM) if os.access(CHROMIUM, os.X_OK) else None)
    if found:
        return Path(found)
    if os.environ.get("CI"):
        pytest.fail(f"chromium not found ({CHROMIUM}) but CI is set: .ci/run installs chromium before the tests")
    pytest.skip(f"chromium not installed ({CHROMIUM}; apt-get install chromium): the browser test needs it")


def _browse(tmp_path: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    command = [
        str(_chromium()), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / ('chromium-' + name)}", "--enable-logging=stderr", "--v=0",
        "--virtual-time-budget=5000", *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    uncaught = [line for line in done.stderr.splitlines() if "Uncaught" in line]
    assert not uncaught, "\n".join(uncaught)
    return done


def test_report_renders_in_a_headless_browser(evaluated, project, tmp_path):
    _chromium()
    files = report.write_report(evaluated, project)
    url = files.html.resolve().as_uri()
    dom = _browse(tmp_path, "dom", "--dump-dom", url).stdout

    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, "the page's script did not run before the dump"
    assert int(loaded.group(1)) == int(loaded.group(2)) == expected_images()
    table = re.search(r'<table id="metrics-dog".*?</table>', dom, re.S).group(0)
    assert re.findall(r'<th scope="row">([^<]*)</th>', table) == ["teacher", "student", "direct-lora"]
    assert "<script>alert" not in dom and EVIL_PROMPT.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in dom

    shot = tmp_path / "report.png"
    _browse(tmp_path, "shot", f"--screenshot={shot}", "--window-size=1200,2000", url)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2000)
    pixels = np.asarray(image, dtype=float)
    assert pixels.std() > 10, "blank screenshot"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # text, photos and charts, not a flat page
    keep = os.environ.get("PROXYTUNE_REPORT_SCREENSHOT")  # to look at it: set to a path
    if keep:
        shutil.copy(shot, keep)
