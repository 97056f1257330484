"""What every toy model's pretraining recipe shares: the config the weights depend on, the
pre-rendered world, per-step randomness, the resumable loop, augmentations and fresh renders.

The recipes themselves are in pretrain_encoders.py (oracle, toy-clip, toy-dino) and
pretrain_generators.py (toy-sd, toy-llamagen); pretrain.py runs them in lanes.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from proxytune.files import write_json_atomic
from proxytune.toyworld import oracle as oracle_lib
from proxytune.toyworld import world
from proxytune.toyworld.subjects import HELD_OUT

MODELS = ("oracle", "clip", "dino", "vae", "sd", "vq", "llamagen")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Recipe:
    steps: int
    batch_size: int
    lr: float
    warmup: int = 100
    text_lr_scale: float = 0.0  # sd: 0 keeps the text encoder frozen; > 0 trains it with the UNet at lr * scale
    min_snr_gamma: float = 0.0  # sd: min-SNR-gamma loss weighting (Hang et al. 2023); 0 = plain epsilon MSE
    bf16: bool = False  # llamagen: bfloat16 autocast (AMX matmuls on recent x86 CPUs), attention on the math kernel


@dataclass
class PretrainConfig:
    """Everything the weights depend on; recorded in each model's done.json."""

    seed: int = 0
    num_images: int = 24000
    threads: int = 1  # per lane; the shipped weights were made with 1 (float sums depend on it)
    jobs: int = 2
    eval_samples: int = 1000  # fresh renders for the quality measures in done.json (at most)
    checkpoint_every: int = 250
    vq_codes: int = 256  # toy-llamagen's codebook (1024 spread each colour over many near-identical codes)
    recipes: dict[str, Recipe] = field(default_factory=lambda: {
        # one lane per core took about 100 minutes on 2 cores shared with other work (seconds per step in done.json)
        "oracle": Recipe(steps=1500, batch_size=64, lr=2e-3),
        "clip": Recipe(steps=1000, batch_size=96, lr=1e-3),
        "dino": Recipe(steps=600, batch_size=64, lr=1e-3),
        "vae": Recipe(steps=2000, batch_size=16, lr=1e-3),
        "sd": Recipe(steps=4500, batch_size=32, lr=1e-3, warmup=200),
        "vq": Recipe(steps=2500, batch_size=16, lr=1e-3),
        "llamagen": Recipe(steps=1600, batch_size=64, lr=1e-3, warmup=200),
    })

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PretrainConfig":
        recipes = {k: Recipe(**v) for k, v in data.get("recipes", {}).items()}
        return cls(**{**data, "recipes": recipes})


# -----------------------------------------------------------------------------
# data and step randomness


def step_rng(cfg: PretrainConfig, model: str, step: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, MODELS.index(model), step])


def step_generator(cfg: PretrainConfig, model: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(step_rng(cfg, model, step).integers(2**62)))


class WorldData:
    """The pretraining pictures, rendered once and cached in DIR/data (about 300 MB for 24k)."""

    def __init__(self, out: Path, cfg: PretrainConfig):
        path = out / "data" / f"world-seed{cfg.seed}-n{cfg.num_images}.npz"
        if not path.exists():
            images, samples = world.sample_world(cfg.num_images, cfg.seed, exclude=HELD_OUT, full_captions=True,
                                                 progress="render world")
            attrs = np.array([[getattr(s.attrs, k) for k in oracle_lib.HEADS] for s in samples])
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, images=images, attrs=attrs)
            os.replace(tmp, path)
        data = np.load(path)
        self.images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).contiguous()  # (N, 3, 64, 64) uint8
        self.attrs = [world.Attributes(*row) for row in data["attrs"].tolist()]

    def __len__(self) -> int:
        return len(self.attrs)

    def batch(self, rng: np.random.Generator, size: int) -> tuple[torch.Tensor, list[world.Attributes], np.ndarray]:
        """(pixels in [-1, 1], attributes, indices) of `size` random pictures."""
        idx = rng.integers(len(self), size=size)
        pixels = self.images[idx].float() / 127.5 - 1.0
        return pixels, [self.attrs[i] for i in idx], idx

    def captions(self, attrs: list[world.Attributes], rng: np.random.Generator) -> list[str]:
        return [world.caption(a, rng) for a in attrs]


def _schedule(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


class Loop:
    """Resumable training loop: `for step in loop:` yields the steps still to run."""

    def __init__(self, out: Path, cfg: PretrainConfig, name: str, modules: dict[str, torch.nn.Module], params):
        self.out, self.cfg, self.name, self.modules = out, cfg, name, modules
        self.recipe = cfg.recipes[name]
        self.opt = torch.optim.AdamW(params, lr=self.recipe.lr, betas=(0.9, 0.99), weight_decay=0.01)
        self.path = out / "checkpoints" / f"{name}.pt"
        self.start = 0
        self.losses: list[float] = []
        self.step_seconds: list[float] = []
        if self.path.exists():
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            for key, module in modules.items():
                module.load_state_dict(state["modules"][key])
            self.opt.load_state_dict(state["optimizer"])
            self.start, self.losses = int(state["step"]), list(state["losses"])

    def __iter__(self):
        # always shown: pretraining runs for minutes per model, usually in the background with a log
        bar = tqdm(range(self.start, self.recipe.steps), desc=f"pretrain {self.name}", initial=self.start,
                   total=self.recipe.steps, mininterval=10.0)
        for step in bar:
            for group in self.opt.param_groups:
                group["lr"] = _schedule(step, self.recipe) * group.get("lr_scale", 1.0)
            # modules that draw from the global generator (dropout) see the same numbers after a resume
            torch.manual_seed(int(step_rng(self.cfg, self.name, step).integers(2**62)) ^ 1)
            t0 = time.perf_counter()
            yield step
            self.step_seconds.append(time.perf_counter() - t0)
            if self.losses:
                bar.set_postfix(loss=f"{np.mean(self.losses[-50:]):.4f}")
            if (step + 1) % self.cfg.checkpoint_every == 0 and step + 1 < self.recipe.steps:
                self.save(step + 1)

    def update(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
        self.opt.step()
        self.losses.append(float(loss.detach()))

    def save(self, step: int) -> None:
        state = {"modules": {k: m.state_dict() for k, m in self.modules.items()}, "optimizer": self.opt.state_dict(),
                 "step": step, "losses": self.losses}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def finish(self, folder: Path, metrics: dict) -> dict:
        record = {"model": self.name, "steps": self.recipe.steps, "recipe": asdict(self.recipe), "seed": self.cfg.seed,
                  "num_images": self.cfg.num_images, "seconds_per_step": float(np.median(self.step_seconds or [0.0])),
                  "final_loss": float(np.mean(self.losses[-100:])),
                  "loss_curve": [float(np.mean(self.losses[i:i + 50])) for i in range(0, len(self.losses), 50)],
                  **metrics}
        write_json_atomic(folder / "done.json", record)
        return record


def is_done(out: Path, name: str) -> bool:
    return (out / name / "done.json").exists()


def augment(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild photometric noise: brightness/contrast jitter, pixel noise, an occasional blur."""
    B = pixels.shape[0]
    gain = 1 + 0.08 * (torch.rand(B, 1, 1, 1, generator=gen) * 2 - 1)
    bias = 0.06 * (torch.rand(B, 1, 1, 1, generator=gen) * 2 - 1)
    out = pixels * gain + bias
    out = out + torch.randn(out.shape, generator=gen) * 0.04 * torch.rand(B, 1, 1, 1, generator=gen)
    blur = F.avg_pool2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = (torch.rand(B, 1, 1, 1, generator=gen) < 0.3).float() * torch.rand(B, 1, 1, 1, generator=gen)
    return (out * (1 - mix) + blur * mix).clamp(-1, 1)


def soften(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Half the batch loses detail as a decoder's output does (x2 or x4 down, bilinear up), so the
    oracle reads generated pictures by what they show, not by how sharp they are."""
    B, _, H, W = pixels.shape
    out = pixels.clone()
    pick = torch.rand(B, generator=gen) < 0.5
    factor = torch.where(torch.rand(B, generator=gen) < 0.7, 2, 4)
    for f in (2, 4):
        rows = pick & (factor == f)
        if rows.any():
            small = F.interpolate(pixels[rows], size=(H // f, W // f), mode="area")
            out[rows] = F.interpolate(small, size=(H, W), mode="bilinear", align_corners=False)
    return out



def fresh_renders(n: int, seed: int) -> tuple[np.ndarray, list[world.Attributes]]:
    """Renders never used in training (their own seed), with their attributes."""
    images, samples = world.sample_world(n, seed + 10_000, full_captions=True)
    return images, [s.attrs for s in samples]


def oracle_accuracy(model: oracle_lib.Oracle, images: np.ndarray, attrs: list[world.Attributes]) -> dict[str, float]:
    seen = oracle_lib.read(model, images)
    return {k: float(np.mean([s[k] == getattr(a, k) for s, a in zip(seen, attrs)])) for k in oracle_lib.HEADS}

