"""The codes stage's output as the student stage reads it: codes.safetensors (the proxy set as the
student's image tokens), checked against the model and proxy set it must have been made for."""

from __future__ import annotations

from pathlib import Path

import torch

from proxytune import layout


def load_codes(folder: Path, *, model: str, proxy_digest: str) -> dict[str, torch.Tensor]:
    """The codes stage's tensors, checked against the model and proxy set the caller trains on.

    Raises:
        ProxytuneError: missing, or made for another model or proxy set (re-run `proxytune apply`).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from proxytune.errors import ProxytuneError

    path = folder / layout.CODES_FILE
    if not path.exists():
        raise ProxytuneError(f"{path}: missing (run the codes stage first: proxytune apply)")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("model") != model or meta.get("proxy_digest") != proxy_digest:
        raise ProxytuneError(f"{path}: made for model {meta.get('model')!r} and another proxy set; re-run `proxytune apply`")
    return load_file(path)
