"""Pretraining recipes of the toy world's generators: toy-sd (a VAE, then a UNet on its latents
with toy-clip's text tower) and toy-llamagen (a VQ tokenizer, then the LlamaGen student and its T5
text encoder)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from proxytune.backends.students.meta import STUDENT_META
from proxytune.toyworld import oracle as oracle_lib
from proxytune.toyworld.pretrain_loop import (Loop, PretrainConfig, WorldData, step_rng, step_generator,
                                              fresh_renders, oracle_accuracy)
from proxytune.toyworld.tokenizer import bos_eos_ids, vocab_size, write_toy_tokenizer

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
        rng, gen = step_rng(cfg, "vae", step), step_generator(cfg, "vae", step)
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

    from proxytune.backends.teachers import diffusion

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
        rng, gen = step_rng(cfg, "sd", step), step_generator(cfg, "sd", step)
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
        rng, gen = step_rng(cfg, "vq", step), step_generator(cfg, "vq", step)
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

    from proxytune.backends.students.llamagen import model as llamagen_model

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
    (folder / STUDENT_META).write_text(json.dumps({"backend": "llamagen", "image_size": 64}) + "\n")


def train_llamagen(out: Path, cfg: PretrainConfig, data: WorldData) -> None:
    from proxytune.backends.students.llamagen import backend as llamagen

    folder = out / "llamagen"
    init = out / "work" / "llamagen-init"
    if not (init / STUDENT_META).exists():
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
        rng, gen = step_rng(cfg, "llamagen", step), step_generator(cfg, "llamagen", step)
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


