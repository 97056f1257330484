"""Small statistics for evaluation: bootstrap intervals and feature-distribution summaries.

Evaluation intervals resample prompts, not images (`cluster_bootstrap_ci`): the images of one prompt share
the prompt, so they are not independent draws, and resampling them one by one gives intervals that are
too narrow when prompts differ (on 25 prompts x 4 images with strong per-prompt effects, about half as wide).
"""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no values")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, values.size, size=(resamples, values.size))
    means = values[index].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def cluster_bootstrap_ci(values, clusters, resamples: int = 1000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`, resampling whole clusters with replacement.

    Each resample draws as many clusters as there are, and its statistic is the mean over every value of
    the drawn clusters (a cluster drawn twice counts twice), so clusters of unequal size weigh as they do
    in the plain mean. NaN values are left out; a cluster with none left is dropped.

    Args:
        values: (N,) numbers.
        clusters: (N,) labels; values with the same label are resampled together (e.g. a prompt's images).
    Raises:
        ValueError: no finite value, or values and clusters of different lengths.
    """
    values = np.asarray(values, dtype=np.float64)
    clusters = np.asarray(clusters)
    if values.shape != clusters.shape:
        raise ValueError(f"{values.size} values but {clusters.size} cluster labels")
    keep = ~np.isnan(values)
    if not keep.any():
        raise ValueError("no values")
    labels, inverse = np.unique(clusters[keep], return_inverse=True)
    sums = np.bincount(inverse, weights=values[keep], minlength=labels.size)  # (C,)
    counts = np.bincount(inverse, minlength=labels.size).astype(np.float64)  # (C,)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, labels.size, size=(resamples, labels.size))  # (R, C) drawn cluster ids
    means = sums[index].sum(axis=1) / counts[index].sum(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def prompt_clusters(n_images: int, images_per_prompt: int) -> np.ndarray:
    """(N,) prompt index of each image in prompt-major order (image k of prompt p at p * images_per_prompt + k)."""
    return np.arange(n_images) // images_per_prompt


def prompt_difference_ci(a, b, paired: bool, resamples: int = 1000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of mean(b) - mean(a) from per-prompt means (None entries left out).

    Resampling prompt means with equal weight is the prompt-level (cluster) bootstrap of the image mean
    when every prompt has the same number of images, as in an evaluation. `paired` (the same prompts in
    the same order, e.g. two students evaluated with one protocol) resamples the per-prompt differences;
    otherwise each side's prompts are resampled on their own. None when a side has no value.
    """
    a = np.array([np.nan if v is None else v for v in a], dtype=np.float64)
    b = np.array([np.nan if v is None else v for v in b], dtype=np.float64)
    rng = np.random.default_rng(seed)
    tail = (1.0 - level) / 2 * 100
    if paired:
        d = (b - a)[~np.isnan(b - a)]
        if not d.size:
            return None
        means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    else:
        a, b = a[~np.isnan(a)], b[~np.isnan(b)]
        if not a.size or not b.size:
            return None
        means = (b[rng.integers(0, b.size, size=(resamples, b.size))].mean(axis=1)
                 - a[rng.integers(0, a.size, size=(resamples, a.size))].mean(axis=1))
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def total_variance(features) -> float:
    """Trace of the covariance of (N, D) features: the sum of per-dimension variances (unbiased)."""
    features = np.asarray(features, dtype=np.float64)
    if features.shape[0] < 2:
        raise ValueError("need at least two samples")
    return float(features.var(axis=0, ddof=1).sum())


def centroid_distances(features) -> np.ndarray:
    """L2 distance of each (N, D) feature row to the rows' mean."""
    features = np.asarray(features, dtype=np.float64)
    return np.linalg.norm(features - features.mean(axis=0, keepdims=True), axis=1)
