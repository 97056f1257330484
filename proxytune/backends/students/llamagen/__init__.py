"""LlamaGen (Sun et al. 2024): a Llama decoder over VQ codes, captioned by FLAN-T5, in proxytune's own layout.

Its record: no config.json model type (proxytune_student.json says "llamagen", or a folder with that file
and no config.json, as older folders are); `proxytune convert llamagen` turns an original GPT checkpoint
into such a folder. Modules: model (the decoder), backend (the StudentBackend), convert (original
checkpoints), tiny (tiny-llamagen), command (the CLI).
"""

from __future__ import annotations

from pathlib import Path

from proxytune.backends.students import SamplerDefaults, StudentFamily, TinyStudent, lazy, lazy_attribute

# LlamaGen autoregressive/sample/sample_t2i.py: --cfg-scale 7.5, --top-k 1000, --temperature 1.0
SAMPLING = SamplerDefaults(cfg_scale=7.5, top_k=1000, temperature=1.0, source="LlamaGen sample_t2i.py")
ORIGINAL_DROPOUT = 0.1  # LlamaGen's train_t2i.py: --dropout-p (residual, FFN) and --token-dropout-p


def check_folder(folder: Path, meta, config, checks) -> None:
    """transformer/ with its weights, and the VQ, the text encoder and its tokenizer: subfolders, or the
    folders / hub ids proxytune_student.json names (a converted folder names google/flan-t5-xl)."""
    checks.weights(folder / "transformer", "student transformer")
    checks.part(folder, meta, "vqvae", "weights")
    checks.part(folder, meta, "text_encoder", "weights")
    checks.part(folder, meta, "tokenizer", "tokenizer")


FAMILY = StudentFamily(
    name="llamagen", label="LlamaGen", load=lazy(f"{__name__}.backend:load"), sampling=SAMPLING,
    convert=lazy_attribute(f"{__name__}.command:convert_llamagen"),
    tiny={"tiny-llamagen": TinyStudent("tiny-llamagen-v2", lazy(f"{__name__}.tiny:build"))}, check_folder=check_folder,
    dropout=ORIGINAL_DROPOUT,
    decoder_layers=("LlamaDecoderLayer",),
)
