"""`proxytune convert lumina-mgpt`: a Lumina-mGPT (Chameleon) model + its VQGAN -> a student folder.

No error handling here: `proxytune convert` (cli/convert.py) prints a ProxytuneError as one line.
"""

from __future__ import annotations

from pathlib import Path

import click

from proxytune.files import check_new_folder


@click.command(name="lumina-mgpt")
@click.argument("model")
@click.argument("out_dir", type=click.Path())
@click.option("--vqgan", "vqgan_checkpoint", required=True, type=click.Path(),
              help="Chameleon's tokenizer checkpoint (vqgan.ckpt, or a .safetensors with its keys).")
@click.option("--image-size", type=click.IntRange(min=16), default=512, show_default=True,
              help="Pixels per side the checkpoint generates (a multiple of 32: Lumina-mGPT's size tokens count 32 px steps).")
@click.option("--tokenizer", default=None, help="Text tokenizer (hub id or folder) when MODEL has none; default MODEL.")
def convert_lumina(model: str, out_dir: str, vqgan_checkpoint: str, image_size: int, tokenizer: str | None) -> None:
    """A Lumina-mGPT (Chameleon-format) MODEL, hub id or folder, + Chameleon's VQGAN -> a student folder.

    The folder holds the converted VQGAN and names MODEL; the Chameleon weights are not copied."""
    from proxytune.backends.students.lumina import convert as lumina_convert

    check_new_folder(out_dir)
    meta = lumina_convert.convert_to_student_folder(model, out_dir, vqgan_checkpoint, image_size=image_size,
                                                    tokenizer=tokenizer)
    out, source = Path(out_dir), meta["model"]
    click.echo(f"wrote {out} (backend lumina-mgpt, {image_size} px, weights from {source}); use it as student.model")
