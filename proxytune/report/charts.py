"""The report's pictures, as data: URIs: thumbnails of reference and generated images, and the
feature-variance charts (matplotlib, drawn off-screen)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from proxytune.images import center_crop_resize, open_rgb
from proxytune.outputs import Fidelity, Variance

THUMB = 128  # pixels: generated and reference images are embedded at most this large


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail_uri(path: Path, size: int = THUMB, square: bool = False) -> str:
    """A small embedded copy: PNG when the image already fits (pixels unchanged), else JPEG."""
    image = open_rgb(path)
    buffer = io.BytesIO()
    if max(image.size) <= size and (not square or image.width == image.height):
        image.save(buffer, format="PNG", optimize=True)
        return data_uri(buffer.getvalue(), "image/png")
    if square:
        image = center_crop_resize(image, size)
    else:
        image.thumbnail((size, size))
    image.save(buffer, format="JPEG", quality=88)
    return data_uri(buffer.getvalue(), "image/jpeg")


def _figure_png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _colours(models: list[str]) -> dict[str, str]:
    return {m: f"C{i % 10}" for i, m in enumerate(models)}


def _series_order(variance: Variance, models: list[str]) -> list[str]:
    """The report's model order, then any other model the variance file has."""
    return [m for m in models if m in variance.models] + sorted(set(variance.models) - set(models))


def variance_chart(variance: Variance, models: list[str]) -> bytes:
    """PNG bar chart of the total feature variance per model."""
    from matplotlib.figure import Figure

    names = _series_order(variance, models)
    values = [variance.models[m].total_variance for m in names]
    colours = _colours(names)
    fig = Figure(figsize=(4.8, 3.2), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.bar(names, values, color=[colours[m] for m in names])
    ax.bar_label(bars, labels=[f"{v:.4g}" for v in values], padding=2)
    ax.set_ylabel("total feature variance")
    ax.set_title(f"feature variance ({variance.samples} samples)")
    ax.margins(y=0.15)
    return _figure_png(fig)


def distance_histogram(variance: Variance, models: list[str]) -> bytes | None:
    """PNG histogram of L2 distances to the centroid, one translucent series per model."""
    import numpy as np
    from matplotlib.figure import Figure

    names = _series_order(variance, models)
    series = {m: np.asarray(variance.models[m].distances, dtype=float) for m in names}
    series = {m: v for m, v in series.items() if v.size}
    if not series:
        return None
    everything = np.concatenate(list(series.values()))
    edges = np.histogram_bin_edges(everything, bins=min(30, max(5, everything.size // 4)))
    colours = _colours(names)
    fig = Figure(figsize=(5.6, 3.2), layout="constrained")
    ax = fig.add_subplot()
    for model, values in series.items():
        ax.hist(values, bins=edges, alpha=0.55, color=colours[model], label=f"{model} (n={values.size})")
    ax.set_xlabel("L2 distance to the centroid of the model's samples")
    ax.set_ylabel("samples")
    ax.legend(fontsize="small", framealpha=0.85)
    return _figure_png(fig)


def variance_figures(variance: Variance, models: list[str]) -> tuple[str, str | None]:
    """(bar chart, histogram or None) as PNG data: URIs."""
    hist = distance_histogram(variance, models)
    return (data_uri(variance_chart(variance, models), "image/png"),
            data_uri(hist, "image/png") if hist else None)


def fidelity_histogram(fidelity: Fidelity, label: str) -> bytes | None:
    """PNG histogram of every generated image's ranking score, kept and not kept stacked, the threshold marked."""
    import numpy as np
    from matplotlib.figure import Figure

    scores = np.asarray(fidelity.scores or [], dtype=float)
    if not scores.size:
        return None
    kept = np.zeros(scores.size, dtype=bool)
    kept[[i for i in fidelity.kept_index or [] if 0 <= i < scores.size]] = True
    edges = np.histogram_bin_edges(scores, bins=min(30, max(5, scores.size // 4)))
    fig = Figure(figsize=(4.8, 2.6), layout="constrained")
    ax = fig.add_subplot()
    series = [scores[kept], scores[~kept]]
    names = [f"kept (n={kept.sum()})", f"not kept (n={(~kept).sum()})"]
    ax.hist([v for v in series if v.size], bins=edges, stacked=True, color=["C0", "C7"][: sum(v.size > 0 for v in series)],
            label=[n for n, v in zip(names, series) if v.size])
    judged = np.asarray(fidelity.judged or [], dtype=float)
    if judged.size == scores.size and (judged == 1).any():  # toy world: where the independent judge says yes
        ax.hist(scores[judged == 1], bins=edges, histtype="step", linewidth=1.6, color="C2",
                label=f"toy judge says yes (n={int((judged == 1).sum())})")
    ax.axvline(fidelity.threshold, color="C3", linestyle="--", label=f"threshold {fidelity.threshold:g}")
    ax.set_xlabel(f"{fidelity.metric}: mean cosine to the references")
    ax.set_ylabel(label)
    ax.legend(fontsize="small", framealpha=0.85)
    return _figure_png(fig)


def fidelity_figure(fidelity: Fidelity, label: str = "images") -> str | None:
    """`fidelity_histogram` as a PNG data: URI (None without scores)."""
    png = fidelity_histogram(fidelity, label)
    return data_uri(png, "image/png") if png else None
