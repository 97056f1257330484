"""Pretraining recipes of the toy world's readers: the oracle (supervised attribute classifier),
toy-clip (contrastive on image and caption) and toy-dino (SimCLR on two views, no labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from proxytune.toyworld import oracle as oracle_lib
from proxytune.toyworld import world
from proxytune.toyworld.pretrain_loop import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, Loop, PretrainConfig,
                                              WorldData, augment, step_rng, soften, step_generator, fresh_renders,
                                              oracle_accuracy)
from proxytune.toyworld.tokenizer import MAX_LENGTH, bos_eos_ids, vocab_size, write_toy_tokenizer

def train_oracle(out: Path, cfg: PretrainConfig, data: WorldData) -> None:
    torch.manual_seed(cfg.seed)
    model = oracle_lib.Oracle()
    loop = Loop(out, cfg, "oracle", {"oracle": model}, model.parameters())
    model.train()
    for step in loop:
        rng, gen = step_rng(cfg, "oracle", step), step_generator(cfg, "oracle", step)
        pixels, attrs, _ = data.batch(rng, loop.recipe.batch_size)
        logits = model(soften(augment(pixels, gen), gen))
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
        rng, gen = step_rng(cfg, "clip", step), step_generator(cfg, "clip", step)
        pixels, attrs, _ = data.batch(rng, loop.recipe.batch_size)
        tokens = tokenizer(data.captions(attrs, rng), padding="max_length", max_length=MAX_LENGTH, truncation=True,
                           return_tensors="pt")
        outputs = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                        pixel_values=_normalise(augment(pixels, gen), CLIP_MEAN, CLIP_STD), return_loss=True)
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
    return F.grid_sample(augment(pixels, gen), grid, mode="bilinear", padding_mode="reflection", align_corners=False)


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
        rng, gen = step_rng(cfg, "dino", step), step_generator(cfg, "dino", step)
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


