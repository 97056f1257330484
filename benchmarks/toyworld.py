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
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
METRICS = ("subject_acc", "prompt_acc", "subject_prompt_acc", "dino", "clip_i", "clip_t")
FIDELITY = ("subject_acc", "dino", "clip_i")
BASELINES = ("direct-lora", "direct-full", "augment")


def collect(project: Path, experiment: str) -> dict:
    """{subject: {model: {metric: {"mean", "ci95"}}}} and variances, from every evaluation output."""
    runs = project / "runs"
    table: dict[str, dict[str, dict]] = {}
    variance: dict[str, dict[str, float]] = {}
    for folder in sorted(runs.glob(f"{experiment}*")):
        if not folder.is_dir():
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, required=True, help="Project folder (created if missing).")
    parser.add_argument("--spec", type=Path, default=REPO / "specs" / "toy-bench.yaml")
    parser.add_argument("--subject", action="append", default=[], help="Only these subjects (repeatable).")
    parser.add_argument("--no-apply", action="store_true", help="Summarise the outputs already in --project.")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="apply's executor: ray runs two 1-thread stages at once on 2 cores (the README's run).")
    parser.add_argument("--json", type=Path, help="Also write the numbers and verdicts here.")
    args = parser.parse_args()
    args.project.mkdir(parents=True, exist_ok=True)
    spec = args.spec.resolve()
    if not args.no_apply:
        cmd = [sys.executable, "-m", "proxytune.cli", "apply", str(spec), *[a for s in args.subject for a in ("--subject", s)],
               "--executor", args.executor]
        subprocess.run(cmd, cwd=args.project, check=True)
    import yaml

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
