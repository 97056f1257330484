"""How often each stop rule of `student.proxy_count` grows past a step, on simulated held-out scores.

Not a timing benchmark: it runs the rule itself (`proxytune.stages.proxy_count.next_state`) on simulated
oracle readings (0/1 per image) of two steps scored on the same held-out prompts and seeds, and prints,
per held-out size, prompt spread and seed coupling, the share of trials in which the rule grows:

- with no gain (both steps read the subject with the same probability): growing is a false gain; a
  rule should rarely do it;
- with a real gain (e.g. 0.18 -> 0.30, the toy world's fixed 16 and 128 counts on stripy-box): growing
  is the power to see it.

The model: prompt p reads the subject with probability sigmoid(a_p + b_step), a_p ~ N(logit(base),
spread^2) (some prompts are much harder than others); image k of prompt p is read when u_pk < that
probability, where u_pk is shared by both steps with probability `coupling` (the same seed gives a
similar image) and drawn afresh otherwise.

    python benchmarks/proxy_count_rules.py                       # the default grid, 400 trials each
    python benchmarks/proxy_count_rules.py --trials 1000 --sizes 8x4 8x8 16x4

`--replay` reads instead the held-out images of a toy growth's steps (their eval/ folders, in step
order), scores them again with the toy world's oracle and runs both rules on them, so a growth that
ran under one rule can be read by the other (and one recorded before per-image scores were kept):

    python benchmarks/proxy_count_rules.py --replay runs/toy-count--grow-16/stripy-box/eval \
        runs/toy-count--grow-32/stripy-box/eval
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from proxytune import stats
from proxytune.outputs import CountState, StepScore
from proxytune.stages.proxy_count import next_state


def logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def simulate(rng, prompts: int, k: int, base: float, gain: float, spread: float, coupling: float):
    """(before, after): (prompts * k,) 0/1 readings of two steps, prompt-major."""
    a = rng.normal(logit(base), spread, size=(prompts, 1))
    b0, b1 = _shift_for(a, base), _shift_for(a, base + gain)  # this prompt mix reads `base`, then `base + gain`
    u = rng.random((prompts, k))
    fresh = np.where(rng.random((prompts, k)) < coupling, u, rng.random((prompts, k)))
    before = (u < 1 / (1 + np.exp(-(a + b0)))).astype(float)
    after = (fresh < 1 / (1 + np.exp(-(a + b1)))).astype(float)
    return before.ravel(), after.ravel()


def _shift_for(a: np.ndarray, target: float) -> float:
    """b with mean(sigmoid(a + b)) = target (bisection): the prompt mix's average reading hits `target`."""
    low, high = -20.0, 20.0
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if np.mean(1 / (1 + np.exp(-(a + mid)))) < target else (low, mid)
    return (low + high) / 2


def step(count: int, values: np.ndarray, prompts: list[str], k: int, resamples: int) -> StepScore:
    low, high = stats.cluster_bootstrap_ci(values, stats.prompt_clusters(values.size, k), resamples, 0)
    return StepScore(count=count, used=count, mean=float(values.mean()), ci95=[low, high], prompts=prompts, seed=0,
                     images_per_prompt=k, scores=values.tolist())


def grows(rule: str, before: StepScore, after: StepScore, resamples: int) -> bool:
    state = CountState(metric="subject_acc", available=10**6, stop_when=rule, steps=[before])
    return next_state(state, after, resamples, 0).stopped is None


def replay(eval_dirs: list[str], resamples: int) -> None:
    """Both rules on the recorded held-out images of a toy growth's steps (eval/ folders, in step order)."""
    import yaml
    from PIL import Image

    from proxytune.toyworld.judges import oracle_reader, oracle_scores
    from proxytune.toyworld.subjects import SUBJECTS

    reader, steps = oracle_reader(), []
    for folder in map(Path, eval_dirs):
        params = yaml.safe_load((folder.parent / "params.yaml").read_text())
        held_out, subject = params["evaluation"], params["subject"]
        prompts = json.loads((folder / "prompts.json").read_text())
        k = held_out["images_per_prompt"]
        images = [[Image.open(folder / "images" / "student" / f"p{p:02d}_k{j}.png").convert("RGB") for j in range(k)]
                  for p in range(len(prompts))]
        values = np.asarray(oracle_scores(reader, images, prompts, subject["token"], SUBJECTS[subject["name"]])
                            ["subject_acc"], dtype=np.float64)
        low, high = stats.cluster_bootstrap_ci(values, stats.prompt_clusters(values.size, k), resamples, held_out["seed"])
        count = params["student"]["num_proxy_images"]
        steps.append(StepScore(count=count, used=count, mean=float(values.mean()), ci95=[low, high], prompts=prompts,
                               seed=held_out["seed"], images_per_prompt=k, scores=values.tolist()))
        print(f"{count} proxies: subject_acc {values.mean():.4f} [{low:.4f}, {high:.4f}]; read as the subject: "
              f"{', '.join(f'p{i // k} k{i % k}' for i in np.flatnonzero(values == 1)) or 'none'}")
    for rule in ("paired", "plateau"):
        state = CountState(metric="subject_acc", available=10**6, stop_when=rule)
        for step in steps:
            if state.stopped is None:
                state = next_state(state, step, resamples, step.seed)
        print(f"{rule} rule -> {state.stopped or 'still growing'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (evaluation's default)")
    parser.add_argument("--sizes", nargs="+", default=["8x4", "8x8", "16x4"], help="held-out PROMPTSxIMAGES")
    parser.add_argument("--base", type=float, default=0.18, help="the smaller step's mean reading")
    parser.add_argument("--gains", type=float, nargs="+", default=[0.0, 0.12])
    parser.add_argument("--spreads", type=float, nargs="+", default=[0.5, 1.5], help="sd of the prompts' logits")
    parser.add_argument("--couplings", type=float, nargs="+", default=[0.0, 0.5, 0.9])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replay", nargs="+", metavar="EVAL_DIR", help="a toy growth's steps' eval/ folders, in order")
    args = parser.parse_args()
    if args.replay:
        replay(args.replay, args.resamples)
        return
    rng = np.random.default_rng(args.seed)
    print(f"share of {args.trials} trials that grow (base {args.base}; gain 0: false growth, else power)")
    print("| held-out | gain | prompt spread | seed coupling | plateau | paired |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        n_prompts, k = (int(x) for x in size.split("x"))
        prompts = [f"p{i}" for i in range(n_prompts)]
        for gain in args.gains:
            for spread in args.spreads:
                for coupling in args.couplings:
                    counts = {"plateau": 0, "paired": 0}
                    for _ in range(args.trials):
                        before, after = simulate(rng, n_prompts, k, args.base, gain, spread, coupling)
                        first, second = (step(n, v, prompts, k, args.resamples) for n, v in ((16, before), (32, after)))
                        for rule in counts:
                            counts[rule] += grows(rule, first, second, args.resamples)
                    print(f"| {size} | {gain:+.2f} | {spread} | {coupling} | {counts['plateau'] / args.trials:.3f} | "
                          f"{counts['paired'] / args.trials:.3f} |", flush=True)


if __name__ == "__main__":
    main()
