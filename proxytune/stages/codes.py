"""Codes stage: the student's image tokenizer encodes the proxy set once, as a DVC output.

Its only params are `student.model` (the tokenizer belongs to the model), so changing the student's
learning rate, recipe options or regularisers re-runs the student stage but never re-encodes the
proxies. Output folder `codes/`: codes.safetensors (codes (N, L) by manifest index, one condition per
distinct prompt, each image's prompt index) with the model, backend and proxy digest in its
metadata, and record.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from proxytune import layout
from proxytune.backends import students
from proxytune.files import safetensors_bytes, sha256_file, staged_dir, write_bytes_atomic
from proxytune.images import center_crop_resize, open_rgb
from proxytune.outputs import CodesMetadata, CodesRecord, ProxyManifest, SynthesisRecord, read_record, write_record
from proxytune.stages.params import StageParams, load_params
from proxytune.stages.runtime import device, seed_everything, stage_run


@torch.no_grad()
def encode_proxies(params: StageParams) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) for every proxy image of the manifest, in manifest order."""
    proxy_dir = params.out("proxy")
    proxy = read_record(proxy_dir, SynthesisRecord)
    entries = ProxyManifest.read(proxy_dir / layout.MANIFEST_FILE).images
    seed_everything(params.seed)
    # only the image tokenizer and text encoder go to the accelerator: the generator is not used here
    bundle = students.load_student(params.student.model, device="cpu")
    bundle.tokenizers_to(str(device()))
    check_identifier(bundle, params)
    prompts = [e.prompt for e in entries]
    distinct = sorted(set(prompts))
    codes = []
    for start in tqdm(range(0, len(entries), 16), desc="codes: tokenize proxies", unit="batch"):
        images = [center_crop_resize(open_rgb(proxy_dir / e.file), bundle.image_size) for e in entries[start : start + 16]]
        codes.append(bundle.encode_images(bundle.images_to_pixels(images)).cpu())
    tensors = {
        "codes": torch.cat(codes).contiguous(),  # (N, L)
        "conds": bundle.encode_prompts(distinct).cpu().contiguous(),  # (P, ...)
        "prompt_index": torch.tensor([distinct.index(p) for p in prompts]),  # (N,)
    }
    metadata = CodesMetadata(model=params.student.model, backend=bundle.backend, proxy_digest=proxy.digest,
                             prompts=distinct)
    return tensors, metadata.to_safetensors()


def check_identifier(bundle, params: StageParams) -> None:
    """The subject's identifier must survive the caption cleaning a llamagen student applies (the
    spec check cannot see a hub model's backend; this one runs before any prompt is encoded).

    Raises:
        ProxytuneError: the cleaning removes the identifier from the prompt.
    """
    if bundle.backend != "llamagen" or not bundle.config.clean_captions:
        return
    from proxytune.backends.captions import identifier_problem
    from proxytune.errors import ProxytuneError

    problem = identifier_problem(params.subject.token, params.subject.class_noun)
    if problem and problem[0] == "error":
        raise ProxytuneError(f"subject.token: {problem[1]}")
    if problem:
        tqdm.write(f"codes: warning: subject.token: {problem[1]}")


def run(params_path: str | Path) -> None:
    params = load_params(params_path)
    tensors, metadata = encode_proxies(params)
    tags = {"proxy_digest": metadata["proxy_digest"], "base_model": metadata["model"], "backend": metadata["backend"]}
    with stage_run(params, "codes", tags) as run, staged_dir(params.out("codes")) as tmp:
        write_bytes_atomic(tmp / layout.CODES_FILE, safetensors_bytes(tensors, metadata))  # sorted header: same bytes every run
        digest = sha256_file(tmp / layout.CODES_FILE)
        run.log_params({"student.model": metadata["model"], "num_images": len(tensors["codes"]),
                        "seq_len": tensors["codes"].shape[1], "codes_sha256": digest})
        write_record(tmp, CodesRecord(stage="codes", run_id=run.run_id, model=metadata["model"],
                                      backend=metadata["backend"], proxy_digest=metadata["proxy_digest"],
                                      num_images=len(tensors["codes"]), seq_len=tensors["codes"].shape[1],
                                      sha256=digest))
    tqdm.write(f"codes: {len(tensors['codes'])} proxy images x {tensors['codes'].shape[1]} codes ({metadata['backend']})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", required=True)
    run(parser.parse_args().params)
