"""The codes stage's output as the student stage reads it: codes.safetensors (the proxy set as the
student's image tokens), checked against the model and proxy set it must have been made for."""

from __future__ import annotations

from pathlib import Path

import torch

from proxytune import layout
from proxytune.errors import ProxytuneError
from proxytune.outputs import CodesMetadata


def load_codes(folder: Path, *, model: str, proxy_digest: str) -> dict[str, torch.Tensor]:
    """The codes stage's tensors, checked against the model and proxy set the caller trains on.

    Raises:
        ProxytuneError: missing, unreadable metadata, or made for another model or proxy set (re-run
            `proxytune apply`).
    """
    from safetensors.torch import load_file

    path = folder / layout.CODES_FILE
    meta = CodesMetadata.read_safetensors(path)  # the model the codes stage wrote it with
    if meta.model != model or meta.proxy_digest != proxy_digest:
        raise ProxytuneError(f"{path}: made for model {meta.model!r} and another proxy set; re-run `proxytune apply`")
    return load_file(path)
