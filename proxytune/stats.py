"""Small statistics for evaluation: bootstrap intervals and feature-distribution summaries."""

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
