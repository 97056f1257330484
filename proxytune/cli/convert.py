"""`proxytune convert ...`: original checkpoints -> proxytune student folders (and StyleAR's release ->
a style student's adapter).

One subcommand per student family that has a converter (its record's `convert`, read when the CLI lists or
runs one), plus the image tokenizer (`vqgan`) and StyleAR's release (`stylear`), which are no family's.
"""

from __future__ import annotations

from pathlib import Path

import click

from proxytune.cli.common import user_errors
from proxytune.errors import ProxytuneError
from proxytune.files import check_new_folder


class FamilyCommands(click.Group):
    """A click group whose subcommands are its own plus each student family's converter."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from proxytune.backends import students

        families = [name for name, record in students.families().items() if record.convert is not None]
        return sorted({*families, *super().list_commands(ctx)})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        from proxytune.backends import students

        record = students.families().get(name)
        if record is None or record.convert is None:
            return super().get_command(ctx, name)
        command = record.convert()
        if not getattr(command.callback, "user_errors", False):  # once: a record may hand out the same command
            command.callback = user_errors(command.callback)
            command.callback.user_errors = True
        return command


@click.group(cls=FamilyCommands)
def convert() -> None:
    """Convert original checkpoints into proxytune student folders."""


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
