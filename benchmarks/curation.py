"""Does curation help? The toy world's oracle, which is independent of DINO and CLIP, judges (issue 29 item 2).

For each toy subject: the toy teacher recipe of specs/toy.yaml (300-step UNet LoRA), `--generated` proxies,
every one scored by the synthesis stage (toy-dino, toy-clip, the oracle), then the oracle's share of proxies
showing the whole subject among all generated and among the `--keep` that curation keeps: by DINO, by CLIP-I,
by DINO with the diversity term, and (as a check) the first `--keep` in generation order. The stage functions
run in-process in a project folder (`--project`, kept: a re-run reuses its teachers and proxy pools).

    python benchmarks/curation.py --project /tmp/curation --subjects dotty-ball spotted-can --generated 64 --keep 32

`--style outline` instead checks the style scores that rank a style's curated pairs (no training): the same 100
toy pictures rendered plain and in the style, scored against the style's references with toy-clip / toy-dino;
curation compares images drawn for one prompt, so the paired figure (styled beats plain for the same picture)
is the one that matters.

    python benchmarks/curation.py --style outline
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import prepare_env  # noqa: E402

import numpy as np  # noqa: E402

TEACHER = {"model": "toy-sd", "resolution": 64, "lora": {"rank": 8, "alpha": 8}, "steps": 300, "batch_size": 4,
           "learning_rate": 1.0e-3, "checkpoint_every": 100}  # specs/toy.yaml's
DIVERSITY = 0.3


def wilson(hits: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion."""
    z, p = 1.96, hits / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def run_subject(project: Path, subject: str, generated: int, keep: int) -> dict:
    from proxytune.project import resolve_spec, write_compiled
    from proxytune.stages import synthesis, teacher
    from proxytune.stages.params import load_params

    import yaml

    spec = {"name": "curation", "seed": 0, "subjects": [{"name": subject, "images": f"toyworld:{subject}"}],
            "teacher": TEACHER,
            "synthesis": {"num_images": generated, "num_inference_steps": 25, "guidance_scale": 5.0, "batch_size": 32,
                          "fidelity": {"keep": keep}},
            "student": {"model": "toy-llamagen"},
            "evaluation": {"prompts": "toyworld", "clip_model": "toy-clip", "dino_model": "toy-dino"}}
    path = project / "specs" / f"curation-{subject}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    spec["name"] = f"curation-{subject}"
    path.write_text(yaml.safe_dump(spec))
    write_compiled([resolve_spec(path, project)], project)
    params = load_params(project / "runs" / spec["name"] / subject / "params.yaml")
    start = time.time()
    if not (params.out("teacher") / "record.json").exists():
        teacher.run(params.path)
    trained = time.time()
    synthesis.run(params.path)
    done = time.time()
    return {"params": params, "teacher_s": trained - start, "synthesis_s": done - trained}


def analyse(params, keep: int) -> dict:
    import numpy as np
    from safetensors.torch import load_file

    from proxytune.stages import proxy_scores

    manifest = json.loads((params.out("proxy") / "manifest.json").read_text())
    every = sorted(manifest["images"] + manifest["dropped_images"], key=lambda e: e["seed"])
    oracle = np.array([e["oracle"] for e in every])
    scores = {m: np.array([e[m] for e in every]) for m in ("dino", "clip_i")}
    (pool,) = [p for p in params.work("synthesis").iterdir() if p.is_dir()]
    (cache,) = pool.glob("embeds-*.safetensors")
    embeds = load_file(cache)
    picks = {
        "all generated": list(range(len(every))),
        "first N (no curation)": list(range(keep)),
        "top N by DINO": proxy_scores.pick(scores["dino"], embeds["dino"], keep),
        "top N by CLIP-I": proxy_scores.pick(scores["clip_i"], embeds["clip_i"], keep),
        f"DINO + diversity {DIVERSITY}": proxy_scores.pick(scores["dino"], embeds["dino"], keep, DIVERSITY),
        "bottom N by DINO": sorted(range(len(every)), key=lambda i: (scores["dino"][i], i))[:keep],
        "top N/2 by DINO": proxy_scores.pick(scores["dino"], embeds["dino"], keep // 2),
        "top N/4 by DINO": proxy_scores.pick(scores["dino"], embeds["dino"], keep // 4),
    }
    rows = {}
    for name, index in picks.items():
        hits = int(oracle[index].sum())
        rows[name] = {"n": len(index), "oracle_hits": hits, "share": hits / len(index), "ci95": wilson(hits, len(index)),
                      "dino_mean": float(scores["dino"][index].mean())}
    # rank agreement between each encoder's score and the oracle's verdict (AUC: P(score of a hit > a miss))
    auc = {}
    for metric, values in scores.items():
        hit, miss = values[oracle == 1], values[oracle == 0]
        auc[metric] = float(((hit[:, None] > miss[None, :]).mean() + 0.5 * (hit[:, None] == miss[None, :]).mean())
                            if hit.size and miss.size else float("nan"))
    return {"rows": rows, "auc": auc}


def style_ranking(style: str, n: int = 100, seed: int = 11) -> None:
    """How often each style score ranks a picture's styled render above its plain one (and the AUC over all)."""
    from PIL import Image

    from proxytune.backends import encoders, style_metrics
    from proxytune.toyworld import styles

    clip, dino = encoders.load_clip("toy-clip"), encoders.load_dino("toy-dino")
    refs = style_metrics.reference_embeds(clip, dino, [Image.fromarray(a) for a in styles.reference_images(style)])
    scores = {}
    for label, which in (("styled", style), ("plain", None)):
        images = [Image.fromarray(a) for a in styles.styled_world(n, seed, which)[0]]  # same pictures, same seed
        scores[label] = {"style_gram": (style_metrics.gram_embeds(dino, images) @ refs["gram"].T).mean(dim=1).numpy(),
                         "style_clip": (clip.image_embeds(images) @ refs["clip"].T).mean(dim=1).numpy()}
    print(f"| score | styled > plain, same picture ({n}) | AUC styled vs plain | median styled / plain |")
    print("|---|---|---|---|")
    for metric in ("style_clip", "style_gram"):
        a, b = scores["styled"][metric], scores["plain"][metric]
        print(f"| {metric} | {(a > b).mean():.0%} | {(a[:, None] > b[None, :]).mean():.2f} | "
              f"{float(np.median(a)):.3f} / {float(np.median(b)):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path)
    parser.add_argument("--style", help="check the style scores on this toy style instead (outline, pastel, grain)")
    parser.add_argument("--subjects", nargs="+", default=["dotty-ball", "spotted-can"])
    parser.add_argument("--generated", type=int, default=64)
    parser.add_argument("--keep", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    prepare_env()
    if args.style:
        return style_ranking(args.style)
    if args.project is None:
        parser.error("--project is required (or --style)")
    args.project.mkdir(parents=True, exist_ok=True)
    os.chdir(args.project)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    results = {}
    for subject in args.subjects:
        ran = run_subject(args.project.resolve(), subject, args.generated, args.keep)
        found = analyse(ran["params"], args.keep)
        results[subject] = {**found, "teacher_s": round(ran["teacher_s"]), "synthesis_s": round(ran["synthesis_s"])}
        print(f"\n{subject}: {args.generated} generated, keep {args.keep} (teacher {ran['teacher_s']:.0f} s, "
              f"synthesis + scoring {ran['synthesis_s']:.0f} s); AUC of the oracle's verdict: "
              + ", ".join(f"{m} {v:.2f}" for m, v in found["auc"].items()))
        print("| set | proxies | oracle: whole subject | 95 % interval | mean DINO |")
        print("|---|---|---|---|---|")
        for name, row in found["rows"].items():
            print(f"| {name} | {row['n']} | {row['oracle_hits']} ({row['share']:.0%}) | "
                  f"[{row['ci95'][0]:.0%}, {row['ci95'][1]:.0%}] | {row['dino_mean']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
