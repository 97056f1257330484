"""Janus-Pro student on transformers' JanusForConditionalGeneration (deepseek-community/Janus-Pro-1B, -7B).

Image generation in Janus: the prompt in the chat format, "<|User|>: {prompt}\\n\\n<|Assistant|>:",
then the image-start token; every image code is then predicted by the generation head from the
language model's state, and fed back through the generation embeddings + aligner. transformers'
`generate(generation_mode="image")` does this for sampling only, so training and sampling here use
one explicit forward over [prompt embeddings; image-code embeddings] (same modules, same order).

Two details the original has and transformers' VQ forward lacks or hides:
- the quantizer is cosine: the original l2-normalises both the encoder output and the codebook
  before the nearest-code search; `JanusVQVAEVectorQuantizer.forward` searches unnormalised
  Euclidean distance (its `get_codebook_entry`, used for decoding, does normalise). `encode_images`
  normalises both.
- the unconditional prompt keeps the first token (BOS) and the image-start token and replaces
  everything between with the id of "<｜▁pad▁｜>" in the tokenizer's vocabulary (attended to, as in
  the original CFG batch; the original looks the id up by that name, not as the tokenizer's pad token).

The tokenizer puts BOS first and nothing after the image-start token, as the real (Llama-family) one
does; the tiny model's tokenizer behaves the same way.

A cond tensor is (B, 2, T): left-padded prompt ids and their attention mask (pads not attended).
LoRA goes on the language model only: the vision tower's layers share names like q_proj, so the
targets are a regex over `model.language_model.layers.N.*`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers import DynamicCache

from proxytune.backends import checkpoints, tiny_cache
from proxytune.backends.students.api import cfg_batch, guided, images_to_pixels, lora_groups, sample_next, unwrapped
from proxytune.backends.students.janus import SAMPLING
from proxytune.backends.students import meta as student_meta
from proxytune.backends.students.meta import STUDENT_META, StudentMeta
from proxytune.errors import ProxytuneError, first_line

IMAGE_START = "<begin_of_image>"
PAD = "<｜▁pad▁｜>"  # the original's pad_tag (janus/models/processing_vlm.py), fullwidth bars
PROMPT_FORMAT = "<|User|>: {prompt}\n\n<|Assistant|>:"
GROUP_PREFIX = {"attention": "self_attn", "mlp": "mlp"}
TINY_PROMPT_LEN = 80
REAL_PROMPT_LEN = 256


@dataclass
class JanusStudent:
    model: Any  # JanusForConditionalGeneration, or a PeftModel wrapping it
    tokenizer: Any
    image_size: int
    path: str
    random_init: bool
    prompt_len: int
    backend = "janus"

    def __post_init__(self):
        vocab = self.tokenizer.get_vocab()
        missing = [name for name in (PAD, IMAGE_START) if name not in vocab]
        if missing:
            raise ProxytuneError(f"student model {self.path!r}: the tokenizer's vocabulary lacks {', '.join(missing)}")
        self.pad_id, self.image_start_id = vocab[PAD], vocab[IMAGE_START]
        # a long prompt loses its start, never the image-start token; transformers 5 ignores truncation_side
        # as a call argument, so it is set on the tokenizer
        self.tokenizer.truncation_side = "left"

    # -- sizes and LoRA ------------------------------------------------------------------------
    @property
    def _janus(self):
        """The JanusModel inside (through a peft wrapper when there is one)."""
        return unwrapped(self.model).model

    @property
    def seq_len(self) -> int:
        return self._janus.vqmodel.config.num_patches ** 2

    @property
    def codebook_size(self) -> int:
        return self._janus.vqmodel.config.num_embeddings

    def num_layers(self) -> int:
        return self._janus.language_model.config.num_hidden_layers

    def lora_target_modules(self, groups: list[str] | None = None, layers: list[int] | None = None) -> str:
        """A regex over the language model's projections (peft fullmatch); `layers` picks decoder layers."""
        from proxytune.backends.students.api import LORA_GROUPS

        chosen = lora_groups(groups)
        index = "(" + "|".join(str(i) for i in layers) + ")" if layers else r"\d+"
        names = "|".join(rf"{GROUP_PREFIX[g]}\.({'|'.join(LORA_GROUPS[g])})" for g in chosen)
        return r".*language_model\.layers\." + index + r"\.(" + names + ")"

    # -- images --------------------------------------------------------------------------------
    def images_to_pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return images_to_pixels(images, self.image_size)

    def tokenizers_to(self, device: str) -> None:
        """The VQ to `device` (prompts are tokenized on the CPU; encode_images follows the VQ)."""
        self._janus.vqmodel.to(device)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, L) codes: cosine-nearest codebook entries, as the original."""
        vq = self._janus.vqmodel
        # pixels in the VQ's own dtype (a bf16 release's convolutions refuse float32 input); the nearest-code
        # search in float32, so near-ties do not depend on the weights' precision
        weight = vq.quant_conv.weight
        z = vq.quant_conv(vq.encoder(pixels.to(weight.device, weight.dtype)))  # (B, D, g, g)
        z = F.normalize(z.float().permute(0, 2, 3, 1).flatten(1, 2), dim=-1)  # (B, L, D)
        codebook = F.normalize(vq.quantize.embedding.weight.float(), dim=-1)  # (K, D)
        return (z @ codebook.T).argmax(-1)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> list[Image.Image]:
        pixels = self._janus.vqmodel.decode(codes.to(self._device))  # normalised codebook entries -> pixels
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]

    # -- prompts -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(B, 2, T): left-padded ids of the chat-formatted prompt + image-start token, and the mask."""
        texts = [PROMPT_FORMAT.format(prompt=p) + IMAGE_START for p in prompts]
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.prompt_len, truncation=True,
                                return_tensors="pt", padding_side="left")
        return torch.stack([tokens.input_ids, tokens.attention_mask], dim=1)

    def _uncond(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The original's CFG prompt: keep the first real token and the image-start token, pad the rest."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        first = (mask == 0).sum(dim=1, keepdim=True)  # left padding: index of the first real token
        inner = (positions > first) & (positions < ids.shape[1] - 1) & (mask == 1)
        return torch.where(inner, torch.full_like(ids, self.pad_id), ids)

    def _prefix(self, cond: torch.Tensor, drop_cond: torch.Tensor):
        ids, mask = cond[:, 0].to(self._device), cond[:, 1].to(self._device)
        if not torch.all(ids[:, -1] == self.image_start_id):  # e.g. a codes stage output of an older proxytune
            raise ProxytuneError(f"student model {self.path!r}: prompt conditions do not end with {IMAGE_START} "
                                 "(encoded by an older proxytune?): run the codes stage again "
                                 "(dvc repro --force --single-item codes@EXPERIMENT.SUBJECT)")
        ids = torch.where(drop_cond.to(self._device)[:, None], self._uncond(ids, mask), ids)
        return self._janus.language_model.get_input_embeddings()(ids), mask

    # -- the model -----------------------------------------------------------------------------
    def _run(self, embeds, mask, cache=None):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self._janus.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids[:, -embeds.shape[1]:],
                                         past_key_values=cache, use_cache=cache is not None)
        return out.last_hidden_state

    def _code_embeds(self, codes: torch.Tensor) -> torch.Tensor:
        janus = self._janus
        return janus.generation_aligner(janus.generation_embeddings(codes))

    def image_logits(self, cond: torch.Tensor, codes: torch.Tensor, drop_cond: torch.Tensor) -> torch.Tensor:
        """(B, L, K): the state at the image-start token predicts code 0, code t's embedding code t + 1."""
        text, mask = self._prefix(cond, drop_cond)
        codes = codes.to(self._device)
        embeds = torch.cat([text, self._code_embeds(codes[:, :-1]).to(text.dtype)], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(codes[:, :-1])], dim=1)
        hidden = self._run(embeds, full_mask)
        T = cond.shape[-1]
        return self._janus.generation_head(hidden[:, T - 1 :])

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], *, cfg_scale: float = SAMPLING.cfg_scale,
                 top_k: int | None = SAMPLING.top_k, temperature: float = SAMPLING.temperature,
                 use_cache: bool = True) -> torch.Tensor:
        """The original's defaults (generation_inference.py): CFG 5, temperature 1, no top-k (None)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        top_k = top_k or self.codebook_size
        B, L = len(prompts), self.seq_len
        cond, drop = cfg_batch(self.encode_prompts(prompts), cfg_scale)  # [cond; uncond] when guided
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        codes = torch.zeros(len(cond), L, dtype=torch.long, device=self._device)
        text, mask = self._prefix(cond, drop)
        cache = DynamicCache() if use_cache else None
        embeds, seen = text, mask
        for t in tqdm(range(L), desc="student: sample", unit="code", leave=False, disable=None):
            if not use_cache:  # recompute the whole prefix
                embeds = torch.cat([text, self._code_embeds(codes[:, :t]).to(text.dtype)], dim=1)
            hidden = self._run(embeds, seen, cache)
            logits = guided(self._janus.generation_head(hidden[:, -1]).float(), cfg_scale)
            nxt = sample_next(logits, generators, top_k=top_k, temperature=temperature)
            codes[:, t] = nxt.repeat(len(codes) // B)
            seen = torch.cat([seen, torch.ones_like(seen[:, :1])], dim=1)
            if use_cache:
                embeds = self._code_embeds(codes[:, t : t + 1]).to(text.dtype)
        return codes[:B]

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device


# -----------------------------------------------------------------------------
# loading


def _mismatched_tensor(path: str) -> str | None:
    """The first tensor whose file shape differs from what config.json builds, or that one side lacks.

    transformers reports size mismatches in a log and raises a line without the key; this names it.
    Best effort (None when the files cannot tell): it reads only safetensors headers and builds the
    model on the meta device."""
    try:
        from safetensors import safe_open
        from transformers import JanusConfig, JanusForConditionalGeneration

        folder = Path(path)
        index = folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
        saved = {}
        for name in files:
            with safe_open(folder / name, "pt") as f:
                saved |= {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        with torch.device("meta"):
            model = JanusForConditionalGeneration(JanusConfig.from_pretrained(path))
        for key, tensor in model.state_dict().items():
            if key not in saved and key != "lm_head.weight":  # lm_head may be tied to the embeddings
                return f"tensor {key!r} is missing from the checkpoint files"
            if key in saved and saved[key] != tuple(tensor.shape):
                return f"tensor {key!r} has shape {saved[key]} in the files, config.json builds {tuple(tensor.shape)}"
    except Exception:
        return None
    return None


def load(path: str, *, ref: str, device: str = "cpu") -> JanusStudent:
    """A Janus checkpoint in transformers format, in the dtype its config declares, frozen, in eval mode.

    Raises:
        ProxytuneError: any load failure, in one line naming the checkpoint and what failed.
    """
    from transformers import AutoTokenizer, JanusForConditionalGeneration
    try:
        with checkpoints.transformers_errors_only():  # what matters in its load report is raised below
            # in the dtype config.json declares (bf16 for the releases)
            model, info = JanusForConditionalGeneration.from_pretrained(path, dtype="auto", output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # of any type: a missing or corrupt file, a tensor of the wrong size, a bad config
        detail = _mismatched_tensor(path) or first_line(err)
        raise ProxytuneError(f"student model {ref!r}: cannot load the Janus checkpoint in {path}: {detail}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would train and sample from freshly initialised tensors
        raise ProxytuneError(f"student model {ref!r}: the Janus checkpoint in {path} lacks tensor {missing[0]!r} "
                             f"({len(missing)} missing)")
    if tokenizer.pad_token is None:  # prompts are left-padded (masked); the original's pad token, as its CFG rows
        tokenizer.pad_token = PAD
    meta = student_meta.read_file(Path(path) / STUDENT_META) or StudentMeta()
    vq = model.config.vq_config
    factor = 2 ** (len(vq.channel_multiplier) - 1)
    model.to(device).eval().requires_grad_(False)
    return JanusStudent(model=model, tokenizer=tokenizer, image_size=int(meta.get("image_size", vq.num_patches * factor)),
                        path=path, random_init=tiny_cache.is_random_init(path),
                        prompt_len=int(meta.get("prompt_len", REAL_PROMPT_LEN)))
