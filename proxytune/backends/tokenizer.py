"""Character-level tokenizers built locally, so tiny models need no download.

`write_char_clip_tokenizer`: a CLIP BPE vocabulary in the same two files (vocab.json, merges.txt) a
hub CLIP tokenizer ships. `write_char_bpe_tokenizer`: a byte-level tokenizer.json whose special tokens
sit at chosen ids (the real model's), adding BOS only, as Llama-family tokenizers do. Either loads
with the same `from_pretrained` call a real checkpoint takes.
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


def char_vocab() -> dict[str, int]:
    """The byte characters, the same with "</w>", then BOS and EOS: a CLIP vocabulary with no merges."""
    vocab: dict[str, int] = {}
    for ch in _byte_alphabet():
        vocab[ch] = len(vocab)
    for ch in _byte_alphabet():
        vocab[ch + "</w>"] = len(vocab)
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    assert (vocab[BOS], vocab[EOS]) == (BOS_ID, EOS_ID)
    return vocab


def write_clip_bpe(directory: Path, vocab: dict[str, int], merges: list[tuple[str, str]], *, model_max_length: int) -> Path:
    """Write a CLIP BPE tokenizer folder: vocab.json, merges.txt (in rank order), tokenizer_config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
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


def write_char_clip_tokenizer(directory: Path, *, model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json for a char-level CLIP tokenizer."""
    return write_clip_bpe(directory, char_vocab(), [], model_max_length=model_max_length)


def char_vocab_size() -> int:
    return EOS_ID + 1


def write_char_bpe_tokenizer(
    directory: Path,
    entries: dict[str, int],
    *,
    special: list[str],
    bos: str,
    eos: str,
    pad: str,
    unk: str | None = None,
    model_max_length: int = 128,
) -> Path:
    """Write a byte-level character tokenizer (tokenizer.json, no merges) with fixed ids for `entries`.

    For tiny models whose real tokenizer puts special tokens at known ids (Chameleon's <racm3:break>
    at 8197, ...): `entries` gives those names and ids (together they must fill 0..N-1), `special` the
    ones that text never splits; the 256 byte characters take ids N..N+255. Encoding adds BOS and no
    EOS, as the Llama-family tokenizers of Chameleon and Janus do.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if sorted(entries.values()) != list(range(len(entries))):
        raise ValueError("tokenizer entries must have the ids 0..N-1, each once")
    vocab = dict(entries)
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in special])
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                             special_tokens=[(bos, vocab[bos])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=unk, model_max_length=model_max_length)
    fast.save_pretrained(directory)
    return directory
