"""`proxytune convert llamagen`: an original LlamaGen T2I checkpoint -> a student folder.

No error handling here: `proxytune convert` (cli/convert.py) prints a ProxytuneError as one line.
"""

from __future__ import annotations

from pathlib import Path

import click

from proxytune.files import check_new_folder


@click.command(name="llamagen")
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
def convert_llamagen(gpt_checkpoint: str, out_dir: str, vq: str, text_encoder: str, image_size: int | None,
                     cond_len: int, heads: int | None) -> None:
    """A LlamaGen T2I GPT checkpoint (original keys) -> a student folder for `student.model`.

    The architecture (width, depth, vocabulary, caption width, FFN width) is read from the checkpoint."""
    import tempfile

    from proxytune.backends import vqgan

    from proxytune.backends.students.llamagen import convert as llamagen_convert

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
