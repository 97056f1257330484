"""`proxytune convert ...`: original checkpoints -> proxytune student folders (and StyleAR's release ->
a style student's adapter)."""

from __future__ import annotations

from pathlib import Path

import click

from proxytune.cli.common import user_errors
from proxytune.errors import ProxytuneError
from proxytune.files import check_new_folder


@click.group()
def convert() -> None:
    """Convert original checkpoints into proxytune student folders."""


@convert.command(name="llamagen")
@click.argument("gpt_checkpoint", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option("--vq", "vq", required=True, type=click.Path(),
              help="The VQ tokenizer: the original vq_ds16_t2i.pt (converted here) or a diffusers VQModel folder.")
@click.option("--text-encoder", default="google/flan-t5-xl", show_default=True,
              help="T5 caption encoder: hub id or folder (a folder is recorded as an absolute path).")
@click.option("--image-size", type=click.IntRange(min=1), default=None,
              help="Pixels per side (a multiple of the VQ's downsampling): 256 for t2i_XL_stage1_256.pt, 512 for "
                   "t2i_XL_stage2_512.pt. Default: the size the checkpoint's training arguments record, else 256.")
@click.option("--cond-len", type=click.IntRange(min=1), default=120, show_default=True,
              help="Caption slots the checkpoint was trained with (LlamaGen's --cls-token-num).")
@click.option("--heads", type=click.IntRange(min=1), default=None,
              help="Attention heads; default: the original GPT preset of the checkpoint's width (XL: 20).")
@user_errors
def convert_llamagen(gpt_checkpoint: str, out_dir: str, vq: str, text_encoder: str, image_size: int | None,
                     cond_len: int, heads: int | None) -> None:
    """A LlamaGen T2I GPT checkpoint (original keys) -> a student folder for `student.model`.

    The architecture (width, depth, vocabulary, caption width, FFN width) is read from the checkpoint."""
    import tempfile

    from proxytune.backends import llamagen_convert, vqgan

    check_new_folder(out_dir)
    image_size, note = llamagen_convert.resolve_image_size(gpt_checkpoint, image_size)
    if note:
        click.echo(f"note: {note}", err=True)
    with tempfile.TemporaryDirectory(dir=Path(out_dir).resolve().parent) as scratch:
        vq_folder = Path(vq)
        if vq_folder.is_file():  # the original tokenizer checkpoint: convert it first
            vq_folder = vqgan.convert_file(vq, Path(scratch) / "vqvae", layout="llamagen", image_size=image_size)
        folder = llamagen_convert.convert_to_student_folder(gpt_checkpoint, out_dir, vq_folder=vq_folder, image_size=image_size,
                                                    cond_len=cond_len, num_heads=heads, text_encoder=text_encoder)
    click.echo(f"wrote {folder} (backend llamagen, {image_size} px); use it as student.model")


@convert.command(name="vqgan")
@click.argument("checkpoint", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option("--layout", type=click.Choice(["llamagen", "taming"]), required=True,
              help="llamagen: vq_ds16_t2i.pt and other LlamaGen VQ checkpoints; taming: Chameleon's vqgan.ckpt "
                   "(Lumina-mGPT's tokenizer) and other taming-transformers VQGANs.")
@click.option("--image-size", type=click.IntRange(min=8), default=256, show_default=True,
              help="Pixels per side the tokenizer is used at (recorded as sample_size).")
@user_errors
def convert_vqgan(checkpoint: str, out_dir: str, layout: str, image_size: int) -> None:
    """An original VQGAN image tokenizer -> a diffusers VQModel folder (encoder, codebook, decoder)."""
    from proxytune.backends import vqgan

    check_new_folder(out_dir)
    folder = vqgan.convert_file(checkpoint, out_dir, layout=layout, image_size=image_size)
    click.echo(f"wrote {folder} (diffusers VQModel, {layout} layout)")


@convert.command(name="lumina-mgpt")
@click.argument("model")
@click.argument("out_dir", type=click.Path())
@click.option("--vqgan", "vqgan_checkpoint", required=True, type=click.Path(),
              help="Chameleon's tokenizer checkpoint (vqgan.ckpt, or a .safetensors with its keys).")
@click.option("--image-size", type=click.IntRange(min=16), default=512, show_default=True,
              help="Pixels per side the checkpoint generates (a multiple of 32: Lumina-mGPT's size tokens count 32 px steps).")
@click.option("--tokenizer", default=None, help="Text tokenizer (hub id or folder) when MODEL has none; default MODEL.")
@user_errors
def convert_lumina(model: str, out_dir: str, vqgan_checkpoint: str, image_size: int, tokenizer: str | None) -> None:
    """A Lumina-mGPT (Chameleon-format) MODEL, hub id or folder, + Chameleon's VQGAN -> a student folder.

    The folder holds the converted VQGAN and names MODEL; the Chameleon weights are not copied."""
    from proxytune.backends import lumina_convert

    check_new_folder(out_dir)
    meta = lumina_convert.convert_to_student_folder(model, out_dir, vqgan_checkpoint, image_size=image_size,
                                                    tokenizer=tokenizer)
    out, source = Path(out_dir), meta["model"]
    click.echo(f"wrote {out} (backend lumina-mgpt, {image_size} px, weights from {source}); use it as student.model")


@convert.command(name="janus")
@click.argument("src")
@click.argument("out_dir", type=click.Path())
@user_errors
def convert_janus(src: str, out_dir: str) -> None:
    """deepseek-ai/Janus-Pro-1B or -7B as released (model_type multi_modality), a folder or a hub id in the
    local Hugging Face cache -> transformers' Janus layout in OUT_DIR, for `student.model`.

    The weights keep the release's dtype (bf16); the folder is written whole or not at all."""
    from proxytune.backends import janus_convert

    check_new_folder(out_dir)
    meta = janus_convert.convert_release(src, out_dir)
    click.echo(f"wrote {out_dir} (backend janus, {meta['image_size']} px, {meta['dtype']}, {meta['tensors']} tensors); "
               "use it as student.model")


@convert.command(name="stylear")
@click.argument("model_dir", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option("--base-model", default="Alpha-VLLM/Lumina-mGPT-7B-768", show_default=True,
              help="The Lumina-mGPT (Chameleon) model the LoRA belongs to, recorded in the adapter config.")
@click.option("--dim-head", type=click.IntRange(min=1), default=64, show_default=True,
              help="Resampler attention head width (the weights only give heads x dim_head; StyleAR: 12 x 64).")
@user_errors
def convert_stylear(model_dir: str, out_dir: str, base_model: str, dim_head: int) -> None:
    """StyleAR's released MODEL_DIR (model.safetensors + image_proj.pth) -> a peft adapter, the style
    resampler (safetensors) and its inference settings, in OUT_DIR.

    The folder loads with proxytune.backends.stylear.style_student.StyleStudent.load (a style student's layout)."""
    from proxytune.backends.stylear import stylear_convert

    check_new_folder(out_dir)
    if not Path(model_dir).is_dir():
        what = "a file, not" if Path(model_dir).exists() else "no such folder; give"
        raise ProxytuneError(f"{model_dir}: {what} StyleAR's released folder (model.safetensors + image_proj.pth)")
    meta = stylear_convert.convert_released(model_dir, out_dir, base_model=base_model, dim_head=dim_head)
    click.echo(f"wrote {out_dir} (StyleAR: LoRA rank {meta['lora_rank']} on {meta['lora_modules']} modules of "
               f"{base_model}, resampler of {meta['num_style_tokens']} style tokens"
               + (f"; {meta['ignored_keys']} non-LoRA keys ignored" if meta["ignored_keys"] else "") + ")")
