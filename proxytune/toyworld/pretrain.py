"""Pretrain the toy world's base models on CPU: `proxytune toyworld pretrain --out DIR`.

One recipe per model, run in dependency order; each is a plain training loop over a fixed,
pre-rendered world (the held-out subjects excluded):

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
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from proxytune.errors import ProxytuneError
from proxytune.files import write_json_atomic
from proxytune.toyworld import oracle as oracle_lib
from proxytune.toyworld import world
from proxytune.toyworld.subjects import HELD_OUT
from proxytune.toyworld.tokenizer import MAX_LENGTH, bos_eos_ids, vocab_size, write_toy_tokenizer

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


def _rng(cfg: PretrainConfig, model: str, step: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, MODELS.index(model), step])


def _torch_gen(cfg: PretrainConfig, model: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(_rng(cfg, model, step).integers(2**62)))


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
            torch.manual_seed(int(_rng(self.cfg, self.name, step).integers(2**62)) ^ 1)
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


def _done(out: Path, name: str) -> bool:
    return (out / name / "done.json").exists()


def _augment(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild photometric noise: brightness/contrast jitter, pixel noise, an occasional blur."""
    B = pixels.shape[0]
    gain = 1 + 0.08 * (torch.rand(B, 1, 1, 1, generator=gen) * 2 - 1)
    bias = 0.06 * (torch.rand(B, 1, 1, 1, generator=gen) * 2 - 1)
    out = pixels * gain + bias
    out = out + torch.randn(out.shape, generator=gen) * 0.04 * torch.rand(B, 1, 1, 1, generator=gen)
    blur = F.avg_pool2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = (torch.rand(B, 1, 1, 1, generator=gen) < 0.3).float() * torch.rand(B, 1, 1, 1, generator=gen)
    return (out * (1 - mix) + blur * mix).clamp(-1, 1)


def _soften(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
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


# -----------------------------------------------------------------------------
# oracle


def fresh_renders(n: int, seed: int) -> tuple[np.ndarray, list[world.Attributes]]:
    """Renders never used in training (their own seed), with their attributes."""
    images, samples = world.sample_world(n, seed + 10_000, full_captions=True)
    return images, [s.attrs for s in samples]


def oracle_accuracy(model: oracle_lib.Oracle, images: np.ndarray, attrs: list[world.Attributes]) -> dict[str, float]:
    seen = oracle_lib.read(model, images)
    return {k: float(np.mean([s[k] == getattr(a, k) for s, a in zip(seen, attrs)])) for k in oracle_lib.HEADS}


def train_oracle(out: Path, cfg: PretrainConfig, data: WorldData) -> None:
    torch.manual_seed(cfg.seed)
    model = oracle_lib.Oracle()
    loop = Loop(out, cfg, "oracle", {"oracle": model}, model.parameters())
    model.train()
    for step in loop:
        rng, gen = _rng(cfg, "oracle", step), _torch_gen(cfg, "oracle", step)
        pixels, attrs, _ = data.batch(rng, loop.recipe.batch_size)
        logits = model(_soften(_augment(pixels, gen), gen))
        target = oracle_lib.targets(attrs)
        loop.update(sum(F.cross_entropy(logits[k], target[k]) for k in oracle_lib.HEADS))
    model.eval()
    images, attrs = fresh_renders(cfg.eval_samples, cfg.seed)
    accuracy = oracle_accuracy(model, images, attrs)
    oracle_lib.save(model, out / "oracle")
    loop.finish(out / "oracle", {"accuracy_fresh_renders": accuracy})


# -----------------------------------------------------------------------------
# encoders: CLIP and DINO


def _normalise(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    x = (pixels + 1) / 2
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def build_clip():
    from transformers import CLIPConfig, CLIPModel

    bos, eos = bos_eos_ids()
    text = dict(vocab_size=vocab_size(), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=128,
                bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    vision = dict(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, projection_dim=128)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=128))


def train_clip(out: Path, cfg: PretrainConfig, data: WorldData) -> None:
    from transformers import CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = out / "clip"
    tokenizer = CLIPTokenizer.from_pretrained(write_toy_tokenizer(out / "work" / "tokenizer"))
    torch.manual_seed(cfg.seed)
    model = build_clip()
    loop = Loop(out, cfg, "clip", {"clip": model}, model.parameters())
    model.train()
    for step in loop:
        rng, gen = _rng(cfg, "clip", step), _torch_gen(cfg, "clip", step)
        pixels, attrs, _ = data.batch(rng, loop.recipe.batch_size)
        tokens = tokenizer(data.captions(attrs, rng), padding="max_length", max_length=MAX_LENGTH, truncation=True,
                           return_tensors="pt")
        outputs = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                        pixel_values=_normalise(_augment(pixels, gen), CLIP_MEAN, CLIP_STD), return_loss=True)
        loop.update(outputs.loss)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(folder)
    loop.finish(folder, {"retrieval_top1": clip_retrieval(folder, cfg.seed, min(256, cfg.eval_samples))})


@torch.no_grad()
def clip_retrieval(folder: Path, seed: int, n: int = 256) -> float:
    """Top-1 text->image retrieval among n fresh renders with full captions (chance 1/n)."""
    from PIL import Image

    from proxytune.backends.encoders import load_clip

    encoder = load_clip(str(folder))
    images, samples = world.sample_world(n, seed + 20_000, full_captions=True)
    img = encoder.image_embeds([Image.fromarray(x) for x in images])
    txt = encoder.text_embeds([s.caption for s in samples])
    return float(((txt @ img.T).argmax(1) == torch.arange(n)).float().mean())


def _views(pixels: torch.Tensor, gen: torch.Generator, size: int = 224) -> torch.Tensor:
    """A random resized crop (scale 0.5-1) and flip of each picture, at the DINO input size."""
    B = pixels.shape[0]
    scale = (0.5 + 0.5 * torch.rand(B, generator=gen)).sqrt()
    flip = torch.where(torch.rand(B, generator=gen) < 0.5, -1.0, 1.0)
    shift = (1 - scale)[:, None] * (torch.rand(B, 2, generator=gen) * 2 - 1)
    theta = torch.zeros(B, 2, 3)
    # Resize(256) + CenterCrop(224) as in evaluation: the central 224/256 of the crop.
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip * 0.875, scale * 0.875
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, (B, 3, size, size), align_corners=False)
    return F.grid_sample(_augment(pixels, gen), grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def train_dino(out: Path, cfg: PretrainConfig, data: WorldData) -> None:
    from transformers import ViTConfig, ViTModel

    folder = out / "dino"
    torch.manual_seed(cfg.seed)
    model = ViTModel(ViTConfig(image_size=224, patch_size=28, hidden_size=128, intermediate_size=512,
                               num_hidden_layers=4, num_attention_heads=4), add_pooling_layer=False)
    head = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 128))
    loop = Loop(out, cfg, "dino", {"vit": model, "head": head}, [*model.parameters(), *head.parameters()])
    model.train()
    for step in loop:
        rng, gen = _rng(cfg, "dino", step), _torch_gen(cfg, "dino", step)
        pixels, _, _ = data.batch(rng, loop.recipe.batch_size)
        views = torch.cat([_views(pixels, gen), _views(pixels, gen)])
        z = F.normalize(head(model(pixel_values=_normalise(views, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state[:, 0]), dim=-1)
        sim = z @ z.T / 0.1
        sim.fill_diagonal_(-1e9)
        B = pixels.shape[0]
        target = torch.cat([torch.arange(B, 2 * B), torch.arange(B)])
        loop.update(F.cross_entropy(sim, target))  # NT-Xent: each view's positive is its twin
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    loop.finish(folder, {"identity_retrieval_top1": dino_identity_retrieval(folder, cfg.seed, min(200, cfg.eval_samples))})


@torch.no_grad()
def dino_identity_retrieval(folder: Path, seed: int, n: int = 200) -> float:
    """For n objects drawn twice (other scene, place and size), how often the nearest of the second
    draws to a first draw is its twin (chance 1/n): the subject-fidelity signal DINO is used for."""
    from PIL import Image

    from proxytune.backends.encoders import load_dino

    rng = np.random.default_rng(seed + 30_000)
    first, second = [], []
    for _ in range(n):
        a = world.sample_attributes(rng)
        b = world.Attributes(*a.identity(), scene=world.SCENES[rng.integers(len(world.SCENES))])
        a = world.Attributes(*a.identity(), scene=a.scene)
        first.append(Image.fromarray(world.render(a, world.sample_layout(rng, a))))
        second.append(Image.fromarray(world.render(b, world.sample_layout(rng, b))))
    encoder = load_dino(str(folder))
    e1, e2 = encoder.image_embeds(first), encoder.image_embeds(second)
    return float(((e1 @ e2.T).argmax(1) == torch.arange(n)).float().mean())


# -----------------------------------------------------------------------------
# toy-sd: VAE, then a UNet on its latents


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 64, 128),
                         layers_per_block=1, latent_channels=8, norm_num_groups=8, sample_size=64)


def train_vae(out: Path, cfg: PretrainConfig, data: WorldData) -> None:
    folder = out / "vae"
    torch.manual_seed(cfg.seed)
    vae = build_vae()
    loop = Loop(out, cfg, "vae", {"vae": vae}, vae.parameters())
    vae.train()
    for step in loop:
        rng, gen = _rng(cfg, "vae", step), _torch_gen(cfg, "vae", step)
        pixels, _, _ = data.batch(rng, loop.recipe.batch_size)
        posterior = vae.encode(pixels).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels) + 1e-6 * posterior.kl().mean()
        loop.update(loss)
    vae.eval()
    with torch.no_grad():  # SD's convention: scale latents to unit variance
        pixels, _, _ = data.batch(np.random.default_rng(cfg.seed), 512)
        std = float(vae.encode(pixels).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(folder, safe_serialization=True)
    loop.finish(folder, {"scaling_factor": 1.0 / std, **reconstruction_accuracy(out, cfg, "vae")})


@torch.no_grad()
def reconstruction_accuracy(out: Path, cfg: PretrainConfig, which: str, n: int = 256) -> dict:
    """Oracle accuracy on autoencoded fresh renders: the ceiling a generator over these latents has."""
    from diffusers import AutoencoderKL, VQModel

    images, attrs = fresh_renders(min(n, cfg.eval_samples), cfg.seed)
    pixels = oracle_lib.to_pixels(images)
    if which == "vae":
        model = AutoencoderKL.from_pretrained(out / "vae")
        recon = model.decode(model.encode(pixels).latent_dist.mean).sample
    else:
        model = VQModel.from_pretrained(out / "vq")
        recon = model.decode(model.encode(pixels).latents).sample
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    oracle = oracle_lib.load(out / "oracle")
    return {"oracle_on_reconstructions": oracle_accuracy(oracle, recon, attrs),
            "reconstruction_l1": float((torch.from_numpy(recon).float() - torch.from_numpy(images).float()).abs().mean() / 255)}


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=8, out_channels=8, block_out_channels=(80, 160), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=8, norm_num_groups=16,
    )


def _sd_pipeline(out: Path, unet):
    """The toy-sd pipeline around `unet`: toy VAE, toy-clip's text tower and tokenizer, DDIM."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    clip = CLIPModel.from_pretrained(out / "clip")
    text_encoder = CLIPTextModel(clip.config.text_config)
    # transformers 4 wraps the tower in .text_model, transformers 5 does not
    getattr(text_encoder, "text_model", text_encoder).load_state_dict(clip.text_model.state_dict())
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=AutoencoderKL.from_pretrained(out / "vae"), text_encoder=text_encoder.eval(),
                                   tokenizer=CLIPTokenizer.from_pretrained(out / "clip"), unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_sd(out: Path, cfg: PretrainConfig, data: WorldData) -> None:
    """The UNet learns on the VAE's latents. The text encoder starts as toy-clip's text tower; with
    `text_lr_scale` > 0 it learns with the UNet (toy-clip's contrastive loss trains only the end token,
    while the UNet's cross-attention reads every token's state). With it frozen, the UNet stalled at
    about 50 % prompt accuracy (README, Toy world)."""
    from diffusers import DDPMScheduler

    from proxytune.backends import diffusion

    folder = out / "sd"
    recipe = cfg.recipes["sd"]
    torch.manual_seed(cfg.seed)
    unet = build_unet()
    pipe = _sd_pipeline(out, unet)
    pipe.vae.requires_grad_(False)
    text_encoder = pipe.text_encoder
    train_text = recipe.text_lr_scale > 0
    text_encoder.requires_grad_(train_text)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    snr = noise_scheduler.alphas_cumprod / (1 - noise_scheduler.alphas_cumprod)
    latents_all = _encode_all(pipe.vae, data)
    params = [{"params": list(unet.parameters())}]
    if train_text:
        params.append({"params": list(text_encoder.parameters()), "lr_scale": recipe.text_lr_scale})
    modules = {"unet": unet, "text_encoder": text_encoder} if train_text else {"unet": unet}
    loop = Loop(out, cfg, "sd", modules, params)
    unet.train()
    text_encoder.train(train_text)
    for step in loop:
        rng, gen = _rng(cfg, "sd", step), _torch_gen(cfg, "sd", step)
        idx = rng.integers(len(data), size=recipe.batch_size)
        captions = [c if rng.random() >= 0.1 else "" for c in data.captions([data.attrs[i] for i in idx], rng)]
        latents = latents_all[idx]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        with torch.set_grad_enabled(train_text):
            text = diffusion.encode_prompts(pipe, captions)["prompt_embeds"]
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=text).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        if recipe.min_snr_gamma > 0:  # epsilon target: weight min(SNR, gamma) / SNR
            per_sample = per_sample * snr[t].clamp(max=recipe.min_snr_gamma) / snr[t]
        loop.update(per_sample.mean())
    unet.eval()
    text_encoder.eval()
    pipe.save_pretrained(folder, safe_serialization=True)
    loop.finish(folder, {})


@torch.no_grad()
def _encode_all(vae, data: WorldData, batch: int = 256) -> torch.Tensor:
    """Scaled latents (posterior means) of every pretraining picture."""
    chunks = []
    for start in tqdm(range(0, len(data), batch), desc="encode latents", disable=None):
        pixels = data.images[start : start + batch].float() / 127.5 - 1.0
        chunks.append(vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(chunks)


# -----------------------------------------------------------------------------
# toy-llamagen: VQ tokenizer, then the LlamaGen student and its T5 text encoder

COND_LEN = 24


def build_vq(codes: int):
    from diffusers import VQModel

    return VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 64, 128), layers_per_block=1,
                   latent_channels=32, vq_embed_dim=8, num_vq_embeddings=codes, norm_num_groups=8, sample_size=64)


def train_vq(out: Path, cfg: PretrainConfig, data: WorldData) -> None:
    folder = out / "vq"
    torch.manual_seed(cfg.seed)
    vq = build_vq(cfg.vq_codes)
    loop = Loop(out, cfg, "vq", {"vq": vq}, vq.parameters())
    vq.train()
    usage = torch.zeros(cfg.vq_codes)
    for step in loop:
        rng, gen = _rng(cfg, "vq", step), _torch_gen(cfg, "vq", step)
        pixels, _, _ = data.batch(rng, loop.recipe.batch_size)
        latents = vq.encode(pixels).latents
        quant, commit, (_, _, indices) = vq.quantize(latents)
        recon = vq.decode(quant, force_not_quantize=True).sample
        loop.update(F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels) + commit)
        usage += torch.bincount(indices.flatten(), minlength=cfg.vq_codes)
        if (step + 1) % 100 == 0 and step + 1 < loop.recipe.steps * 0.8:
            _restart_dead_codes(vq, latents.detach(), usage, gen)
            usage.zero_()
    vq.eval()
    vq.save_pretrained(folder, safe_serialization=True)
    loop.finish(folder, reconstruction_accuracy(out, cfg, "vq"))


@torch.no_grad()
def _restart_dead_codes(vq, latents: torch.Tensor, usage: torch.Tensor, gen: torch.Generator) -> None:
    """Codes no picture used in the last 100 steps move onto random encoder outputs (with jitter)."""
    dead = (usage == 0).nonzero().flatten()
    if len(dead) == 0:
        return
    z = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    pick = torch.randint(0, len(z), (len(dead),), generator=gen)
    vq.quantize.embedding.weight[dead] = z[pick] + 0.01 * torch.randn(len(dead), z.shape[1], generator=gen)


def _llamagen_folder(out: Path, cfg: PretrainConfig, folder: Path) -> None:
    """A student folder with random transformer and T5 weights around the trained VQ."""
    import shutil

    from transformers import T5Config, T5EncoderModel

    from proxytune.backends import llamagen_model

    bos, eos = bos_eos_ids()
    config = llamagen_model.LlamaGenStudentConfig(
        codebook_size=cfg.vq_codes, hidden_size=192, num_hidden_layers=5, num_attention_heads=6,
        intermediate_size=llamagen_model.llamagen_ffn_dim(192, multiple_of=64), cond_len=COND_LEN, text_dim=128, grid_size=8,
        initializer_range=0.02,
    )
    llamagen_model.LlamaGenStudent(config).save_pretrained(folder / "transformer", safe_serialization=True)
    t5 = T5EncoderModel(T5Config(vocab_size=vocab_size(), d_model=128, d_kv=32, d_ff=512, num_layers=3, num_heads=4,
                                 dropout_rate=0.0, pad_token_id=eos, eos_token_id=eos, decoder_start_token_id=eos))
    t5.save_pretrained(folder / "text_encoder", safe_serialization=True)
    write_toy_tokenizer(folder / "tokenizer", model_max_length=COND_LEN)
    shutil.copytree(out / "vq", folder / "vqvae", ignore=shutil.ignore_patterns("done.json"))
    (folder / "proxytune_student.json").write_text(json.dumps({"backend": "llamagen", "image_size": 64}) + "\n")


def train_llamagen(out: Path, cfg: PretrainConfig, data: WorldData) -> None:
    from proxytune.backends import llamagen

    folder = out / "llamagen"
    init = out / "work" / "llamagen-init"
    if not (init / "proxytune_student.json").exists():
        torch.manual_seed(cfg.seed)
        _llamagen_folder(out, cfg, init)
    bundle = llamagen.load_student(str(init))  # the loader a student checkpoint takes
    codes_all = _codes_all(bundle, data)
    model, text_encoder = bundle.model, bundle.text_encoder
    for part in (model, text_encoder):
        part.train().requires_grad_(True)
    loop = Loop(out, cfg, "llamagen", {"transformer": model, "text_encoder": text_encoder},
                [*model.parameters(), *text_encoder.parameters()])
    for step in loop:
        rng, gen = _rng(cfg, "llamagen", step), _torch_gen(cfg, "llamagen", step)
        idx = rng.integers(len(data), size=loop.recipe.batch_size)
        with _mixed_precision(loop.recipe.bf16):
            cond = bundle.caption_features(data.captions([data.attrs[i] for i in idx], rng))
            loss = bundle.loss(cond, codes_all[idx], cfg_dropout=0.1, generator=gen)
        loop.update(loss)
    model.eval()
    text_encoder.eval()
    import shutil

    tmp = out / "work" / "llamagen-final"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(init, tmp)
    model.save_pretrained(tmp / "transformer", safe_serialization=True)
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    loop.finish(folder, {})


def _mixed_precision(bf16: bool):
    """bfloat16 autocast for a training step on the CPU. The attention runs on SDPA's math kernel: the
    CPU flash kernel's bfloat16 backward is several times slower than its float32 one."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not bf16:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


@torch.no_grad()
def _codes_all(bundle, data: WorldData, batch: int = 256) -> torch.Tensor:
    chunks = []
    for start in tqdm(range(0, len(data), batch), desc="encode codes", disable=None):
        chunks.append(bundle.encode_images(data.images[start : start + batch].float() / 127.5 - 1.0))
    return torch.cat(chunks)


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
    todo = [m for m in MODELS if (only is None or m in only) and not _done(out, m)]
    for name in todo:
        missing = [n for n in NEEDS.get(name, ()) if n not in todo and not _done(out, n)]
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
        if _done(out, name):
            continue
        while not all(_done(out, need) for need in NEEDS.get(name, ())):
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
