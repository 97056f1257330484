"""The toy world's CLIP BPE tokenizer: one token per world word, characters for anything else.

It is a standard CLIP byte-level BPE vocabulary (vocab.json + merges.txt) whose merges spell out
each word of the world's captions, so "a red box" is three tokens, while a word the world never
uses (an identifier such as "sks") falls back to characters, as a rare word does in a real CLIP
tokenizer. Every toy model that reads text (toy-clip, toy-sd's text encoder, toy-llamagen's T5)
loads this folder with the same `from_pretrained` call a hub tokenizer takes.
"""

from __future__ import annotations

from pathlib import Path

from proxytune.backends.tokenizer import BOS, EOS, char_vocab, write_clip_bpe
from proxytune.toyworld.world import VOCABULARY

MAX_LENGTH = 32  # caption slots; the longest world caption with a 4-character identifier is ~16 tokens


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges): the char-level CLIP vocabulary, then every prefix a word's merges produce."""
    vocab = char_vocab()
    merges: list[tuple[str, str]] = []
    # Longer words' merges rank first, so that a short word's merge ("a t" of "at") cannot split a
    # longer word that contains it ("hat").
    for word in sorted(VOCABULARY, key=lambda w: (-len(w), w)):
        if len(word) < 2:
            continue
        prefix = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + "</w>" if i == len(word) - 1 else ch
            pair = (prefix, right)
            if pair not in merges:
                merges.append(pair)
            prefix = prefix + right
            vocab.setdefault(prefix, len(vocab))
    return vocab, merges


def write_toy_tokenizer(directory: Path, *, model_max_length: int = MAX_LENGTH) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json; returns `directory`."""
    vocab, merges = build_vocab()
    return write_clip_bpe(directory, vocab, merges, model_max_length=model_max_length)


def vocab_size() -> int:
    return len(build_vocab()[0])


def bos_eos_ids() -> tuple[int, int]:
    vocab, _ = build_vocab()
    return vocab[BOS], vocab[EOS]
