"""Synthesis stage: the tuned teacher generates the proxy set the student learns from.

Image i always gets seed `synthesis.seed + i`, whatever the batch size, and batches are fixed
blocks of indices, so a re-run or a resumed run yields byte-identical files (another batch size
gives the same images up to float rounding). Images are generated into a scratch folder that
survives a crash (finished, readable images are kept); the output folder `proxy/` appears at the
end with images/, manifest.json (file, prompt, seed, sha256 for each image, the set's digest and the
teacher version), preview.png and record.json.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from proxytune import faults
from proxytune.backends import diffusion
from proxytune.errors import ProxytuneError
from proxytune.files import digest_files, sha256_bytes, sha256_file, staged_dir, write_bytes_atomic, write_json_atomic
from proxytune.images import grid, open_rgb
from proxytune.stages import common
from proxytune.stages.params import StageParams, load_params


def proxy_prompt(params: StageParams) -> str:
    return params.synthesis.prompt.format(token=params.subject.token, **{"class": params.subject.class_noun})


def _is_complete(path: Path) -> bool:
    try:
        open_rgb(path)
        return True
    except ProxytuneError:
        return False


def manifest_digest(entries: list[dict]) -> str:
    """Digest of the set: every file's bytes, prompt and seed (order-independent)."""
    return digest_files([(f"{e['file']}\t{e['prompt']}\t{e['seed']}", e["sha256"]) for e in entries])


@torch.no_grad()
def generate_missing(params: StageParams, teacher_dir: Path, scratch: Path) -> None:
    cfg = params.synthesis
    prompt = proxy_prompt(params)
    # Batches are fixed blocks of image indices: float kernels may round differently for another
    # batch shape, so a resumed run regenerates whole blocks to stay byte-identical.
    blocks = [list(range(i, min(i + cfg.batch_size, cfg.num_images))) for i in range(0, cfg.num_images, cfg.batch_size)]
    todo = [block for block in blocks if not all(_is_complete(scratch / f"{i:05d}.png") for i in block)]
    if not todo:
        return
    done = cfg.num_images - sum(len(block) for block in todo)
    if done:
        tqdm.write(f"synthesis: resuming, {done} images already done")
    common.seed_everything(params.seed)
    pipe = diffusion.load_pipeline_with_lora(
        params.teacher.model, teacher_dir / "adapter", revision=params.teacher.revision, scale=cfg.lora_scale
    )
    pipe.to(common.device())
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=cfg.num_images, initial=done, desc="synthesis", unit="img")
    for count, batch in enumerate(todo, 1):
        images = diffusion.generate(
            pipe,
            [prompt] * len(batch),
            [cfg.seed + i for i in batch],
            steps=cfg.num_inference_steps,
            guidance=cfg.guidance_scale,
            size=params.teacher.resolution,
        )
        for i, image in zip(batch, images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            write_bytes_atomic(scratch / f"{i:05d}.png", buffer.getvalue())
        bar.update(len(batch))
        faults.checkpoint("synthesis", "batch", count)
    bar.close()


def run(params_path: str | Path) -> None:
    params = load_params(params_path)
    cfg = params.synthesis
    teacher_dir = params.out("teacher")
    teacher = common.read_record(teacher_dir)
    prompt = proxy_prompt(params)
    key = common.config_key(params.seed, cfg.model_dump(), params.teacher.model, params.teacher.revision,
                            params.teacher.resolution, teacher["adapter_digest"], prompt)
    scratch = params.work("synthesis") / key
    scratch.mkdir(parents=True, exist_ok=True)
    generate_missing(params, teacher_dir, scratch)

    entries = []
    for i in range(cfg.num_images):
        name = f"{i:05d}.png"
        entries.append({"file": f"images/{name}", "prompt": prompt, "seed": cfg.seed + i, "sha256": sha256_file(scratch / name)})
    digest = manifest_digest(entries)
    prompts_digest = sha256_bytes("\n".join(sorted({e["prompt"] for e in entries})).encode())
    teacher_version = f"{teacher['model']}@{teacher['version']}"
    out_dir = params.out("proxy")
    tags = {"teacher_version": teacher_version, "proxy_digest": digest, "proxy_images": str(cfg.num_images)}
    with common.stage_run(params, "synthesis", tags) as run, staged_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        for entry in entries:
            src, dst = scratch / Path(entry["file"]).name, tmp / entry["file"]
            try:
                os.link(src, dst)  # same file system: no copy of a 1000-image set
            except OSError:
                shutil.copy2(src, dst)
        manifest = {
            "prompt_template": cfg.prompt,
            "teacher_version": teacher_version,
            "teacher_run_id": teacher["run_id"],
            "num_images": cfg.num_images,
            "digest": digest,
            "prompts_digest": prompts_digest,
            "images": entries,
        }
        write_json_atomic(tmp / "manifest.json", manifest)
        preview = [open_rgb(tmp / e["file"]) for e in entries[:8]]
        grid([preview], cell=min(params.teacher.resolution, 256)).save(tmp / "preview.png")
        run.log_params({"synthesis": cfg.model_dump(mode="json"), "prompt": prompt})
        run.log_artifacts(tmp, "proxy")
        run.log_dataset(out_dir, name=f"{params.experiment}.{params.subject.name}.proxy", digest=digest, context="synthesized")
        common.write_record(
            tmp,
            {
                "stage": "synthesis",
                "run_id": run.run_id,
                "digest": digest,
                "prompts_digest": prompts_digest,
                "num_images": cfg.num_images,
                "teacher_version": teacher_version,
            },
        )
    tqdm.write(f"synthesis: {cfg.num_images} proxy images, digest {digest[:12]}")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", required=True)
    run(parser.parse_args().params)
