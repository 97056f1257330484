"""`proxytune convert janus`: Janus-Pro as released -> transformers' Janus layout.

No error handling here: `proxytune convert` (cli/convert.py) prints a ProxytuneError as one line.
"""

from __future__ import annotations

import click

from proxytune.files import check_new_folder


@click.command(name="janus")
@click.argument("src")
@click.argument("out_dir", type=click.Path())
def convert_janus(src: str, out_dir: str) -> None:
    """deepseek-ai/Janus-Pro-1B or -7B as released (model_type multi_modality), a folder or a hub id in the
    local Hugging Face cache -> transformers' Janus layout in OUT_DIR, for `student.model`.

    The weights keep the release's dtype (bf16); the folder is written whole or not at all."""
    from proxytune.backends.students.janus import convert as janus_convert

    check_new_folder(out_dir)
    meta = janus_convert.convert_release(src, out_dir)
    click.echo(f"wrote {out_dir} (backend janus, {meta['image_size']} px, {meta['dtype']}, {meta['tensors']} tensors); "
               "use it as student.model")
