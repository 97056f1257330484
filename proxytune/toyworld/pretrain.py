"""Pretrain the toy world's base models on CPU: `proxytune toyworld pretrain --out DIR`.

One recipe per model, run in dependency order; each is a plain training loop over a fixed,
pre-rendered world (the held-out subjects excluded). The recipes are in pretrain_encoders.py and
pretrain_generators.py, what they share (config, data, step randomness, the loop) in pretrain_loop.py;
this module runs them:

    oracle   CNN attribute classifier (supervised, on renders with their true attributes)
    clip     transformers CLIPModel, contrastive on (image, caption)
    dino     transformers ViTModel, SimCLR on two augmented views (no labels)
    vae      diffusers AutoencoderKL, x8 (64 px -> 8x8x8)
    sd       diffusers UNet2DConditionModel on the VAE's latents, toy-clip's text encoder -> an SD pipeline
    vq       diffusers VQModel, x8 (64 px -> 8x8 codes of 256)
    llamagen proxytune's LlamaGen student (2D RoPE) over the VQ codes, its T5 text encoder trained with it

Every step is a function of (seed, model, step): batch indices, augmentations and noise come from
generators seeded by those three numbers, so a run resumed from a checkpoint continues exactly as
an uninterrupted one. Checkpoints (model + optimiser, every `checkpoint_every` steps) are written
atomically under DIR/checkpoints and read with torch.load(weights_only=True); a finished model is
a normal checkpoint folder under DIR/NAME plus DIR/NAME/done.json.

With `jobs=2` (the default) the models run in two single-threaded lanes, one per core (two
1-thread processes do about 40% more work than one 2-thread process on these small models):
oracle -> vae -> dino -> sd and clip -> vq -> llamagen; a model waits for the ones it needs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from proxytune.errors import ProxytuneError
from proxytune.files import write_json_atomic
from proxytune.toyworld.pretrain_encoders import train_clip, train_dino, train_oracle
from proxytune.toyworld.pretrain_generators import train_llamagen, train_sd, train_vae, train_vq
from proxytune.toyworld.pretrain_loop import MODELS, Loop, PretrainConfig, Recipe, WorldData, is_done

__all__ = ["MODELS", "Loop", "PretrainConfig", "Recipe", "pretrain"]

# -----------------------------------------------------------------------------
# driver

TRAINERS = {
    "oracle": train_oracle, "clip": train_clip, "dino": train_dino, "vae": train_vae, "sd": train_sd,
    "vq": train_vq, "llamagen": train_llamagen,
}


LANES = (("oracle", "vae", "sd", "dino"), ("clip", "vq", "llamagen"))  # about 100 minutes each on shared cores
NEEDS = {"vae": ("oracle",), "vq": ("oracle",), "sd": ("vae", "clip"), "llamagen": ("vq",)}


def pretrain(out: Path, cfg: PretrainConfig | None = None, only: list[str] | None = None) -> dict[str, float]:
    """Train every model not yet done; returns seconds spent per model (wall time of its lane)."""
    cfg = cfg or PretrainConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", cfg.as_dict())
    data = WorldData(out, cfg)  # rendered once, before any lane needs it
    todo = [m for m in MODELS if (only is None or m in only) and not is_done(out, m)]
    for name in todo:
        missing = [n for n in NEEDS.get(name, ()) if n not in todo and not is_done(out, n)]
        if missing:
            raise ProxytuneError(f"--only {name}: needs {', '.join(missing)}, not pretrained in {out} (add it to --only)")
    if cfg.jobs <= 1:
        return _run_lane(out, cfg, todo, data)
    procs = []
    for lane in LANES:
        models = [m for m in lane if m in todo]
        if models:
            procs.append(subprocess.Popen([sys.executable, "-m", "proxytune.toyworld.pretrain", str(out), *models]))
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() for p in procs):  # one lane failed: the other may be waiting on it forever
                break
            time.sleep(2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()
    codes = [p.returncode for p in procs]
    if any(codes):
        raise ProxytuneError(f"{out}: a pretraining lane failed (exit codes {codes}, its log is above); "
                             "run the same command again to resume")
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    return {m: timings.get(m, 0.0) for m in todo}


def _run_lane(out: Path, cfg: PretrainConfig, models: list[str], data: WorldData | None = None) -> dict[str, float]:
    torch.set_num_threads(cfg.threads)
    data = data or WorldData(out, cfg)
    spent = {}
    for name in models:
        if is_done(out, name):
            continue
        while not all(is_done(out, need) for need in NEEDS.get(name, ())):
            time.sleep(5)  # the other lane is still training it
        t0 = time.time()
        TRAINERS[name](out, cfg, data)
        spent[name] = time.time() - t0
        _add_timing(out, name, spent[name])
    return spent


def _add_timing(out: Path, name: str, seconds: float) -> None:
    import fcntl

    with open(out / ".timings.lock", "w") as lock:  # two lanes finish models independently
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = out / "timings.json"
        timings = json.loads(path.read_text()) if path.exists() else {}
        timings[name] = timings.get(name, 0.0) + seconds
        write_json_atomic(path, timings)


if __name__ == "__main__":  # one lane, started by pretrain(): python -m proxytune.toyworld.pretrain OUT MODEL...
    _out = Path(sys.argv[1])
    _run_lane(_out, PretrainConfig.from_dict(json.loads((_out / "config.json").read_text())), sys.argv[2:])
