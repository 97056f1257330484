"""Synthesis stage: the tuned teacher generates the proxy set the student learns from.

Image i always gets seed `synthesis.seed + i`, whatever the batch size, and batches are fixed
blocks of indices, so a re-run or a resumed run yields byte-identical files (another batch size
gives the same images up to float rounding). Images are generated into a pool folder (.work/synthesis/KEY,
KEY = everything generation depends on) that survives a crash (finished, readable images are kept) and the
stage: changing only `synthesis.fidelity` or `synthesis.filter` re-scores and re-curates the pool, never
re-generates it (delete .work/ to reclaim the space of proxies not kept).

Fidelity (issue 29, `synthesis.fidelity`, on by default): once the teacher has left the GPU, every generated
proxy is scored against the references with the evaluation's encoders (DINO and CLIP-I: mean cosine to every
reference, as DreamBench's per-image scores) and, for a toy subject, the oracle's reading (1 when it reads the
whole subject, through its world in proxytune.builtins). Embeddings are cached in the pool. `fidelity.keep` keeps the N
best by `fidelity.metric` (greedy maximal marginal relevance with `fidelity.diversity`); `fidelity.min_share`
fails the stage, in one line, when too few kept proxies score above `fidelity.threshold`.

The contract with the codes and student stages: manifest.json's `images` are the kept proxies in the order
the codes stage encodes them and `student.num_proxy_images` takes the first of (most faithful first when
`fidelity.keep` curates, else generation order); every entry carries {"file", "prompt", "seed", "sha256",
"dino", "clip_i", "oracle" (toy subjects only, else absent), "kept": true}; `dropped_images` holds the proxies
not kept with the same keys ("kept": false, their files stay in the pool only). manifest.json's `fidelity` has
the settings, summaries of all generated and of the kept proxies (mean, q10/q50/q90, share above the
threshold, the oracle's share), every generated proxy's score and the most/least faithful thumbnails
(fidelity/most-NN.png, least-NN.png). The same summaries go to MLflow and to proxy_metrics.json (DVC metrics,
beside proxy/).

Output folder `proxy/`: images/, manifest.json, fidelity/, preview.png and record.json.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from proxytune import builtins, faults, layout
from proxytune.backends.teachers import diffusion
from proxytune.errors import ProxytuneError
from proxytune.files import digest_files, link_or_copy, sha256_bytes, sha256_file, staged_dir, write_png_atomic
from proxytune.images import grid, open_rgb
from proxytune.outputs import FidelityMetrics, ProxyManifest, SynthesisRecord, TeacherRecord, read_record, write_record
from proxytune.stages import proxy_scores
from proxytune.stages.params import StageParams, load_params
from proxytune.stages.runtime import config_key, device, generation_dtype, seed_everything, stage_run
from proxytune.stages.sampling import unfinished_blocks

ORACLE_JUDGE = "the toy oracle reads every distinctive attribute of the subject (1) or not (0)"


def proxy_prompts(params: StageParams) -> list[str]:
    """The paper's prompt first, then the spec's context templates; image i gets prompts[i % len]."""
    subject = params.subject
    templates = [params.synthesis.prompt, *params.synthesis.templates]
    return [t.format(token=subject.token, **{"class": subject.class_noun}) for t in templates]


def prompt_of(prompts: list[str], index: int) -> str:
    return prompts[index % len(prompts)]


def processes(params_path: str | Path) -> int:
    """How many data-parallel processes the CLI launches this stage with (accelerate)."""
    return load_params(params_path).synthesis.processes


def manifest_digest(entries: list[dict]) -> str:
    """Digest of the set: every file's bytes, prompt and seed (order-independent)."""
    return digest_files([(f"{e['file']}\t{e['prompt']}\t{e['seed']}", e["sha256"]) for e in entries])


@torch.no_grad()
def generate_missing(params: StageParams, teacher_dir: Path, scratch: Path, rank: int = 0, world: int = 1) -> None:
    """Generate every unfinished block; under accelerate, process `rank` takes blocks rank, rank + world, ..."""
    synthesis = params.synthesis
    prompts = proxy_prompts(params)
    # fixed blocks of image indices, regenerated whole: a resumed or sharded run stays byte-identical
    paths = [scratch / f"{i:05d}.png" for i in range(synthesis.num_images)]
    todo = unfinished_blocks(paths, synthesis.batch_size)[rank::world]
    if not todo:
        return
    done = synthesis.num_images - sum(len(block) for block in todo)
    if done and world == 1:
        tqdm.write(f"synthesis: resuming, {done} images already done")
    seed_everything(params.seed)
    pipe = diffusion.load_pipeline_with_lora(
        params.teacher.model, teacher_dir / "adapter", revision=params.teacher.revision, scale=synthesis.lora_scale,
        dtype=generation_dtype(synthesis.dtype), quantize=synthesis.quantize,
    )
    note = diffusion.place_for_generation(pipe, device(), cpu_offload=synthesis.cpu_offload,
                                          vae_tiling=synthesis.vae_tiling)
    if note and rank == 0:
        tqdm.write(note)
    if synthesis.compile:  # in place: the pipeline calls the compiled denoiser; blocks keep one shape
        diffusion.denoiser(pipe).compile(dynamic=False)
    pipe.set_progress_bar_config(disable=True)
    label = f"synthesis [{rank + 1}/{world}]" if world > 1 else "synthesis"
    bar = tqdm(total=sum(len(block) for block in todo), desc=label, unit="img")
    for count, batch in enumerate(todo, 1):
        images = diffusion.generate(
            pipe,
            [prompt_of(prompts, i) for i in batch],
            [synthesis.seed + i for i in batch],
            steps=synthesis.num_inference_steps,
            guidance=synthesis.guidance_scale,
            size=params.teacher.resolution,
        )
        for i, image in zip(batch, images):
            write_png_atomic(scratch / f"{i:05d}.png", image)
        bar.update(len(batch))
        faults.kill_point("synthesis", "batch", count)
    bar.close()


@torch.no_grad()
def quality_filter(params: StageParams, entries: list[dict], scratch: Path) -> tuple[list[dict], list[dict]]:
    """Split entries into (kept, dropped) by mean cosine of each proxy's embedding to the references'.

    Every entry gets its "similarity"; dropped ones are the least similar (drop_fraction) or those
    below min_similarity. Ties break by index, so the split is deterministic.
    """
    from proxytune.backends import encoders
    from proxytune.images import list_images

    filter_spec = params.synthesis.filter
    encoder = encoders.load_dino(filter_spec.model) if filter_spec.metric == "dino" else encoders.load_clip(filter_spec.model)
    references = [open_rgb(p) for p in list_images(params.references_dir)]
    reference_embeds = encoder.image_embeds(references)
    similarity = []
    for start in tqdm(range(0, len(entries), 32), desc="synthesis: quality filter", unit="batch", leave=False):
        chunk = [open_rgb(scratch / Path(e["file"]).name) for e in entries[start : start + 32]]
        similarity += encoders.per_image_pairwise_cosine(encoder.image_embeds(chunk), reference_embeds).tolist()
    for entry, value in zip(entries, similarity):
        entry["similarity"] = round(float(value), 6)
    if filter_spec.drop_fraction is not None:
        order = sorted(range(len(entries)), key=lambda i: (similarity[i], i))
        dropped_index = set(order[: int(filter_spec.drop_fraction * len(entries))])
    else:
        dropped_index = {i for i, value in enumerate(similarity) if value < filter_spec.min_similarity}
    if len(dropped_index) == len(entries):
        raise ProxytuneError(
            f"{params.source.spec_file}: synthesis.filter: every proxy image was dropped "
            f"(best similarity {max(similarity):.3f}); lower min_similarity"
        )
    kept = [e for i, e in enumerate(entries) if i not in dropped_index]
    dropped = [e for i, e in enumerate(entries) if i in dropped_index]
    return kept, dropped


def run(params_path: str | Path) -> None:
    params = load_params(params_path)
    synthesis = params.synthesis
    teacher_dir = params.out("teacher")
    teacher = read_record(teacher_dir, TeacherRecord)
    prompts = proxy_prompts(params)
    key = config_key(params.seed, synthesis.model_dump(exclude={"processes", "filter", "fidelity"}), params.teacher.model,
                     params.teacher.revision, params.teacher.resolution, teacher.adapter_digest, prompts)
    scratch = params.work("synthesis") / key
    scratch.mkdir(parents=True, exist_ok=True)
    rank, world = 0, 1
    if synthesis.processes > 1 and layout.LAUNCHED_ENV in os.environ:
        from accelerate import PartialState

        state = PartialState(cpu=device().type == "cpu")
        rank, world = state.process_index, state.num_processes
    generate_missing(params, teacher_dir, scratch, rank, world)
    if world > 1:
        state.wait_for_everyone()
        if not state.is_main_process:
            return  # the main process checks, assembles and logs the set
        generate_missing(params, teacher_dir, scratch)  # a block another process left unfinished
    assemble(params, teacher, scratch, prompts)


@torch.no_grad()
def score_and_curate(params: StageParams, entries: list[dict],
                     scratch: Path) -> tuple[list[dict], list[dict], np.ndarray, np.ndarray | None]:
    """Score every generated proxy and keep `fidelity.keep` of them (see the module docstring).

    Returns:
        (kept entries in manifest order, the others, every proxy's ranking score, the oracle's 0/1 per proxy
        or None), the scores in generation order. Entries gain "dino", "clip_i", "oracle" (toy) and "kept".
    """
    from proxytune.backends import encoders

    spec, evaluation = params.synthesis.fidelity, params.evaluation
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the teacher pipeline is gone; the encoders are small
    files, reference_files, cache = proxy_scores.scoring_inputs(scratch, entries, params.references_dir, evaluation,
                                                                "embeds")

    def embed() -> dict[str, torch.Tensor]:
        tqdm.write(f"synthesis: scoring {len(files)} proxies against {len(reference_files)} references")
        dino = encoders.load_dino(evaluation.dino_model, device=str(device()))
        clip = encoders.load_clip(evaluation.clip_model, device=str(device()))
        references = [open_rgb(p) for p in reference_files]
        return {"dino": proxy_scores.embed_files(dino, files), "clip_i": proxy_scores.embed_files(clip, files),
                "ref_dino": dino.image_embeds(references), "ref_clip_i": clip.image_embeds(references)}

    tensors = proxy_scores.cached_embeddings(cache, ("dino", "clip_i", "ref_dino", "ref_clip_i"), embed)
    scores = {m: proxy_scores.mean_cosine(tensors[m], tensors[f"ref_{m}"]) for m in ("dino", "clip_i")}
    judge = None
    if params.subject.toy_subject is not None:
        world = builtins.world(params.subject.world)
        judge = world.shows_subject([open_rgb(f) for f in files], [e["prompt"] for e in entries], params.subject.token,
                                    params.subject.toy_subject)
    for i, entry in enumerate(entries):
        entry.update(dino=round(float(scores["dino"][i]), 6), clip_i=round(float(scores["clip_i"][i]), 6))
        if judge is not None:
            entry["oracle"] = float(judge[i])
    ranking = scores[spec.metric]
    order = (proxy_scores.pick(ranking, tensors[spec.metric], spec.keep, spec.diversity) if spec.keep is not None
             else list(range(len(entries))))
    chosen = set(order)
    kept = [{**entries[i], "kept": True} for i in order]
    dropped = [{**entries[i], "kept": False} for i in range(len(entries)) if i not in chosen]
    return kept, dropped, ranking, judge


def assemble(params: StageParams, teacher: TeacherRecord, scratch: Path, prompts: list[str]) -> None:
    synthesis = params.synthesis
    entries = []
    for i in range(synthesis.num_images):
        name = f"{i:05d}.png"
        entries.append({"file": f"images/{name}", "prompt": prompt_of(prompts, i), "seed": synthesis.seed + i,
                         "sha256": sha256_file(scratch / name)})
    dropped: list[dict] = []
    fidelity = None
    if synthesis.fidelity.enabled:
        entries, dropped, ranking, judge = score_and_curate(params, entries, scratch)
    if synthesis.filter.enabled:
        entries, filtered = quality_filter(params, entries, scratch)
        dropped += [{**e, "kept": False} if "kept" in e else e for e in filtered]
        tqdm.write(f"synthesis: quality filter dropped {len(filtered)} of {synthesis.num_images} images")
    if synthesis.fidelity.enabled:
        evaluation, index = params.evaluation, [e["seed"] - synthesis.seed for e in entries]  # generation indices
        fidelity = proxy_scores.fidelity_record(synthesis.fidelity, ranking, index, judge,
                                                {"dino": evaluation.dino_model, "clip_i": evaluation.clip_model},
                                                ORACLE_JUDGE)
        proxy_scores.announce_and_gate(fidelity, stage="synthesis", where="synthesis.fidelity",  # fails before any output
                                       spec_file=params.source.spec_file, judge_words="the oracle reads the subject")
    digest = manifest_digest(entries)
    prompts_digest = sha256_bytes("\n".join(sorted({e["prompt"] for e in entries})).encode())
    teacher_version = teacher.registered
    out_dir = params.out("proxy")
    tags = {"teacher_version": teacher_version, "proxy_digest": digest, "proxy_images": str(len(entries))}
    with stage_run(params, "synthesis", tags) as run, staged_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        for entry in entries:
            src, dst = scratch / Path(entry["file"]).name, tmp / entry["file"]
            link_or_copy(src, dst)
        if fidelity:
            every = sorted(entries + dropped, key=lambda e: e["seed"])
            fidelity.update(proxy_scores.write_extremes(
                tmp, [scratch / Path(e["file"]).name for e in every], np.asarray(fidelity["scores"]),
                set(fidelity["kept_index"]), judge, [e["file"] for e in every]))
        ProxyManifest(
            prompt_template=synthesis.prompt,
            templates=synthesis.templates,
            teacher_version=teacher_version,  # no run id: identical work hashes the same (record.json has it)
            num_images=len(entries),
            generated=synthesis.num_images,
            dropped=len(dropped),
            filter=synthesis.filter.model_dump(mode="json") if synthesis.filter.enabled else None,
            digest=digest,
            prompts_digest=prompts_digest,
            images=entries,
            dropped_images=[e if fidelity else {k: e[k] for k in ("file", "seed", "sha256", "similarity")}
                            for e in dropped],
            **({"fidelity": fidelity} if fidelity else {}),
        ).write(tmp / layout.MANIFEST_FILE)
        preview = [open_rgb(tmp / e["file"]) for e in entries[:8]]
        write_png_atomic(tmp / "preview.png", grid([preview], cell=min(params.teacher.resolution, 256)))
        run.log_params({"synthesis": synthesis.model_dump(mode="json"), "prompts": prompts})
        run.log_metrics({"proxy_images": len(entries), "proxy_dropped": len(dropped)})
        metrics = FidelityMetrics(images=len(entries), generated=synthesis.num_images)
        if fidelity:
            metrics = FidelityMetrics(images=len(entries), generated=synthesis.num_images, metric=fidelity["metric"],
                                      threshold=fidelity["threshold"], generated_scores=fidelity["generated"],
                                      kept_scores=fidelity["kept"])
            run.log_metrics({f"fidelity.{part}.{name}": value for part in ("generated", "kept")
                             for name, value in fidelity[part].items()})
        run.log_artifacts(tmp, "proxy")
        run.log_dataset(out_dir, name=f"{params.experiment}.{params.subject.name}.proxy", digest=digest, context="synthesized")
        write_record(
            tmp,
            SynthesisRecord(
                stage="synthesis",
                run_id=run.run_id,
                digest=digest,
                prompts_digest=prompts_digest,
                num_images=len(entries),
                dropped=len(dropped),
                teacher_version=teacher_version,
            ),
        )
        metrics.write(params.subject_dir / layout.PROXY_METRICS_FILE)
    tqdm.write(f"synthesis: {len(entries)} proxy images, digest {digest[:12]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", required=True)
    run(parser.parse_args().params)
