"""The paper's claims, measured on the toy world (issue 10, item 6).

Runs `proxytune apply specs/toy-bench.yaml` in a project folder (unless --no-apply: then it reads the
outputs already there), and prints, per subject and as a mean over subjects, every model's metrics
with 95% intervals, then a verdict on each claim:

  (a) direct LoRA on the references gives low subject fidelity: nearer the untuned student's than the
      proxy-tuned student's;
  (b) the proxy-tuned student beats direct LoRA on subject fidelity;
  (c) the student matches or beats its teacher on subject fidelity (weak-to-strong);
  (d) the student's feature variance is lower than the teacher's (paper: 336.53 -> 239.14);
  (e) the proxy student keeps editability where training on the references (augmented or not) loses
      it (the paper's augmentation ablation): its prompt accuracy and subject+prompt accuracy beat
      each direct baseline's.

Subject fidelity is read on three measures: the oracle's subject accuracy (exact), DINO and CLIP-I.
A per-subject interval is the evaluation's own (bootstrap over prompts); the mean's is a bootstrap
over subjects of the per-subject means. Verdicts are printed as measured, whichever way they go.

    python benchmarks/toyworld.py --project /tmp/toy-bench        # applies, then summarises
    python benchmarks/toyworld.py --project /tmp/toy-bench --executor ray   # two stages at a time
    python benchmarks/toyworld.py --project . --no-apply --json out.json

Proxy count and curation (issue 29 item 5): `--proxies N` generates N proxies per subject instead of the spec's
(the paper: 1000), `--curate` over-generates (`--over-generate` times N) and keeps the N most faithful
(`curation_keys`: the spec keys of the curation), each run as an experiment of its own (toy-bench-p1000,
toy-bench-curated, ...). `--matrix` reads every such experiment in the project and prints the student's
subject and subject+prompt accuracy per (proxy count, curation) row with intervals, the same per subject with the
share of kept proxies the oracle accepts, and, paired by prompt and seed, what curation and what more proxies changed.

    python benchmarks/toyworld.py --project /tmp/toy-bench --proxies 1000 --curate   # one row of the four
    python benchmarks/toyworld.py --project /tmp/toy-bench --no-apply --matrix       # the four-row table

Student steps: `--student-steps N` adds a student variant (stepsN) that trains N steps on the experiment's own
proxies, so the teacher and the proxies are reused; `--matrix` then compares it with the spec's steps, paired.

    python benchmarks/toyworld.py --project /tmp/toy-bench --method-only --proxies 1000 --curate --student-steps 1200
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
METRICS = ("subject_acc", "prompt_acc", "subject_prompt_acc", "dino", "clip_i", "clip_t")
FIDELITY = ("subject_acc", "dino", "clip_i")
BASELINES = ("direct-lora", "direct-full", "augment")


GROW_STEP = "--grow-"  # a growing proxy count's step (held-out evaluation: not comparable with the others)


def collect(project: Path, experiment: str) -> dict:
    """{subject: {model: {metric: {"mean", "ci95"}}}} and variances, from every evaluation output."""
    runs = project / "runs"
    table: dict[str, dict[str, dict]] = {}
    variance: dict[str, dict[str, float]] = {}
    for folder in sorted(runs.glob(f"{experiment}*")):
        if not folder.is_dir() or not (folder.name == experiment or folder.name.startswith(f"{experiment}--")):
            continue  # another experiment whose name starts the same (toy-bench-p1000 for toy-bench)
        if GROW_STEP in folder.name:
            continue
        variant = folder.name[len(experiment) + 2 :] if folder.name != experiment else None
        for metrics_path in sorted(folder.glob("*/eval/metrics.json")):
            subject = metrics_path.parent.parent.name
            models = json.loads(metrics_path.read_text())["models"]
            row = table.setdefault(subject, {})
            for model, values in models.items():
                if variant is None:
                    row[model] = values
                elif model == "student":  # a variant's teacher and base models are the main run's
                    row[variant] = values
            var_path = metrics_path.parent / "variance.json"
            if variant is None and var_path.exists():
                var = json.loads(var_path.read_text())["models"]
                variance[subject] = {m: v["total_variance"] for m, v in var.items()}
    return {"metrics": table, "variance": variance}


def _bootstrap(values: list[float], seed: int = 0, resamples: int = 2000) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def mean_row(table: dict, model: str, metric: str) -> dict | None:
    values = [t[model][metric]["mean"] for t in table.values() if model in t and metric in t[model]]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "ci95": list(_bootstrap(values)), "subjects": len(values)}


def claims(data: dict) -> list[dict]:
    table, variance = data["metrics"], data["variance"]

    def m(model: str, metric: str) -> float | None:
        row = mean_row(table, model, metric)
        return None if row is None else row["mean"]

    out = []

    def verdict(name: str, text: str, checks: list[bool | None], numbers: dict) -> None:
        known = [c for c in checks if c is not None]
        status = "not measured" if not known else ("holds" if all(known) else "partly holds" if any(known) else "fails")
        out.append({"claim": name, "text": text, "verdict": status, "numbers": numbers})

    def beats(a: str, b: str, metric: str) -> bool | None:
        x, y = m(a, metric), m(b, metric)
        return None if x is None or y is None else x > y

    def at_least(a: str, b: str, metric: str) -> bool | None:
        x, y = m(a, metric), m(b, metric)
        return None if x is None or y is None else x >= y

    def nearer_base(metric: str) -> bool | None:  # "low": closer to the untuned student than to the proxy student
        base, direct, student = m("base-student", metric), m("direct-lora", metric), m("student", metric)
        if None in (base, direct, student):
            return None
        return abs(direct - base) < abs(student - direct)

    nums = {f"{model}.{k}": m(model, k) for model in ("base-student", "direct-lora", "student") for k in FIDELITY}
    verdict("a", "direct LoRA on the references gives low subject fidelity (nearer the untuned student than the proxy student)",
            [nearer_base(k) for k in FIDELITY], nums)
    verdict("b", "the proxy-tuned student beats direct LoRA on subject fidelity",
            [beats("student", "direct-lora", k) for k in FIDELITY] +
            [beats("student", b, "subject_acc") for b in ("direct-full", "augment")],
            {f"{model}.subject_acc": m(model, "subject_acc") for model in ("student", *BASELINES)})
    verdict("c", "the student matches or beats its teacher on subject fidelity (weak-to-strong)",
            [at_least("student", "teacher", k) for k in FIDELITY],
            {f"{model}.{k}": m(model, k) for model in ("teacher", "student") for k in FIDELITY})
    tv = {model: [v[model] for v in variance.values() if model in v] for model in ("teacher", "student")}
    have = tv["teacher"] and tv["student"]
    verdict("d", "the student's feature variance is lower than the teacher's (paper: 336.53 -> 239.14)",
            [float(np.mean(tv["student"])) < float(np.mean(tv["teacher"]))] if have else [None],
            {f"{model}.total_variance": float(np.mean(v)) if v else None for model, v in tv.items()})
    verdict("e", "the proxy student keeps editability where tuning on the references loses it (paper: augmentation "
                 "overfits and loses editability)",
            [beats("student", b, k) for b in BASELINES for k in ("prompt_acc", "subject_prompt_acc")],
            {f"{model}.{k}": m(model, k) for model in ("student", *BASELINES) for k in ("prompt_acc", "subject_prompt_acc")})
    return out


def render(data: dict, found: list[dict]) -> str:
    table = data["metrics"]
    models = []
    for t in table.values():
        models += [k for k in t if k not in models]
    order = [m for m in ("base-teacher", "teacher", "base-student", "student", *BASELINES) if m in models]
    order += sorted(m for m in models if m not in order)
    lines = ["| subject | model | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]

    def cell(v: dict | None) -> str:
        return "-" if v is None else f"{v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"

    for subject, t in sorted(table.items()):
        for model in order:
            if model in t:
                lines.append(f"| {subject} | {model} | " + " | ".join(cell(t[model].get(k)) for k in METRICS) + " |")
    for model in order:
        lines.append(f"| **mean** | {model} | " + " | ".join(cell(mean_row(table, model, k)) for k in METRICS) + " |")
    for metric in ("subject_acc", "prompt_acc", "subject_prompt_acc"):  # the oracle's scores, a column per model
        if any(metric in t.get(model, {}) for t in table.values() for model in order):
            lines += ["", f"{metric} | " + " | ".join(order) + " |", "|---|" + "---|" * len(order)]
            lines[-2] = "| " + lines[-2]
            rows = [(subject, {model: t.get(model, {}).get(metric) for model in order}) for subject, t in sorted(table.items())]
            rows.append(("**mean**", {model: mean_row(table, model, metric) for model in order}))
            for subject, cells in rows:
                lines.append(f"| {subject} | " + " | ".join(cell(cells[model]) for model in order) + " |")
    if data["variance"]:
        lines += ["", "| subject | teacher total variance | student total variance |", "|---|---|---|"]
        for subject, v in sorted(data["variance"].items()):
            lines.append(f"| {subject} | {v.get('teacher', float('nan')):.2f} | {v.get('student', float('nan')):.2f} |")
    lines += ["", "| claim | verdict | numbers |", "|---|---|---|"]
    for c in found:
        nums = ", ".join(f"{k}={v:.3f}" for k, v in c["numbers"].items() if v is not None)
        lines.append(f"| ({c['claim']}) {c['text']} | **{c['verdict']}** | {nums} |")
    return "\n".join(lines) + "\n"


# -- proxy count and curation (issue 29 item 5) ----------------------------------------------------------
def curation_keys(proxies: int, over_generate: int) -> dict:
    """The synthesis keys of curation: generate `over_generate` x `proxies` and keep the `proxies` most faithful
    (synthesis.fidelity.keep, issue 29 item 2; the proxies are ranked by synthesis.fidelity.metric)."""
    return {"num_images": proxies * over_generate, "fidelity": {"keep": proxies}}


def experiment_name(base: str, proxies: int, curated: bool, default_proxies: int) -> str:
    """toy-bench, toy-bench-p1000, toy-bench-curated, toy-bench-p1000-curated."""
    return base + (f"-p{proxies}" if proxies != default_proxies else "") + ("-curated" if curated else "")


def seeded_base(name: str, seed: int | None, spec_seed: int) -> str:
    """The experiments' base name for another spec seed (a replication): toy-bench-s1; the spec's seed: toy-bench."""
    return name if seed is None or seed == spec_seed else f"{name}-s{seed}"


def seeds_in(project: Path, name: str, spec_seed: int) -> list[int]:
    """The spec's seed and every other seed with experiments of this benchmark in the project, ascending."""
    found = {spec_seed}
    pattern = re.compile(rf"^{re.escape(name)}-s(\d+)(-p\d+)?(-curated)?$")
    for folder in (project / "runs").glob(f"{name}-s*"):
        match = pattern.match(folder.name)
        if match and folder.is_dir():
            found.add(int(match.group(1)))
    return sorted(found)


STEPS_VARIANT = "steps"  # the student variant steps1200 trains 1200 steps on its experiment's proxies


def steps_variant(steps: int) -> str:
    return f"{STEPS_VARIANT}{steps}"


def derived_spec(spec: dict, proxies: int, curated: bool, over_generate: int, method_only: bool = False,
                 seed: int | None = None, student_steps: tuple[int, ...] = ()) -> dict:
    """The benchmark spec with `proxies` per subject, curated or not, as an experiment of its own. `method_only`
    drops the baselines (student variants) and the variance samples: the matrix reads the student alone.
    `seed` replicates the whole method (teacher, proxies, student, evaluation samples) with another spec seed.
    `student_steps` adds a student variant per count that trains that many steps on the same teacher's proxies."""
    out = json.loads(json.dumps(spec))
    if method_only:
        out["student"].pop("variants", None)
        out["evaluation"]["variance_samples"] = 0
    for steps in student_steps:
        out["student"].setdefault("variants", {})[steps_variant(steps)] = {"steps": steps}
    default = spec["synthesis"]["num_images"]
    if seed is not None:
        out["seed"] = seed
    out["name"] = experiment_name(seeded_base(spec["name"], seed, spec.get("seed", 0)), proxies, curated, default)
    out["synthesis"]["num_images"] = proxies
    if curated:
        out["synthesis"].update(curation_keys(proxies, over_generate))
    return out


ROWS_METRICS = ("subject_acc", "subject_prompt_acc")


def matrix(project: Path, base: str, default_proxies: int, counts: tuple[int, ...] = (128, 1000),
           seed: int | None = None) -> list[dict]:
    """One row per (proxy count, curation) whose experiment has outputs: the student's mean over subjects."""
    rows = []
    for proxies in counts:
        for curated in (False, True):
            name = experiment_name(base, proxies, curated, default_proxies)
            table = collect(project, name)["metrics"]
            row = {"seed": seed, "proxies": proxies, "curated": curated, "experiment": name, "subjects": len(table)}
            row.update({metric: mean_row(table, "student", metric) for metric in ROWS_METRICS})
            rows.append(row)
    return rows


def curation_verdicts(rows: list[dict]) -> list[dict]:
    """Per proxy count and metric: what curation changed (curated - plain means) and whether it is clear of
    the noise (the intervals over subjects do not overlap)."""
    out = []
    by_key = {(r.get("seed"), r["proxies"], r["curated"]): r for r in rows}
    for seed, proxies in sorted({(r.get("seed"), r["proxies"]) for r in rows}, key=lambda k: (k[0] or 0, k[1])):
        plain, curated = by_key.get((seed, proxies, False)), by_key.get((seed, proxies, True))
        for metric in ROWS_METRICS:
            a, b = (plain or {}).get(metric), (curated or {}).get(metric)
            if a is None or b is None:
                out.append({"seed": seed, "proxies": proxies, "metric": metric, "verdict": "not measured", "change": None})
                continue
            change = b["mean"] - a["mean"]
            if min(plain["subjects"], curated["subjects"]) < 2:  # a bootstrap over one subject has no width
                out.append({"seed": seed, "proxies": proxies, "metric": metric, "change": change,
                            "verdict": "one subject: no interval over subjects (read the paired comparison)"})
                continue
            clear = b["ci95"][0] > a["ci95"][1] or b["ci95"][1] < a["ci95"][0]
            verdict = ("helps" if change > 0 else "hurts") if clear else "no clear change (intervals overlap)"
            out.append({"seed": seed, "proxies": proxies, "metric": metric, "verdict": verdict, "change": change})
    return out


def comparisons(counts: tuple[int, ...]) -> list[tuple[str, tuple[int, bool], tuple[int, bool]]]:
    """The paired comparisons of the matrix, (label, (proxies, curated) of A, of B) read as B - A: curation at
    each proxy count, then more proxies with and without curation."""
    out = [(f"curated - plain, {n}", (n, False), (n, True)) for n in counts]
    for a, b in zip(counts, counts[1:]):
        out += [(f"{b} - {a}, plain", (a, False), (b, False)), (f"{b} - {a}, curated", (a, True), (b, True))]
    return out


def paired(project: Path, bases: dict[str, int | None], label: str, a: tuple[int, bool], b: tuple[int, bool],
           default_proxies: int, seed: int = 0, resamples: int = 2000) -> list[dict]:
    """Per subject (and spec seed), and pooled, the student's score in experiment B minus A, prompt by prompt.
    Under one spec seed every experiment samples the same evaluation prompts with the same seeds, from students of
    the same teacher, so the per-prompt differences are paired; the interval is a bootstrap over prompts (pooled:
    over every subject's and every seed's prompts). `bases`: each base name -> its spec seed."""
    pairs = [(*(experiment_name(base, n, c, default_proxies) for n, c in (a, b)), spec_seed)
             for base, spec_seed in bases.items()]
    return paired_runs(project, pairs, label, seed, resamples)


def paired_runs(project: Path, pairs: list[tuple[str, str, int | None]], label: str, seed: int = 0,
                resamples: int = 2000) -> list[dict]:
    """`paired` over run folders: each (A, B, spec seed) is two folders under runs/ (an experiment, or an
    experiment's variant EXP--NAME) whose students were evaluated on the same prompts."""
    out, pooled = [], {metric: [] for metric in ROWS_METRICS}

    def interval(diffs: list[float]) -> list[float]:  # _bootstrap seeds a generator each call: same data, same interval
        return list(_bootstrap(diffs, seed, resamples))

    for a_name, b_name, spec_seed in pairs:
        for b_path in sorted((project / "runs" / b_name).glob("*/eval/per_prompt.json")):
            subject = b_path.parent.parent.name
            a_path = project / "runs" / a_name / subject / "eval" / "per_prompt.json"
            if not a_path.exists():
                continue
            before, after = (json.loads(p.read_text())["student"] for p in (a_path, b_path))
            if [r["prompt"] for r in before] != [r["prompt"] for r in after]:
                raise SystemExit(f"{a_path} and {b_path} score other prompts: not paired")
            row = {"comparison": label, "subject": subject, "seed": spec_seed, "prompts": len(before)}
            for metric in ROWS_METRICS:
                diffs = [y[metric] - x[metric] for x, y in zip(before, after)]
                pooled[metric] += diffs
                row[metric] = {"change": float(np.mean(diffs)), "ci95": interval(diffs)}
            out.append(row)
    if len(out) > 1:
        row = {"comparison": label, "subject": "all (pooled prompts)", "seed": None, "prompts": len(pooled[ROWS_METRICS[0]])}
        row.update({m: {"change": float(np.mean(d)), "ci95": interval(d)} for m, d in pooled.items()})
        out.append(row)
    return out


def steps_comparisons(project: Path, bases: dict[str, int | None], default_proxies: int, default_steps: int,
                      counts: tuple[int, ...] = (128, 1000)) -> list[dict]:
    """Paired rows for every student-steps variant in the project (--student-steps): the variant's student minus
    the experiment's own (default_steps), at each proxy count and curation, pooled over subjects and seeds."""
    found: dict[tuple[int, bool, int], list[tuple[str, str, int | None]]] = {}  # (proxies, curated, steps) -> pairs
    for base, spec_seed in bases.items():
        for proxies in counts:
            for curated in (False, True):
                name = experiment_name(base, proxies, curated, default_proxies)
                prefix = f"{name}--{STEPS_VARIANT}"
                for folder in (project / "runs").glob(f"{prefix}*"):
                    steps = folder.name[len(prefix):]
                    if steps.isdigit() and folder.is_dir():
                        found.setdefault((proxies, curated, int(steps)), []).append((name, folder.name, spec_seed))
    rows = []
    for (proxies, curated, steps), pairs in sorted(found.items()):
        label = f"{steps} - {default_steps} student steps, {proxies} {'curated' if curated else 'plain'}"
        rows += paired_runs(project, pairs, label)
    return rows


def render_paired(rows: list[dict]) -> str:
    def cell(v: dict) -> str:
        lo, hi = v["ci95"]
        clear = " (clear)" if lo > 0 or hi < 0 else ""
        return f"{v['change']:+.3f} [{lo:+.3f}, {hi:+.3f}]{clear}"

    def who(r: dict) -> str:
        return r["subject"] + ("" if r.get("seed") is None else f" (seed {r['seed']})")

    lines = ["| comparison | subject | prompts | change: subject acc. | subject+prompt acc. |", "|---|---|---|---|---|"]
    lines += [f"| {r['comparison']} | {who(r)} | {r['prompts']} | " + " | ".join(cell(r[m]) for m in ROWS_METRICS) + " |"
              for r in rows]
    lines += ["", "Paired by prompt and seed; 95% bootstrap over prompts; 'clear' when the interval excludes 0."]
    return "\n".join(lines) + "\n"


def per_subject(project: Path, base: str, default_proxies: int, counts: tuple[int, ...] = (128, 1000),
                seed: int | None = None) -> list[dict]:
    """Per subject and (proxy count, curation): the share of the kept proxies the oracle accepts (the synthesis
    stage's proxy_metrics.json), the teacher's and the student's subject accuracy and the student's
    subject+prompt accuracy, each with its evaluation's interval."""
    rows = []
    for proxies in counts:
        for curated in (False, True):
            name = experiment_name(base, proxies, curated, default_proxies)
            for subject, models in sorted(collect(project, name)["metrics"].items()):
                proxy_path = project / "runs" / name / subject / "proxy_metrics.json"
                kept = json.loads(proxy_path.read_text()).get("kept_scores", {}) if proxy_path.exists() else {}
                rows.append({"subject": subject, "seed": seed, "proxies": proxies, "curated": curated,
                             "faithful_kept": kept.get("judge_share"),
                             "teacher_subject_acc": models.get("teacher", {}).get("subject_acc"),
                             **{m: models.get("student", {}).get(m) for m in ROWS_METRICS}})
    return rows


def render_per_subject(rows: list[dict]) -> str:
    def cell(v: dict | None) -> str:
        return "-" if v is None else f"{v['mean']:.2f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]"

    lines = ["| subject | seed | proxies | curation | proxies the oracle accepts | teacher subject acc. | student subject acc. "
             "| student subject+prompt acc. |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["subject"], r.get("seed") or 0, r["proxies"], r["curated"])):
        share = "-" if r["faithful_kept"] is None else f"{r['faithful_kept']:.0%}"
        seed = "-" if r.get("seed") is None else r["seed"]
        lines.append(f"| {r['subject']} | {seed} | {r['proxies']} | {'curated' if r['curated'] else 'none'} | {share} | "
                     f"{cell(r['teacher_subject_acc'])} | " + " | ".join(cell(r[m]) for m in ROWS_METRICS) + " |")
    return "\n".join(lines) + "\n"


def render_matrix(rows: list[dict], verdicts: list[dict]) -> str:
    def cell(v: dict | None) -> str:
        return "-" if v is None else f"{v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"

    lines = ["| proxies | curation | experiment | subjects | student subject acc. | student subject+prompt acc. |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['proxies']} | {'curated' if r['curated'] else 'none'} | {r['experiment']} | {r['subjects']} | "
                     + " | ".join(cell(r[m]) for m in ROWS_METRICS) + " |")
    lines += ["", "| seed | proxies | metric | curation | change |", "|---|---|---|---|---|"]
    for v in verdicts:
        change = "-" if v["change"] is None else f"{v['change']:+.3f}"
        seed = "-" if v.get("seed") is None else v["seed"]
        lines.append(f"| {seed} | {v['proxies']} | {v['metric']} | **{v['verdict']}** | {change} |")
    lines += ["", "Means over subjects [95% bootstrap interval over subjects]; 'clear' means the two intervals do not overlap."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, required=True, help="Project folder (created if missing).")
    parser.add_argument("--spec", type=Path, default=REPO / "specs" / "toy-bench.yaml")
    parser.add_argument("--subject", action="append", default=[], help="Only these subjects (repeatable).")
    parser.add_argument("--no-apply", action="store_true", help="Summarise the outputs already in --project.")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="apply's executor: ray runs two 1-thread stages at once on 2 cores (the README's run).")
    parser.add_argument("--json", type=Path, help="Also write the numbers and verdicts here.")
    parser.add_argument("--proxies", type=int, help="Proxies per subject (default: the spec's synthesis.num_images; "
                                                      "the paper: 1000); another count runs as experiment NAME-pN.")
    parser.add_argument("--curate", action="store_true", help="Curate: generate --over-generate x --proxies, keep the "
                                                              "most faithful (experiment NAME[-pN]-curated).")
    parser.add_argument("--over-generate", type=int, default=2, help="With --curate: proxies generated per proxy kept.")
    parser.add_argument("--method-only", action="store_true", help="Only the proxy-tuned student (no baselines, no "
                                                                   "variance samples): what --matrix needs, at a fraction of the cost.")
    parser.add_argument("--seed", type=int, help="Replicate with another spec seed (teacher, proxies, student and "
                                                 "evaluation samples; experiment NAME-sN...). --matrix reads every seed.")
    parser.add_argument("--student-steps", type=int, action="append", default=[],
                        help="Also train a student of N steps on the same proxies (variant stepsN; repeatable); "
                             "--matrix compares it with the spec's steps.")
    parser.add_argument("--matrix", action="store_true", help="Print the (proxy count x curation) table of every such "
                                                              "experiment in --project (128 and 1000 proxies).")
    args = parser.parse_args()
    args.project.mkdir(parents=True, exist_ok=True)
    spec = args.spec.resolve()
    import yaml

    base = yaml.safe_load(spec.read_text())
    default_proxies = base["synthesis"]["num_images"]
    spec_seed = base.get("seed", 0)
    if args.matrix:
        counts = tuple(sorted({default_proxies, 1000}))
        bases = {seeded_base(base["name"], s, spec_seed): s for s in seeds_in(args.project, base["name"], spec_seed)}
        rows = [r for name, s in bases.items() for r in matrix(args.project, name, default_proxies, counts, seed=s)]
        found = curation_verdicts(rows)
        paired_rows = [r for label, a, b in comparisons(counts)
                       for r in paired(args.project, bases, label, a, b, default_proxies)]
        paired_rows += steps_comparisons(args.project, bases, default_proxies, base["student"]["steps"], counts)
        subjects = [r for name, s in bases.items() for r in per_subject(args.project, name, default_proxies, counts, seed=s)]
        print(render_matrix(rows, found))
        if subjects:
            print(render_per_subject(subjects))
        if paired_rows:
            print(render_paired(paired_rows))
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "verdicts": found, "per_subject": subjects,
                                             "paired": paired_rows}, indent=2) + "\n")
        return 0
    if args.proxies is not None or args.curate or args.method_only or args.seed is not None or args.student_steps:
        derived = derived_spec(base, args.proxies or default_proxies, args.curate, args.over_generate, args.method_only,
                               args.seed, tuple(args.student_steps))
        spec = args.project / "specs" / f"{derived['name']}.yaml"
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text(yaml.safe_dump(derived, sort_keys=False))
    if not args.no_apply:
        cmd = [sys.executable, "-m", "proxytune.cli", "apply", str(spec), *[a for s in args.subject for a in ("--subject", s)],
               "--executor", args.executor]
        subprocess.run(cmd, cwd=args.project, check=True)
    experiment = yaml.safe_load(spec.read_text())["name"]
    data = collect(args.project, experiment)
    if not data["metrics"]:
        print(f"no evaluation outputs under {args.project / 'runs'} for {experiment}", file=sys.stderr)
        return 2
    found = claims(data)
    print(render(data, found))
    if args.json:
        args.json.write_text(json.dumps({**data, "claims": found}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
