"""Fidelity of generated training images (issue 29), shared by synthesis (proxies) and curation (stylised pairs).

A stage scores every image it generated against its references, summarises the scores, curates (keeps the N
best, optionally spread out by a maximal-marginal-relevance pick on the same embeddings) and keeps small
thumbnails of the most and least faithful images for the report. Not a stage: the two stages call it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from proxytune.files import write_bytes_atomic, write_png_atomic
from proxytune.images import center_crop_resize, open_rgb

QUANTILES = (0.1, 0.5, 0.9)
EXTREMES = 8  # thumbnails of the most and of the least faithful images kept for the report
THUMB = 96  # pixels


def scoring_inputs(scratch: Path, entries: list[dict], references_dir: Path, evaluation, prefix: str
                   ) -> tuple[list[Path], list[Path], Path]:
    """(the images in `scratch`, the reference files, the embedding cache file): the cache is named by the
    evaluation's encoders and the references' digest, so a change of either embeds again."""
    from proxytune.files import digest_files, sha256_file
    from proxytune.images import list_images
    from proxytune.stages.runtime import config_key

    files = [scratch / Path(e["file"]).name for e in entries]
    reference_files = list_images(references_dir)
    refs_digest = digest_files([(p.name, sha256_file(p)) for p in reference_files])
    return files, reference_files, scratch / f"{prefix}-{config_key(evaluation.dino_model, evaluation.clip_model, refs_digest)}.safetensors"


def cached_embeddings(cache: Path, names: tuple[str, ...], compute) -> dict[str, torch.Tensor]:
    """`compute()` (name -> (N, D) tensor) once: the tensors are kept in `cache` (safetensors) for a re-run,
    e.g. after the curation settings changed, or after a crash."""
    from safetensors.torch import load_file, save

    if cache.exists():
        tensors = load_file(cache)
        if set(names) <= set(tensors):
            return {name: tensors[name] for name in names}
    tensors = compute()
    write_bytes_atomic(cache, save({name: t.contiguous() for name, t in tensors.items()}))
    return tensors


def embed_files(encoder, files: list[Path], batch: int = 32) -> torch.Tensor:
    """(N, D) L2-normalised image embeddings of `files`, read `batch` at a time (a large set never sits in memory)."""
    return torch.cat([encoder.image_embeds([open_rgb(p) for p in files[i : i + batch]]) for i in range(0, len(files), batch)])


def mean_cosine(embeds: torch.Tensor, references: torch.Tensor) -> np.ndarray:
    """(N,) mean cosine of each row to every reference row (rows L2-normalised): DreamBench's per-image CLIP-I / DINO."""
    return (embeds @ references.T).mean(dim=1).numpy().astype(np.float64)


def pick(scores: np.ndarray, embeds: torch.Tensor, keep: int, diversity: float = 0.0) -> list[int]:
    """Indices of the `keep` images to keep, in pick order (most faithful first).

    Greedy maximal marginal relevance: the next pick maximises (1 - w) * score - w * (its largest cosine to an
    image already picked), w = `diversity`; w = 0 ranks by score alone. Ties go to the lower index, so the pick
    is deterministic.

    Args:
        scores: (N,) fidelity of each image.
        embeds: (N, D) L2-normalised embeddings the diversity term compares.
        keep: how many to pick (at most N).
        diversity: w in [0, 1).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if diversity == 0.0:
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:keep]
    similarity = (embeds @ embeds.T).numpy().astype(np.float64)
    closest = np.full(len(scores), -np.inf)  # largest cosine to a picked image
    chosen: list[int] = []
    free = np.ones(len(scores), dtype=bool)
    for _ in range(min(keep, len(scores))):
        penalty = np.where(np.isfinite(closest), closest, 0.0)
        value = np.where(free, (1 - diversity) * scores - diversity * penalty, -np.inf)
        best = int(np.argmax(value))  # the first maximum: the lowest index wins a tie
        chosen.append(best)
        free[best] = False
        closest = np.maximum(closest, similarity[best])
    return chosen


def summary(values: np.ndarray, threshold: float, judge: np.ndarray | None = None) -> dict:
    """count, mean, q10 / q50 / q90, share above `threshold`, and the judge's share (oracle or detector: 0/1)."""
    values = np.asarray(values, dtype=np.float64)
    out = {"count": int(values.size), "mean": float(values.mean()),
           **{f"q{round(q * 100)}": float(np.quantile(values, q)) for q in QUANTILES},
           "share_above": float((values > threshold).mean())}
    if judge is not None:
        out["judge_share"] = float(np.asarray(judge, dtype=np.float64).mean())
    return out


def write_extremes(folder: Path, files: list[Path], scores: np.ndarray, kept: set[int], judge: np.ndarray | None,
                   sources: list[str]) -> dict[str, list[dict]]:
    """Thumbnails (fidelity/most-NN.png, least-NN.png) of the EXTREMES most and least faithful images, and their
    entries {file, source, score, kept, judge?}: the report's grids, without keeping the dropped images."""
    (folder / "fidelity").mkdir(parents=True, exist_ok=True)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    chosen = {"most": order[:EXTREMES], "least": order[::-1][:EXTREMES]}
    out: dict[str, list[dict]] = {}
    for kind, indices in chosen.items():
        out[kind] = []
        for rank, i in enumerate(indices):
            name = f"fidelity/{kind}-{rank:02d}.png"
            write_png_atomic(folder / name, center_crop_resize(open_rgb(files[i]), THUMB))
            entry = {"file": name, "source": sources[i], "score": round(float(scores[i]), 6), "kept": i in kept}
            if judge is not None:
                entry["judge"] = float(judge[i])
            out[kind].append(entry)
    return out


def fidelity_record(spec, ranking: np.ndarray, order: list[int], judge: np.ndarray | None, encoders: dict[str, str],
                    judge_text: str) -> dict:
    """A manifest's `fidelity` (outputs.Fidelity, without the thumbnails) for a scored set.

    Args:
        spec: the fidelity section that ran (synthesis.fidelity or styles[i].fidelity).
        ranking: (N,) every generated image's ranking score, generation order.
        order: generation indices of the kept images, in manifest order.
        judge: (N,) the toy judge's 0/1 per image, or None.
        encoders: role -> model reference.
        judge_text: what the judge's 1 means.
    """
    return {
        "metric": spec.metric, "threshold": spec.threshold, "min_share": spec.min_share, "keep": spec.keep,
        "diversity": spec.diversity, "encoders": encoders, "judge": judge_text if judge is not None else None,
        "generated": summary(ranking, spec.threshold, judge),
        "kept": summary(ranking[order], spec.threshold, None if judge is None else judge[order]),
        "scores": [round(float(v), 6) for v in ranking], "kept_index": list(order),
        **({"judged": [float(v) for v in judge]} if judge is not None else {}),
    }


def announce_and_gate(fidelity: dict, *, stage: str, where: str, spec_file: str, judge_words: str) -> None:
    """Print the set's shares in one line; raise when the kept share is under `min_share`.

    Raises:
        ProxytuneError: "SPEC: WHERE.min_share: ..." (one line naming the key and the ways out).
    """
    from tqdm.auto import tqdm

    from proxytune.errors import ProxytuneError

    generated, kept = fidelity["generated"], fidelity["kept"]
    line = (f"{stage}: {fidelity['metric']} above {fidelity['threshold']:g}: {generated['share_above']:.0%} of "
            f"{generated['count']} generated, {kept['share_above']:.0%} of {kept['count']} kept")
    if generated.get("judge_share") is not None:
        line += f"; {judge_words} in {generated['judge_share']:.0%} / {kept['judge_share']:.0%}"
    tqdm.write(line)
    min_share = fidelity["min_share"]
    if min_share is not None and kept["share_above"] < min_share:
        raise ProxytuneError(
            f"{spec_file}: {where}.min_share: {kept['share_above']:.0%} of the kept images score above {where}.threshold "
            f"{fidelity['threshold']:g} on {fidelity['metric']}, below the required {min_share:.0%}; generate more and "
            f"curate ({where}.keep), improve the teacher, or lower min_share / threshold")
