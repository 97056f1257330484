"""Reading checkpoints: original (non-diffusers, non-transformers) files without running pickled code, and
transformers loads whose report proxytune turns into its own one-line errors."""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path

import torch

from proxytune.errors import ProxytuneError, first_line

@contextmanager
def transformers_errors_only():
    """Silence transformers' warnings for the duration: its load report, whose findings (missing or
    mismatched keys) the caller checks and raises as one line."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# Top-level entries a training checkpoint may keep its weights under (LlamaGen's also hold
# "optimizer", "steps" and an argparse "args"; Lightning's "state_dict"); otherwise the file is the
# bare state dict.
WEIGHT_ENTRIES = ("model", "module", "state_dict")


def read_state_dict(path: str | Path, *, label: str) -> dict[str, torch.Tensor]:
    """The weights of an original checkpoint file.

    `.safetensors` files are read with safetensors; anything else with
    torch.load(weights_only=True), allowing only argparse.Namespace beyond tensors and plain
    containers (LlamaGen's training script stores its arguments as one). The weights are taken
    from the first of WEIGHT_ENTRIES present, else the file is the state dict.

    Args:
        path: the checkpoint file.
        label: what the file is, for error messages ("LlamaGen checkpoint").
    Raises:
        ProxytuneError: the file is missing, unreadable, needs arbitrary code to unpickle, or holds no dict.
    """
    path = Path(path)
    if path.is_dir():
        raise ProxytuneError(f"{label} {str(path)!r}: a folder, not a checkpoint file")
    if not path.is_file():
        raise ProxytuneError(f"{label} {str(path)!r}: no such file")
    if path.stat().st_size == 0:
        raise ProxytuneError(f"{label} {str(path)!r}: an empty file (0 bytes), not a checkpoint; download it again")
    if path.suffix != ".safetensors":
        with open(path, "rb") as handle:
            head = handle.read(2)
        if head != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip archive; older files are a pickle
            raise ProxytuneError(f"{label} {str(path)!r}: not a PyTorch checkpoint (neither a zip archive nor a pickle); "
                                 "check that the download is complete and is the right file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            ckpt = load_file(path)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # refused by weights_only, corrupt archive, bad safetensors header
        raise ProxytuneError(
            f"{label} {str(path)!r}: cannot read it as weights only ({first_line(err)}); if you trust the file, "
            "re-save its state dict with safetensors and pass that"
        ) from None
    if not isinstance(ckpt, dict):
        raise ProxytuneError(f"{label} {str(path)!r}: holds a {type(ckpt).__name__}, not a state dict")
    for entry in WEIGHT_ENTRIES:
        if isinstance(ckpt.get(entry), dict):
            return ckpt[entry]
    return ckpt


def tensors_only(state: dict, *, label: str) -> dict[str, torch.Tensor]:
    """`state` itself, once every value is a tensor (a converter reads shapes and dtypes from them).

    Raises:
        ProxytuneError: one line naming `label` (the file) and the first key that holds something else.
    """
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ProxytuneError(f"{label}: key {key!r} holds a {type(value).__name__}, not a tensor")
    return state
