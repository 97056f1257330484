"""Curation stage (StyleAR, issue 15): the style teacher draws the curated set; raw pairs go beside it.

The teacher stage has bound "a {class} in {token} style" to the style's reference images (a DreamBooth
LoRA). Here the tuned teacher draws, for each curation prompt P (`style.prompts`) and k <
`style.images_per_prompt`, the image of "P, in {token} style" (spec.style.STYLE_CURATION_PROMPT); image
i gets seed `synthesis.seed + i` and batches are fixed blocks of indices, so a re-run or a resumed run
gives the same files. Only (P, image) pairs are kept: the caption the student trains on is P without the
identifier, and no reference image is part of a training example (StyleAR's binary text-image data).

Raw pairs (`style.raw`), which the student mixes with the curated ones (raw:stylised = `raw.ratio`), are
gathered here too, so that the student depends on this one folder: copied from a captioned folder, or
rendered from the toy world (deterministic in `raw.seed`).

Why a style LoRA and not IP-Adapter or shared attention: it works for every teacher family proxytune
trains (SD 1.x/2.x, SDXL, SD3, FLUX, the tiny and toy pipelines) through the existing teacher stage,
while an IP-Adapter needs image-projection weights trained for each base model (none exist for the tiny
or toy pipelines) and StyleAligned-style shared attention needs an attention processor written for each
denoiser architecture. Either could replace `generate_missing` below: load the
base pipeline, `pipe.load_ip_adapter(...)` + `pipe.set_ip_adapter_scale(...)` and pass the reference as
`ip_adapter_image` (the teacher stage is then skipped), keeping the manifest as it is.

Fidelity (issue 29, `style.fidelity`, on by default): every stylised image is scored against the style
references with the evaluation's encoders (backends/style_metrics.py: style_gram, the Gram matrices of DINO
patch tokens, and style_clip) and, for a toy style, the style detector (0/1, through its world in proxytune.builtins).
Scores and CLIP embeddings are cached beside the images. `style.fidelity.keep` keeps the best N of each
prompt's `images_per_prompt` images by `style.fidelity.metric` (greedy maximal marginal relevance on the CLIP
embeddings with `style.fidelity.diversity`); `style.fidelity.min_share` fails the stage in one line when too
few kept images score above the threshold.

Output folder `curated/`: images/ (stylised, the kept ones: prompt-major, best first within a prompt), raw/,
manifest.json (per image: file, prompt, teacher prompt, seed, sha256, style_clip, style_gram, detected (toy
styles), kept; `dropped_images` the same for the images not kept; `fidelity`: settings, summaries, every
score, thumbnails fidelity/most-NN.png and least-NN.png; the set's digest; the raw pairs with theirs; teacher
version), fidelity/, preview.png, record.json; proxy_metrics.json (DVC metrics) beside it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from proxytune import builtins, faults, layout
from proxytune.backends.teachers import diffusion
from proxytune.errors import ProxytuneError
from proxytune.files import digest_files, link_or_copy, sha256_bytes, sha256_file, staged_dir, write_png_atomic
from proxytune.images import grid, open_rgb
from proxytune.outputs import (CuratedManifest, CurationRecord, FidelityMetrics, RawPairs, TeacherRecord, read_record,
                               write_record)
from proxytune.stages import proxy_scores
from proxytune.spec.style import STYLE_CURATION_PROMPT, captioned_images
from proxytune.stages.params import StageParams, load_params
from proxytune.stages.runtime import config_key, device, generation_dtype, seed_everything, stage_run
from proxytune.stages.sampling import unfinished_blocks

DETECTOR_JUDGE = "the toy world's style detector finds the style (1) or not (0)"


def curation_items(params: StageParams) -> list[tuple[str, str, int]]:
    """(prompt, teacher prompt, seed) of every curated image, prompt-major: image i = prompt i // k, copy i % k."""
    style, k = params.style, params.style.images_per_prompt
    items = []
    for p, prompt in enumerate(style.prompts):
        teacher_prompt = STYLE_CURATION_PROMPT.format(prompt=prompt, token=style.token)
        items += [(prompt, teacher_prompt, params.synthesis.seed + p * k + j) for j in range(k)]
    return items


def pairs_digest(entries: list[dict]) -> str:
    """Digest of a set of pairs: every file's bytes with its caption and seed (order-independent)."""
    return digest_files([(f"{e['file']}\t{e['prompt']}\t{e.get('seed', '')}", e["sha256"]) for e in entries])


@torch.no_grad()
def generate_missing(params: StageParams, teacher_dir: Path, scratch: Path) -> None:
    """Draw every curated image not yet in `scratch` (finished images survive a crash)."""
    synthesis, items = params.synthesis, curation_items(params)
    todo = unfinished_blocks([scratch / f"{i:05d}.png" for i in range(len(items))], synthesis.batch_size)
    if not todo:
        return
    seed_everything(params.seed)
    pipe = diffusion.load_pipeline_with_lora(params.teacher.model, teacher_dir / "adapter",
                                             revision=params.teacher.revision, scale=synthesis.lora_scale,
                                             dtype=generation_dtype(synthesis.dtype), quantize=synthesis.quantize)
    note = diffusion.place_for_generation(pipe, device(), cpu_offload=synthesis.cpu_offload,
                                          vae_tiling=synthesis.vae_tiling)
    if note:
        tqdm.write(note)
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=sum(len(block) for block in todo), desc="curation", unit="img")
    for count, block in enumerate(todo, 1):
        images = diffusion.generate(pipe, [items[i][1] for i in block], [items[i][2] for i in block],
                                    steps=synthesis.num_inference_steps, guidance=synthesis.guidance_scale,
                                    size=params.teacher.resolution)
        for i, image in zip(block, images):
            write_png_atomic(scratch / f"{i:05d}.png", image)
        bar.update(len(block))
        faults.kill_point("curation", "batch", count)
    bar.close()


@torch.no_grad()
def score_pairs(params: StageParams, entries: list[dict], scratch: Path) -> tuple[list[dict], list[dict], dict]:
    """Score every stylised image against the style references and keep the best `keep` of each prompt.

    Returns:
        (kept entries, prompt-major and best first within a prompt; the others; manifest.json's `fidelity`
        without the thumbnails). Entries gain "style_clip", "style_gram", "detected" (toy styles) and "kept".
    Raises:
        ProxytuneError: `style.fidelity.min_share` is set and fewer kept images score above the threshold.
    """
    from proxytune.backends import encoders, style_metrics

    spec, evaluation, k = params.style.fidelity, params.evaluation, params.style.images_per_prompt
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the teacher pipeline is gone; the encoders are small
    files, reference_files, cache = proxy_scores.scoring_inputs(scratch, entries, params.references_dir, evaluation,
                                                                "style-scores")

    def score() -> dict[str, torch.Tensor]:
        tqdm.write(f"curation: scoring {len(files)} stylised images against {len(reference_files)} references")
        clip = encoders.load_clip(evaluation.clip_model, device=str(device()))
        dino = encoders.load_dino(evaluation.dino_model, device=str(device()))
        refs = style_metrics.reference_embeds(clip, dino, [open_rgb(p) for p in reference_files])
        gram = torch.cat([style_metrics.gram_embeds(dino, [open_rgb(f) for f in files[i : i + 32]])
                          @ refs["gram"].T for i in range(0, len(files), 32)]).mean(dim=1)  # (N,): a Gram is D*D wide
        embeds = proxy_scores.embed_files(clip, files)
        return {"clip": embeds, "style_clip": (embeds @ refs["clip"].T).mean(dim=1), "style_gram": gram}

    tensors = proxy_scores.cached_embeddings(cache, ("clip", "style_clip", "style_gram"), score)
    judge = None
    if params.style.toy_style is not None:
        judge = builtins.world(params.style.world).shows_style([open_rgb(f) for f in files], params.style.toy_style)
    for i, entry in enumerate(entries):
        entry.update(style_clip=round(float(tensors["style_clip"][i]), 6), style_gram=round(float(tensors["style_gram"][i]), 6))
        if judge is not None:
            entry["detected"] = float(judge[i])
    ranking = tensors[spec.metric].numpy().astype(np.float64)
    order = []
    for start in range(0, len(entries), k):  # one prompt's images: prompt-major (curation_items)
        group = list(range(start, min(start + k, len(entries))))
        picked = proxy_scores.pick(ranking[group], tensors["clip"][group], spec.keep or len(group), spec.diversity)
        order += [group[j] for j in picked]
    chosen = set(order)
    kept = [{**entries[i], "kept": True} for i in order]
    dropped = [{**entries[i], "kept": False} for i in range(len(entries)) if i not in chosen]
    fidelity = proxy_scores.fidelity_record(spec, ranking, order, judge, {"clip": evaluation.clip_model,
                                                                        "dino": evaluation.dino_model}, DETECTOR_JUDGE)
    proxy_scores.announce_and_gate(fidelity, stage="curation", where="style.fidelity", spec_file=params.source.spec_file,
                                   judge_words="the detector finds the style")
    return kept, dropped, fidelity


def raw_pairs(params: StageParams, folder: Path) -> tuple[list[dict], str]:
    """Write the raw pairs into `folder` (raw/NNNNN.png); return their manifest entries and where they came from."""
    raw = params.style.raw
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    if raw.ratio == 0:
        return entries, "none"
    if raw.toyworld is not None:
        from PIL import Image

        for i, (array, caption) in enumerate(builtins.world("toyworld").raw_pairs(raw.toyworld, raw.seed)):
            name = f"raw/{i:05d}.png"
            write_png_atomic(folder.parent / name, Image.fromarray(array))
            entries.append({"file": name, "prompt": caption, "sha256": sha256_file(folder.parent / name)})
        return entries, f"toyworld (seed {raw.seed})"
    source = Path(params.source.raw)
    pairs = captioned_images(source)[: raw.max_images]
    for i, (path, caption) in enumerate(pairs):
        name = f"raw/{i:05d}.png"
        write_png_atomic(folder.parent / name, open_rgb(path))  # one format; EXIF orientation applied
        entries.append({"file": name, "prompt": caption, "sha256": sha256_file(folder.parent / name),
                        "source": path.name})
    return entries, str(params.source.raw)


def run(params_path: str | Path) -> None:
    params = load_params(params_path)
    if params.style is None:
        raise ProxytuneError(f"{params_path}: the curation stage is for styles (no style section)")
    synthesis, style = params.synthesis, params.style
    teacher_dir = params.out("teacher")
    teacher = read_record(teacher_dir, TeacherRecord)
    items = curation_items(params)
    key = config_key(params.seed, synthesis.model_dump(exclude={"processes", "filter", "fidelity", "num_images", "prompt",
                                                                "templates"}),
                     params.teacher.model, params.teacher.revision, params.teacher.resolution,
                     teacher.adapter_digest, items)
    scratch = params.work("curation") / key
    scratch.mkdir(parents=True, exist_ok=True)
    generate_missing(params, teacher_dir, scratch)

    entries = [{"file": f"images/{i:05d}.png", "prompt": prompt, "teacher_prompt": teacher_prompt, "seed": seed,
                "sha256": sha256_file(scratch / f"{i:05d}.png")} for i, (prompt, teacher_prompt, seed) in enumerate(items)]
    dropped, fidelity, judge = [], None, None
    if style.fidelity.enabled:
        every = entries
        entries, dropped, fidelity = score_pairs(params, [dict(e) for e in every], scratch)
        if "detected" in entries[0]:
            judge = np.asarray([e["detected"] for e in sorted(entries + dropped, key=lambda e: e["file"])])
    digest = pairs_digest(entries)
    prompts_digest = sha256_bytes("\n".join(sorted(style.prompts)).encode())
    teacher_version = teacher.registered
    out_dir = params.out("curated")
    tags = {"teacher_version": teacher_version, "proxy_digest": digest, "proxy_images": str(len(entries)),
            "style": style.name}
    with stage_run(params, "curation", tags) as run, staged_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        for entry in entries:
            src, dst = scratch / Path(entry["file"]).name, tmp / entry["file"]
            link_or_copy(src, dst)
        if fidelity:
            fidelity.update(proxy_scores.write_extremes(tmp, [scratch / Path(e["file"]).name for e in every],
                                                        np.asarray(fidelity["scores"]), set(fidelity["kept_index"]),
                                                        judge, [e["file"] for e in every]))
        raw, raw_source = raw_pairs(params, tmp / "raw")
        raw_digest = pairs_digest(raw) if raw else None
        CuratedManifest(
            kind="style",
            style=style.name,
            token=style.token,
            teacher_prompt_template=STYLE_CURATION_PROMPT,
            teacher_version=teacher_version,  # no run id: identical work hashes the same (record.json has it)
            num_images=len(entries),
            digest=digest,
            prompts_digest=prompts_digest,
            images=entries,
            raw=RawPairs(source=raw_source, ratio=style.raw.ratio, num_images=len(raw), digest=raw_digest, images=raw),
            **({"dropped_images": dropped, "fidelity": fidelity} if fidelity else {}),
        ).write(tmp / layout.MANIFEST_FILE)
        preview = [[open_rgb(tmp / e["file"]) for e in entries[:8]]]
        if raw:
            preview.append([open_rgb(tmp / e["file"]) for e in raw[:8]])
        write_png_atomic(tmp / "preview.png", grid(preview, cell=min(params.teacher.resolution, 256)))
        run.log_params({"synthesis": synthesis.model_dump(mode="json"), "curation_prompts": style.prompts,
                        "images_per_prompt": style.images_per_prompt, "raw": style.raw.model_dump(mode="json")})
        run.log_metrics({"curated_images": len(entries), "raw_images": len(raw)})
        metrics = FidelityMetrics(images=len(entries), generated=len(items))
        if fidelity:
            metrics = FidelityMetrics(images=len(entries), generated=len(items), metric=fidelity["metric"],
                                      threshold=fidelity["threshold"], generated_scores=fidelity["generated"],
                                      kept_scores=fidelity["kept"])
            run.log_metrics({f"fidelity.{part}.{name}": value for part in ("generated", "kept")
                             for name, value in fidelity[part].items()})
        run.log_artifacts(tmp, "curated")
        run.log_dataset(out_dir / "images", name=f"{params.experiment}.{style.name}.curated", digest=digest,
                        context="curated")
        if raw:
            run.log_dataset(out_dir / "raw", name=f"{params.experiment}.{style.name}.raw", digest=raw_digest, context="raw")
        write_record(tmp, CurationRecord(stage="curation", run_id=run.run_id, digest=digest,
                                         prompts_digest=prompts_digest, num_images=len(entries),
                                         raw_digest=raw_digest, raw_images=len(raw), raw_source=raw_source,
                                         teacher_version=teacher_version, teacher_run_id=teacher.run_id))
        metrics.write(params.subject_dir / layout.PROXY_METRICS_FILE)
    tqdm.write(f"curation: {len(entries)} stylised images ({len(style.prompts)} prompts), {len(raw)} raw pairs, "
               f"digest {digest[:12]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", required=True)
    run(parser.parse_args().params)
