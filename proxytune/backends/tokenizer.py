"""A character-level CLIP BPE vocabulary, built locally so tiny models need no download.

It is written in the same two files (vocab.json, merges.txt) a hub CLIP tokenizer ships, so the
tiny path loads it with the same `from_pretrained` call a real checkpoint takes.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Their ids: the vocab is 256 byte characters, the same 256 with "</w>", then BOS and EOS.
BOS_ID, EOS_ID = 512, 513


def _byte_alphabet() -> list[str]:
    # GPT-2/CLIP byte-level BPE maps every byte to a printable unicode character; the same table
    # here means any input text tokenizes (into characters, since there are no merges).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_char_clip_tokenizer(directory: Path, *, model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json for a char-level CLIP tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for ch in _byte_alphabet():
        vocab[ch] = len(vocab)
    for ch in _byte_alphabet():
        vocab[ch + "</w>"] = len(vocab)
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    assert (vocab[BOS], vocab[EOS]) == (BOS_ID, EOS_ID)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


def char_vocab_size() -> int:
    return EOS_ID + 1
