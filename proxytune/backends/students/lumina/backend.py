"""Lumina-mGPT student on transformers' ChameleonForConditionalGeneration.

Lumina-mGPT is a Chameleon model fine-tuned for image generation. Its image codes are ordinary
vocabulary ids (named IMGIMG<digits as letters>Z in `vocabulary_map`). A text-to-image item is two
conversation turns, as Lumina-mGPT's item processor and conversation template write them:

    <s> Generate an image of {W}x{H} according to the following prompt:\n{prompt} <reserved08706>
    <racm3:break> <size H> <size W> c(0,0) .. c(0,g-1) <row end> .. c(g-1,g-1) <row end> <eoss> <reserved08706>

<reserved08706> closes a turn, <reserved08799> ends a row of g codes, and a size token is
<reserved{8800 + pixels / 32}> (768 px: <reserved08824>; the original's sampler reads it back as
id - 8804 grid steps of 32 px, two codes each). Sampling forces the image start, size and row-end
tokens and samples the codes; the unconditional branch of classifier-free guidance is the image turn
alone, from <racm3:break> on at position 0 (the original's inference solver; here the whole prompt turn
is masked out, which gives the same positions and attention).

transformers' Chameleon forward sets the logits of every image token to the dtype minimum (a text
model must not emit them), so `image_logits` takes the language model's hidden states and applies
`lm_head` restricted to the image-token rows, in code order: logits (B, L, K) over codes (sampling,
prior distillation). Training uses `sequence_loss`, the original fine-tuning objective: cross-entropy
over the whole vocabulary on every token of the image turn, plus a z-loss of weight 1e-5, computed a
chunk of positions at a time (`vocabulary_terms`) so the batch's full-vocabulary logits never exist whole.

transformers has no Chameleon VQ decoder: a student folder carries Chameleon's whole VQGAN as a
diffusers `VQModel` in `vq_decoder/` (named in proxytune_student.json), converted from the original
`vqgan.ckpt` by `proxytune convert lumina-mgpt` (`vqgan.py`, taming layout). Encoding uses the
Chameleon VQ encoder inside the checkpoint; Lumina-mGPT's released checkpoints do not carry it (their
code loads the tokenizer separately), so when transformers reports those weights missing they are
filled from the converted VQGAN, and a checkpoint whose codebook differs from it is refused.

Lumina-mGPT's released checkpoints (Alpha-VLLM/Lumina-mGPT-7B-512/768/1024) were saved by its own
Chameleon classes: their q/k norms hold one row per model-parallel shard, which `lumina.weights`
repeats per head as the original does; the config's checks are in `lumina.layout`. The language
model runs in its declared dtype (bfloat16 for the releases), the VQ encoder in float32.

The special tokens are looked up by name in the checkpoint's vocabulary_map, so a checkpoint that
lacks one gets a clear error rather than a wrong layout. The built-in tiny model: `lumina.tiny`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers import DynamicCache

from proxytune.backends import checkpoints, tiny_cache, vqgan

from proxytune.backends.students.lumina import layout as lumina_layout

from proxytune.backends.students.lumina import weights as lumina_weights
from proxytune.backends.students.lumina.layout import (END_OF_TURN, IMAGE_END, IMAGE_START, ROW_END, SIZE_UNIT, image_token_name,
                                            size_token)
from proxytune.backends.students.api import (LORA_GROUPS, cfg_batch, guided, images_to_pixels, lora_groups,
                                            sample_next, unwrapped)
from proxytune.backends.students import meta as student_meta
from proxytune.backends.students.lumina import SAMPLING
from proxytune.backends.students.meta import STUDENT_META, StudentMeta
from proxytune.errors import ProxytuneError

PROMPT_TEMPLATE = "Generate an image of {width}x{height} according to the following prompt:\n{prompt}"
Z_LOSS_WEIGHT = 1e-5  # the original fine-tuning's --z_loss_weight (exps/7B.sh)
# Positions (of the flattened batch) whose float32 logits over the whole vocabulary exist at once in
# `sequence_loss`: 1024 x 65,536 x 4 bytes = 256 MiB for Lumina-mGPT 7B, against 5 GiB for all 2.5k
# positions of a batch of 8 (and as much again for their gradient).
LOSS_CHUNK = 1024


def vocabulary_terms(head, hidden: torch.Tensor, labels: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position cross-entropy over the whole vocabulary and squared logsumexp (the z-loss term).

    hidden (B, A, H), labels (B, A) -> (ce, z), each (B, A) float32. The logits (B, A, V) are never
    whole: `chunk` positions at a time go through `head` (lm_head, with its LoRA if any), are reduced to
    their two numbers per position and dropped. Under autograd each chunk runs in torch.utils.checkpoint,
    so the backward recomputes that chunk's logits instead of keeping them (one extra lm_head matmul per
    chunk, about 1/num_layers of a step's compute); a lone chunk runs plainly. Same values and gradients
    as the whole-logits loss, up to float rounding.
    """
    from torch.utils.checkpoint import checkpoint

    def terms(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(h).float()  # (n, V), unmasked: this is a full-vocabulary objective
        return F.cross_entropy(logits, y, reduction="none"), torch.logsumexp(logits, dim=-1).pow(2)

    flat_h, flat_y = hidden.flatten(0, 1), labels.flatten()
    if flat_y.numel() <= chunk:
        ce, z = terms(flat_h, flat_y)
    else:
        parts = [checkpoint(terms, h, y, use_reentrant=False) if torch.is_grad_enabled() else terms(h, y)
                 for h, y in zip(flat_h.split(chunk), flat_y.split(chunk))]
        ce, z = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return ce.view_as(labels), z.view_as(labels)


@dataclass
class LuminaStudent:
    model: Any  # ChameleonForConditionalGeneration, or a PeftModel wrapping it
    tokenizer: Any
    decoder: Any  # diffusers VQModel holding the decoder and the shared codebook
    image_size: int
    grid: int
    path: str
    random_init: bool
    prompt_len: int
    backend = "lumina-mgpt"
    z_loss_weight = Z_LOSS_WEIGHT
    loss_chunk = LOSS_CHUNK  # positions whose full-vocabulary logits exist at once (`vocabulary_terms`)

    def __post_init__(self):
        vocab = self._chameleon.config.vocabulary_map
        size = size_token(self.image_size)
        missing = [name for name in (IMAGE_START, IMAGE_END, ROW_END, END_OF_TURN, size) if name not in vocab]
        if missing:
            raise ProxytuneError(f"student model {self.path!r}: vocabulary_map lacks {', '.join(missing)}")
        if self.tokenizer.bos_token_id is None:
            raise ProxytuneError(f"student model {self.path!r}: the text tokenizer has no BOS token")
        self.image_bpe = torch.tensor([vocab[image_token_name(c)] for c in range(self.codebook_size)])  # code -> id
        self.image_prefix = torch.tensor([vocab[IMAGE_START], vocab[size], vocab[size]])  # height, then width
        self.image_suffix = torch.tensor([vocab[IMAGE_END], vocab[END_OF_TURN]])
        self.row_end = vocab[ROW_END]
        self.end_of_turn = vocab[END_OF_TURN]

    # -- sizes and LoRA ------------------------------------------------------------------------
    @property
    def _chameleon(self):
        return unwrapped(self.model).model

    @property
    def _lm_head(self):
        return unwrapped(self.model).lm_head

    @property
    def seq_len(self) -> int:
        return self.grid**2

    @property
    def codebook_size(self) -> int:
        return self._chameleon.vqmodel.config.num_embeddings

    def num_layers(self) -> int:
        return self._chameleon.config.num_hidden_layers

    def lora_target_modules(self, groups: list[str] | None = None) -> list[str]:
        """Projection suffixes of the decoder layers (the Chameleon VQ has no such names)."""
        return [name for g in lora_groups(groups) for name in LORA_GROUPS[g]]

    # -- images --------------------------------------------------------------------------------
    def images_to_pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return images_to_pixels(images, self.image_size)

    def tokenizers_to(self, device: str) -> None:
        """The Chameleon VQ to `device` (prompts are tokenized on the CPU; encode_images follows the VQ)."""
        self._chameleon.vqmodel.to(device)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vq = self._chameleon.vqmodel
        weight = next(vq.parameters())
        out = vq.encode(pixels.to(weight.device, weight.dtype), return_dict=True)
        return out.image_tokens.view(pixels.shape[0], -1)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> list[Image.Image]:
        B, g = codes.shape[0], self.grid
        shape = (B, g, g, self.decoder.config.vq_embed_dim)
        quant = self.decoder.quantize.get_codebook_entry(codes.reshape(-1).to(self.decoder.device), shape)  # (B, D, g, g)
        pixels = self.decoder.decode(quant, force_not_quantize=True).sample
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]

    # -- sequences -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(B, 2, T): the left-padded prompt turn of each prompt, and its attention mask.

        The turn is the original's: <s>, the tokens of the template around the prompt, <reserved08706>.
        A turn longer than prompt_len loses the end of its text; <s> and the end of turn stay."""
        T = self.prompt_len
        ids = torch.full((len(prompts), T), self.tokenizer.pad_token_id or 0, dtype=torch.long)  # masked: any id
        mask = torch.zeros(len(prompts), T, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            text = PROMPT_TEMPLATE.format(width=self.image_size, height=self.image_size, prompt=prompt)
            turn = [self.tokenizer.bos_token_id, *self.tokenizer.encode(text, add_special_tokens=False)[: T - 2],
                    self.end_of_turn]
            ids[i, T - len(turn) :] = torch.tensor(turn)
            mask[i, T - len(turn) :] = 1
        return torch.stack([ids, mask], dim=1)

    def _prompt(self, cond: torch.Tensor, drop_cond: torch.Tensor):
        """Prompt-turn ids and mask; a dropped prompt is masked out entirely (the unconditional branch)."""
        ids, mask = cond[:, 0].to(self._device), cond[:, 1].to(self._device)
        if not torch.all(ids[:, -1] == self.end_of_turn):  # e.g. a codes stage output of an older proxytune
            raise ProxytuneError(f"student model {self.path!r}: prompt conditions do not end with {END_OF_TURN} "
                                 "(encoded by an older proxytune?): run the codes stage again "
                                 "(dvc repro --force --single-item codes@EXPERIMENT.SUBJECT)")
        return ids, torch.where(drop_cond.to(self._device)[:, None], torch.zeros_like(mask), mask)

    def _prefix(self, cond: torch.Tensor, drop_cond: torch.Tensor):
        """Prompt turn + image start + size tokens: the context of the first code."""
        ids, mask = self._prompt(cond, drop_cond)
        B = ids.shape[0]
        ids = torch.cat([ids, self.image_prefix.to(self._device).expand(B, -1)], dim=1)
        return ids, torch.cat([mask, torch.ones(B, 3, dtype=mask.dtype, device=self._device)], dim=1)

    def _body(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, L) codes -> (B, g * (g + 1)) vocabulary ids, a row end after every row."""
        B, g = codes.shape[0], self.grid
        rows = self.image_bpe.to(codes.device)[codes].view(B, g, g)
        ends = torch.full((B, g, 1), self.row_end, dtype=rows.dtype, device=codes.device)
        return torch.cat([rows, ends], dim=2).flatten(1)

    def _run(self, ids, mask, cache=None, embed=None):
        """Last hidden states of `ids`; `embed` (ids -> input embeddings), when given, makes the input
        embeddings instead of the embedding table (the style tokens, backends/stylear/style_student.py)."""
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        dtype = self._chameleon.embed_tokens.weight.dtype  # the checkpoint's (bfloat16 for the releases)
        inputs = {"input_ids": ids} if embed is None else {"inputs_embeds": embed(ids).to(dtype)}
        out = self._chameleon(**inputs, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                              use_cache=cache is not None)
        return out.last_hidden_state

    def _code_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over image codes only (the image-token rows of lm_head, in code order), unmasked.

        A plain lm_head is multiplied by its code rows only (a fraction of the vocabulary's cost). A LoRA
        on lm_head (StyleAR's released weights carry one, which `proxytune convert stylear` keeps) is part
        of the head: the head module then runs, its adapter included, and the code columns are taken."""
        head, ids = self._lm_head, self.image_bpe.to(hidden.device)
        if hasattr(head, "base_layer"):  # a peft LoRA layer wrapping lm_head
            return head(hidden)[..., ids]
        return hidden @ head.weight[ids].T  # (..., K)

    def image_logits(self, cond: torch.Tensor, codes: torch.Tensor, drop_cond: torch.Tensor) -> torch.Tensor:
        prefix, mask = self._prefix(cond, drop_cond)
        body = self._body(codes.to(self._device))
        ids = torch.cat([prefix, body[:, :-1]], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(body[:, :-1])], dim=1)
        hidden = self._run(ids, full_mask)
        start = prefix.shape[1] - 1  # the state at position start + j predicts body[j]
        return self._code_logits(hidden[:, start + self._code_positions()])

    def _code_positions(self) -> torch.Tensor:
        """(L,) indices of the codes within the body (the rest are row ends)."""
        g = self.grid
        return torch.tensor([j for j in range(g * (g + 1)) if j % (g + 1) != g], device=self._device)

    def sequence_loss(self, cond: torch.Tensor, codes: torch.Tensor, drop_cond: torch.Tensor,
                      code_weights: torch.Tensor, *, embed=None) -> dict[str, torch.Tensor]:
        """Lumina-mGPT's fine-tuning objective on the image turn; {"ce", "z_loss"} (scalars).

        As the original's fine-tuning (--unmask_image_logits, --z_loss_weight): every token of the
        image turn is a label (<racm3:break>, both size tokens, every code and row end, <eoss>, the
        closing <reserved08706>), its cross-entropy is over the whole vocabulary, and the z-loss is
        the mean of logsumexp(logits)^2 over the same positions. `code_weights` (L,) scale the codes'
        terms (position weighting; all ones give the original's plain mean). A dropped row has no
        prompt to predict <racm3:break> from (the image turn starts its unconditional context), so
        its labels start at the height token.
        """
        B, device = codes.shape[0], self._device
        ids, mask = self._prompt(cond, drop_cond)
        labels = torch.cat([self.image_prefix.to(device).expand(B, -1), self._body(codes.to(device)),
                            self.image_suffix.to(device).expand(B, -1)], dim=1)  # (B, A)
        inputs = torch.cat([ids, labels[:, :-1]], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(labels[:, :-1])], dim=1)
        hidden = self._run(inputs, full_mask, embed=embed)[:, ids.shape[1] - 1 :]  # (B, A, H): state t predicts labels[:, t]
        ce, z = vocabulary_terms(self._lm_head, hidden, labels, self.loss_chunk)  # (B, A) each
        weights = torch.ones_like(ce)
        weights[:, 3 + self._code_positions()] = code_weights.to(device, ce.dtype)
        labelled = torch.ones_like(labels, dtype=torch.bool)
        labelled[:, 0] = ~drop_cond.to(device)
        return {"ce": (ce * weights)[labelled].sum() / labelled.sum(), "z_loss": z[labelled].mean()}

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], *, cfg_scale: float = SAMPLING.cfg_scale,
                 top_k: int | None = SAMPLING.top_k, temperature: float = SAMPLING.temperature, use_cache: bool = True,
                 cond: torch.Tensor | None = None, embed=None) -> torch.Tensor:
        """The original inference solver's defaults: CFG 3, image top-k 2000 (None: no top-k), temperature 1.

        `cond` (B, 2, T), when given, is used instead of encoding `prompts` (another prompt template);
        `embed` makes the input embeddings (see `_run`; it sees [cond; uncond] rows when guided)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        top_k = top_k or self.codebook_size
        B, g = len(prompts), self.grid
        cond, drop = cfg_batch(self.encode_prompts(prompts) if cond is None else cond, cfg_scale)  # [cond; uncond]
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        ids, mask = self._prefix(cond, drop)
        codes = torch.zeros(len(ids), g * g, dtype=torch.long, device=self._device)
        cache = DynamicCache() if use_cache else None
        step_ids, t = ids, 0
        bar = tqdm(total=g * g, desc="student: sample", unit="code", leave=False, disable=None)
        for j in range(g * (g + 1) - 1):  # the last row end is never needed as input
            hidden = self._run(step_ids if use_cache else ids, mask, cache, embed)
            if j % (g + 1) == g:  # a row end: forced, not sampled
                token = torch.full((len(ids), 1), self.row_end, dtype=ids.dtype, device=self._device)
            else:
                logits = guided(self._code_logits(hidden[:, -1]).float(), cfg_scale)
                nxt = sample_next(logits, generators, top_k=top_k, temperature=temperature)
                codes[:, t] = nxt.repeat(len(codes) // B)
                token = self.image_bpe.to(self._device)[codes[:, t : t + 1]]
                t += 1
                bar.update(1)
            ids = torch.cat([ids, token], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            step_ids = token
        bar.close()
        return codes[:B]

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device


# -----------------------------------------------------------------------------
# loading


def load(path: str, *, ref: str, device: str = "cpu") -> LuminaStudent:
    """A Chameleon-format Lumina-mGPT checkpoint with its VQGAN folder, frozen, in eval mode.

    proxytune_student.json names the VQGAN folder ("vq_decoder") and, optionally, where the
    Chameleon weights and the text tokenizer live ("model", "tokenizer": hub ids or folders, relative
    to this one; default: here, and the tokenizer beside the weights). The language model loads in the
    dtype its config declares (bfloat16 for the releases); the Chameleon VQ encoder runs in float32,
    as the original's image tokenizer does. Both the released layout (q/k norms of shape
    (model_parallel_size, head_dim), `lumina.weights.expand_qk_norms`) and transformers' load.

    Raises:
        ProxytuneError: any failure to load the checkpoint, its tokenizer or the VQGAN folder, in one
            line naming the checkpoint (and the key, for a weight that does not fit).
    """
    from diffusers import VQModel
    from transformers import AutoTokenizer, ChameleonForConditionalGeneration

    meta_path = Path(path) / STUDENT_META
    try:
        meta = student_meta.read_file(meta_path) or StudentMeta()
    except (OSError, ValueError) as err:
        raise ProxytuneError(f"student model {ref!r}: {meta_path}: unreadable ({err})") from None
    if "vq_decoder" not in meta:
        raise ProxytuneError(f"student model {ref!r}: proxytune_student.json must name its vq_decoder folder "
                             "(transformers has no Chameleon VQ decoder; `proxytune convert lumina-mgpt` writes one)")
    weights, text = (_beside(path, meta.get(key, meta.get("model", "."))) for key in ("model", "tokenizer"))
    what = "checkpoint"
    try:
        config = lumina_layout.read_config(weights)
        problem = config is not None and lumina_layout.config_problem(config)
        if problem:
            raise ProxytuneError(f"student model {ref!r}: {weights}/config.json: {problem}")
        # mismatched sizes are loaded by hand below (the released q/k norms); every other one is refused there.
        # transformers' load report would list them and the VQ encoder as re-initialised: both are handled.
        with checkpoints.transformers_errors_only():
            model, info = ChameleonForConditionalGeneration.from_pretrained(weights, output_loading_info=True,
                                                                            ignore_mismatched_sizes=True)
        lumina_weights.expand_qk_norms(model, info["mismatched_keys"],
                                       lambda key: lumina_weights.stored_tensor(weights, key), ref)
        what = "text tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(text)
        what = "VQGAN folder"
        decoder = VQModel.from_pretrained(str(Path(path) / meta.vq_decoder))
    except ProxytuneError:
        raise
    except Exception as err:  # any failure of any type (bad JSON, missing shard, truncated file): one line
        detail = (str(err).strip().splitlines() or [""])[0][:300]
        source = {"checkpoint": weights, "text tokenizer": text, "VQGAN folder": str(Path(path) / meta.vq_decoder)}[what]
        raise ProxytuneError(f"student model {ref!r}: cannot load the Lumina-mGPT {what} {source} "
                             f"({type(err).__name__}: {detail})") from None
    lumina_weights.refuse_missing(info["missing_keys"], weights, ref)
    _fill_vq_encoder(model, decoder, info["missing_keys"], ref)
    model.model.vqmodel.float()  # the original tokenizes images with its float32 VQGAN
    image_size = int(meta.get("image_size", model.config.vq_config.resolution))
    factor = 2 ** (len(model.config.vq_config.channel_multiplier) - 1)
    if factor != 16 or image_size % SIZE_UNIT:
        raise ProxytuneError(f"student model {ref!r}: Lumina-mGPT writes image sizes in steps of {SIZE_UNIT} px of "
                             f"an x16 VQ; this one has image_size {image_size} and an x{factor} VQ")
    grid = image_size // factor
    for part in (model, decoder):
        part.to(device).eval().requires_grad_(False)
    return LuminaStudent(model=model, tokenizer=tokenizer, decoder=decoder, image_size=image_size, grid=grid, path=path,
                         random_init=tiny_cache.is_random_init(path), prompt_len=int(meta.get("prompt_len", 128)))


def _beside(path: str, ref: str) -> str:
    """A folder relative to the student folder when it exists there, else the reference as given (hub id)."""
    return str(Path(path) / ref) if (Path(path) / ref).exists() else ref


def _fill_vq_encoder(model, vq, missing_keys: list[str], ref: str) -> None:
    """Give the Chameleon VQ encoder the converted VQGAN's weights when the checkpoint lacks them, and
    refuse a checkpoint whose codebook is not the VQGAN's (codes would decode to other images)."""
    vqmodel = model.model.vqmodel
    missing = [k for k in missing_keys if ".vqmodel." in f".{k}"]
    if missing:
        taming = {k: v for k, v in vqgan.to_original_state_dict(vq, "taming").items() if not k.startswith("decoder.")}
        try:
            vqmodel.load_state_dict(taming, strict=True)
        except RuntimeError as err:
            raise ProxytuneError(f"student model {ref!r}: the checkpoint has no VQ encoder and the VQGAN folder's "
                                 f"does not fit its vq_config ({str(err).splitlines()[0]})") from None
    elif not torch.equal(vqmodel.quantize.embedding.weight, vq.quantize.embedding.weight.to(vqmodel.quantize.embedding.weight.dtype)):
        raise ProxytuneError(f"student model {ref!r}: the VQGAN folder's codebook differs from the checkpoint's "
                             "Chameleon VQ codebook; convert the vqgan.ckpt this model was trained with")
