"""The report's style sections (issue 15): metrics of the style teacher and student, and per prompt a row
reference | curated (the style teacher's image of the prompt) | student, read from runs/EXPERIMENT/STYLE/.
`proxytune.report` calls these; the helpers (escaping, thumbnails, intervals) are its own."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from proxytune import layout
from proxytune.errors import ProxytuneError

LABELS = {"style_clip": "style CLIP", "style_gram": "style Gram", "clip_t": "CLIP-T", "leakage": "leakage (CLIP)",
          "content_dino": "content (DINO)", "style_acc": "style acc. (detector)", "prompt_acc": "prompt acc. (oracle)",
          "content_leak": "content leak (oracle)"}


@dataclass
class StyleResult:
    name: str
    folder: Path
    reference_files: list[Path]
    metrics: dict
    prompts: list[str]
    encoders: dict
    records: dict[str, dict | None]  # teacher, curated, student, eval
    images: dict[str, dict[int, list[Path]]]  # model folder -> prompt index -> files

    @property
    def random_init(self) -> bool:
        return bool(self.metrics.get("random_init"))

    @property
    def columns(self) -> list[str]:
        shown = {m for values in self.metrics["models"].values() for m in values}
        return [m for m in LABELS if m in shown]


def _json(path: Path, required: bool = True):
    if not path.exists():
        if required:
            raise ProxytuneError(f"{path}: missing; run `proxytune apply` on the spec first")
        return None
    return json.loads(path.read_text())


def load_style(root: Path, experiment: str, name: str) -> StyleResult:
    """One style's evaluation, records and images.

    Raises:
        ProxytuneError: the style has not been evaluated yet.
    """
    from proxytune.images import list_images
    from proxytune.report import IMAGE_NAME

    folder = root / layout.subject_dir(experiment, name)
    eval_dir = folder / layout.OUT_DIRS["style_evaluate"]
    import yaml

    params_file = folder / "params.yaml"
    source = (yaml.safe_load(params_file.read_text()) or {}).get("source", {}) if params_file.exists() else {}
    refs = (root / source["references"]) if source.get("references") else None
    try:
        reference_files = list_images(refs) if refs is not None else []
    except ProxytuneError:
        reference_files = []
    images: dict[str, dict[int, list[Path]]] = {}
    for model_dir in sorted((eval_dir / "images").glob("*")) if (eval_dir / "images").is_dir() else []:
        for path in sorted(model_dir.glob("*.png")):
            match = IMAGE_NAME.match(path.name)
            if match:
                images.setdefault(model_dir.name, {}).setdefault(int(match.group(1)), []).append(path)
    records = {step: _json(folder / out / "record.json", required=False)
               for step, out in (("teacher", "teacher"), ("curated", "curated"), ("student", "student"), ("eval", "eval"))}
    return StyleResult(name=name, folder=folder, reference_files=reference_files,
                       metrics=_json(eval_dir / "metrics.json"), prompts=_json(eval_dir / "prompts.json"),
                       encoders=_json(eval_dir / "encoders.json", required=False) or {}, records=records, images=images)


def _lineage(style: StyleResult) -> list[tuple[str, str, str, str]]:
    r = style.records
    rows = []
    if r.get("teacher"):
        rows.append(("style teacher", f"{r['teacher'].get('model')}@{r['teacher'].get('version')}",
                     str(r["teacher"].get("adapter_digest")), str(r["teacher"].get("run_id"))))
    if r.get("curated"):
        rows.append(("curated set", f"{r['curated'].get('num_images')} stylised + {r['curated'].get('raw_images')} raw pairs",
                     str(r["curated"].get("digest")), str(r["curated"].get("run_id"))))
    if r.get("student"):
        rows.append(("style student", f"{r['student'].get('model')}@{r['student'].get('version')}",
                     str(r["student"].get("adapter_digest")), str(r["student"].get("run_id"))))
    if r.get("eval"):
        rows.append(("evaluation", "metrics", "", str(r["eval"].get("run_id"))))
    return rows


def html_section(style: StyleResult) -> str:
    from proxytune.report import EMPTY_CELL, RANDOM_INIT_BANNER, esc, fmt_ci, thumbnail_uri

    meta, columns = style.metrics, style.columns
    head = "".join(f'<th scope="col">{esc(LABELS[m])}</th>' for m in columns)
    body = "".join(f"<tr><td>{esc(model)}</td>" + "".join(f'<td class="num">{esc(fmt_ci(values.get(m)))}</td>' for m in columns)
                   + "</tr>" for model, values in meta["models"].items())
    descriptions = (style.encoders.get("metrics") or {})
    parts = [f'<section id="style-{esc(style.name)}"><h2>Style {esc(style.name)}</h2>',
             f"<p>{esc(meta.get('prompts'))} prompts × {esc(meta.get('images_per_prompt'))} images per model; content "
             f"caption <q>{esc(style.encoders.get('content') or '(none)')}</q>; student noise_strength "
             f"{esc(style.encoders.get('noise_strength'))}.</p>"]
    if style.random_init:
        parts.append(f'<p class="banner" role="alert">{esc(RANDOM_INIT_BANNER)}</p>')
    parts += ["<h3>Metrics</h3>", f'<table class="summary"><thead><tr><th scope="col">model</th>{head}</tr></thead>'
              f"<tbody>{body}</tbody></table>",
              "<ul>" + "".join(f"<li>{esc(LABELS[m])}: {esc(descriptions.get(m, ''))}</li>" for m in columns) + "</ul>",
              "<h3>Reference | curated (style teacher) | student</h3>"]
    ref = style.reference_files[0] if style.reference_files else None
    ref_cell = f'<img src="{thumbnail_uri(ref, square=True)}" alt="reference">' if ref else EMPTY_CELL
    rows = []
    for i, prompt in enumerate(style.prompts):
        cells = [f"<td>{ref_cell}</td>"]
        for model in ("teacher", "student"):
            files = style.images.get(model, {}).get(i, [])
            cells.append("<td>" + ("".join(f'<img src="{thumbnail_uri(f)}" alt="{esc(f"{model}, prompt {i}, image {k}")}">'
                                           for k, f in enumerate(files)) or EMPTY_CELL) + "</td>")
        rows.append(f'<tr><th scope="row">{i:02d} · {esc(prompt)}</th>{"".join(cells)}</tr>')
    parts.append('<div class="scroll"><table class="grid"><thead><tr><th scope="col">prompt</th><th scope="col">reference'
                 '</th><th scope="col">curated (teacher)</th><th scope="col">student</th></tr></thead>'
                 f'<tbody>{"".join(rows)}</tbody></table></div>')
    lineage = "".join(f'<tr><th scope="row">{esc(a)}</th><td>{esc(b)}</td><td><code>{esc(c)}</code></td>'
                      f"<td><code>{esc(d)}</code></td></tr>" for a, b, c, d in _lineage(style))
    parts += ["<h3>Lineage</h3>", '<table class="lineage"><thead><tr><th scope="col">step</th><th scope="col">what</th>'
              f'<th scope="col">digest (sha256)</th><th scope="col">MLflow run</th></tr></thead><tbody>{lineage}</tbody></table>',
              "</section>"]
    return "\n".join(parts)


def markdown_section(style: StyleResult) -> list[str]:
    from proxytune.report import _md_table, fmt_ci, md

    lines = ["", f"## Style {md(style.name)}", ""]
    lines += _md_table(["model"] + [LABELS[m] for m in style.columns],
                       [[md(model)] + [fmt_ci(values.get(m)) for m in style.columns]
                        for model, values in style.metrics["models"].items()])
    lines += ["", "Lineage:", ""]
    lines += _md_table(["step", "what", "digest", "MLflow run"], [[md(x) for x in row] for row in _lineage(style)])
    return lines
