"""A StyleAR style student on the Lumina-mGPT (or LlamaGen) backend: frozen CLIP image encoder -> perceiver resampler ->
N style tokens in place of N "S*" placeholders of the prompt turn; LoRA on the Chameleon model.

    style image --CLIP vision tower (frozen), hidden_states[-2]--> (S, W)
                --StyleResampler (trained fully)--> (N, D) style tokens (+ noise: style-enhanced)
    prompt turn  "<s> Instant style Generation. Given image style is S* .. S*. Please generate ...: {prompt} <eot>"
                 with the input embedding at each "S*" replaced by one style token
    image turn   as the Lumina backend: <racm3:break> <size> <size> codes + row ends <eoss> <eot>

Training (binary text-image data, as StyleAR): every example is a (caption, image) pair, and the style
tokens come from the target image itself; the loss is the Lumina backend's own fine-tuning objective
(`LuminaStudent.sequence_loss`) with the style tokens in the prompt. Classifier-free guidance dropout
masks the whole prompt turn out, style tokens included: the unconditional branch, in training as at
inference, is the original's (the image turn alone, neither text nor style; StyleAR's
inference_solver builds it from <racm3:break> on).

On LlamaGen (no prompt template, a left-padded caption of C T5-feature slots projected into the prefix):

    caption slots  [pad .. pad][S* x N][caption tokens]   the caption keeps at most C - N tokens
    style tokens   the resampler's N outputs, in the T5 feature width, written into the N slots right
                   before the caption (StyleAR's order: the style, then the instruction); cap_proj
                   projects them with the caption, and the attention mask counts them as tokens
    CFG            LlamaGen's own unconditional branch: the null caption in every slot (masked like the
                   prompt it stands in for), so neither text nor style reaches it, as in StyleAR

Training and sampling call the LlamaGen student's own `model(text_feats, codes, drop_cond)` and `generate`
with these caption features; the loss is LlamaGen's next-code cross-entropy (no z-loss).

Nothing here imports MLflow or a stage; `save`/`load` write and read the trained parts (peft adapter +
resampler) in the layout `proxytune convert stylear` writes (adapter/, style_resampler/, proxytune_style.json).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from proxytune.backends.stylear import style_tokens as st
from proxytune.errors import ProxytuneError

STYLE_META = "proxytune_style.json"
BACKENDS = ("lumina-mgpt", "llamagen")  # students a style student is built on
SAMPLING = {"lumina-mgpt": "stylear", "llamagen": "llamagen"}  # whose sampler defaults (students.api.sampler_defaults)


@dataclass
class StyleStudent:
    student: Any  # LuminaStudent; its model becomes a PeftModel when a LoRA is added
    clip: Any  # ClipEncoder (proxytune.backends.encoders): frozen, its vision tower's penultimate states are used
    resampler: st.StyleResampler
    num_tokens: int
    prompt_len: int  # Lumina: prompt-turn slots (the style template needs more than the plain one);
    #                  LlamaGen: caption tokens kept (cond_len - num_tokens)

    @property
    def backend(self) -> str:
        return self.student.backend

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def build(cls, student, clip, *, num_tokens: int = st.NUM_STYLE_TOKENS, depth: int = 4, heads: int = 12,
              dim_head: int = 64, dim: int | None = None, ff_mult: int = 4, seed: int = 0) -> "StyleStudent":
        """A fresh resampler sized for `student` (output width = its hidden width) and `clip` (input width =
        its vision tower's hidden width). `seed` draws the resampler's initial weights.

        On LlamaGen the style tokens are caption features (width text_dim), and `num_tokens` caption slots
        are theirs.

        Raises:
            ProxytuneError: the student is neither a Lumina-mGPT nor a LlamaGen student, or (LlamaGen) its
                caption slots cannot hold the style tokens and a caption token.
        """
        backend = getattr(student, "backend", None)
        if backend not in BACKENDS:
            raise ProxytuneError(f"student.model: a style student needs the Lumina-mGPT or LlamaGen backend, not "
                                 f"{backend or type(student).__name__!r}")
        if backend == "llamagen":
            width, prompt_len = student.config.text_dim, student.config.cond_len - num_tokens
            if prompt_len < 1:
                raise ProxytuneError(f"style_student.num_style_tokens: {num_tokens} leaves no caption slot of the "
                                     f"student's {student.config.cond_len}")
        else:
            width, prompt_len = student._chameleon.config.hidden_size, style_prompt_len(student, num_tokens)
        config = st.ResamplerConfig(dim=dim or width, depth=depth, dim_head=dim_head, heads=heads, num_queries=num_tokens,
                                    embedding_dim=clip.model.config.vision_config.hidden_size, output_dim=width,
                                    ff_mult=ff_mult)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            resampler = st.StyleResampler(config)
        return cls(student=student, clip=clip, resampler=resampler.to(_device(student)), num_tokens=num_tokens,
                   prompt_len=prompt_len)

    # -- style tokens --------------------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """(B, S, W) CLIP penultimate hidden states of `images` (the checkpoint's own preprocessing), CPU float32."""
        out = []
        vision = self.clip.model.vision_model
        for start in range(0, len(images), batch_size):
            pixels = self.clip.image_processor(images=images[start : start + batch_size], return_tensors="pt")["pixel_values"]
            out.append(st.clip_style_features(vision, pixels.to(self.clip.device)).float().cpu())
        return torch.cat(out)

    def style_tokens(self, features: torch.Tensor, noise_strength: float = 0.0,
                     generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """(B, N, D) style tokens of CLIP features (B, S, W), style-enhanced when noise_strength > 0.

        Style-enhanced tokens (StyleAR's inference, `style_tokens.style_enhanced`): after the resampler,
        once per image, every element of the N tokens gets Gaussian noise of std `noise_strength`, and the
        same noisy tokens condition every sampling step. The resampler ends in a LayerNorm, so each token
        has roughly unit scale per element; noise of std 0.3 keeps what the tokens share in their large,
        coherent directions (colour, texture, stroke statistics: what the model was trained to read as
        style, from many different images) and blurs the fine, image-specific directions through which the
        model could re-draw the reference's objects and layout. Less precise tokens, less copied content:
        the knob trades style strength for less leakage, which the style evaluation measures.
        Row b's noise comes from generators[b] (one seed, one noise); None: the global RNG.
        """
        tokens = self.resampler(features.to(_device(self.student)))
        if noise_strength == 0:
            return tokens
        if generators is None:
            return st.style_enhanced(tokens, noise_strength)
        return torch.cat([st.style_enhanced(tokens[b : b + 1], noise_strength, g) for b, g in enumerate(generators)])

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, positions (B, N)): Lumina: the style template's prompt turns (B, 2, T) and where the
        placeholders are; LlamaGen: the caption features (B, C, Dt) and the style tokens' slots."""
        if self.backend == "llamagen":
            return llamagen_caption_slots(self.student, prompts, self.num_tokens)
        return st.encode_style_prompts(self.student, prompts, self.num_tokens, prompt_len=self.prompt_len)

    def _embed(self, positions: torch.Tensor, tokens: torch.Tensor):
        """ids -> input embeddings with the placeholders replaced; a call on a few new tokens (KV-cached
        sampling) has no placeholders and gets the plain embeddings."""
        T = self.prompt_len

        def embed(ids: torch.Tensor) -> torch.Tensor:
            if ids.shape[1] < T:
                return self.student._chameleon.get_input_embeddings()(ids)
            return st.style_input_embeds(self.student, ids, positions, tokens)

        return embed

    # -- training ------------------------------------------------------------------------------
    def sequence_loss(self, cond: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor, codes: torch.Tensor,
                      drop_cond: torch.Tensor, code_weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """The Lumina fine-tuning objective ({"ce", "z_loss"}) with style tokens (B, N, D) in the prompt;
        gradients reach the resampler through the replaced embeddings. A dropped row (CFG dropout) has its
        prompt turn masked out, style tokens included. LlamaGen: next-code cross-entropy (z_loss 0); a dropped
        row's caption slots, style tokens included, hold the null caption."""
        if self.backend == "llamagen":
            text = st.replace_placeholders(cond.to(_device(self.student)), positions, tokens)
            logits = self.student.model(text, codes.to(text.device), drop_cond=drop_cond.to(text.device))  # (B, L, V)
            ce = F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten().to(text.device), reduction="none")
            ce = ce.view_as(codes) * code_weights.to(ce.device, ce.dtype)
            return {"ce": ce.mean(), "z_loss": ce.new_zeros(())}
        return self.student.sequence_loss(cond, codes, drop_cond, code_weights, embed=self._embed(positions, tokens))

    # -- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[str], features: torch.Tensor, seeds: list[int], *, cfg_scale: float = st.CFG_SCALE,
                 top_k: int | None = 2000, temperature: float = 1.0, noise_strength: float = st.NOISE_STRENGTH,
                 use_cache: bool = True) -> torch.Tensor:
        """Codes (B, L) of `prompts` in the style of the images whose CLIP features (B or 1, S, W) are given.

        Image i's noise (style-enhanced tokens) and samples come from seeds[i] only. Guided rows follow the
        original: cond = text + style tokens, uncond = the image turn alone (prompt turn masked out), logits
        uncond + cfg_scale * (cond - uncond)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        features = features.expand(len(prompts), *features.shape[1:]) if features.shape[0] == 1 else features
        generators = [torch.Generator().manual_seed(int(s) + 104_729) for s in seeds]  # noise draws apart from sampling's
        tokens = self.style_tokens(features, noise_strength, generators)
        cond, positions = self.encode_prompts(prompts)
        if self.backend == "llamagen":  # the caption with its style tokens; LlamaGen's sampler adds the null caption
            text = st.replace_placeholders(cond.to(_device(self.student)), positions, tokens)
            return self.student.generate(prompts, seeds, cfg_scale=cfg_scale, top_k=top_k, temperature=temperature,
                                         use_cache=use_cache, text_feats=text)
        if cfg_scale != 1.0:  # the uncond rows are masked out: any tokens do, the same ones keep shapes simple
            tokens, positions = torch.cat([tokens, tokens]), torch.cat([positions, positions])
        return self.student.generate(prompts, seeds, cfg_scale=cfg_scale, top_k=top_k, temperature=temperature,
                                     use_cache=use_cache, cond=cond, embed=self._embed(positions, tokens))

    # -- weights -------------------------------------------------------------------------------
    def save(self, folder: Path, *, base_model: str, clip_model: str, noise_strength: float, sampling: dict) -> list[Path]:
        """adapter/ (peft), style_resampler/ and proxytune_style.json into `folder`; returns the weight files."""
        folder = Path(folder)
        adapter = folder / "adapter"
        model = self.student.model
        lora = model.peft_config[model.active_adapter]  # what peft writes as adapter_config.json
        lora.base_model_name_or_path = base_model  # the spec's reference, not the folder it resolved to
        if isinstance(lora.target_modules, (set, list)):
            lora.target_modules = sorted(lora.target_modules)  # peft writes a set as a list in any order
        model.save_pretrained(str(adapter), save_embedding_layers=False)
        resampler = st.save_resampler(self.resampler.cpu(), folder / "style_resampler")
        self.resampler.to(_device(self.student))
        conditioning = ({"placement": "caption slots before the caption's tokens"} if self.backend == "llamagen" else
                        {"placeholder": st.PLACEHOLDER, "prompt_template": st.STYLE_PROMPT_TEMPLATE})
        meta = {"method": "stylear", "backend": self.backend, "base_model": base_model, "adapter": "adapter",
                "resampler": "style_resampler", "num_style_tokens": self.num_tokens, **conditioning,
                "prompt_len": self.prompt_len, "clip_vision_model": clip_model,
                "clip_hidden_layer": st.CLIP_HIDDEN_LAYER, "noise_strength": noise_strength, **sampling}
        (folder / STYLE_META).write_text(json.dumps(meta, indent=2) + "\n")
        return [adapter / "adapter_model.safetensors", resampler]

    @classmethod
    def load(cls, folder: Path, student, clip) -> "StyleStudent":
        """A saved style student (or a `proxytune convert stylear` folder) on `student` and `clip`."""
        from peft import PeftModel

        folder = Path(folder)
        meta = json.loads((folder / STYLE_META).read_text())
        backend = meta.get("backend", "lumina-mgpt")
        if backend != getattr(student, "backend", None):
            raise ProxytuneError(f"{folder / STYLE_META}: backend: a {backend} style student, loaded on a "
                                 f"{getattr(student, 'backend', '?')} student")
        student.model = PeftModel.from_pretrained(student.model, str(folder / meta["adapter"])).eval()
        resampler = st.load_resampler(folder / meta["resampler"]).to(_device(student)).eval()
        n = int(meta["num_style_tokens"])
        default = student.config.cond_len - n if backend == "llamagen" else None
        return cls(student=student, clip=clip, resampler=resampler, num_tokens=n,
                   prompt_len=int(meta.get("prompt_len") or default or style_prompt_len(student, n)))


def _device(student) -> torch.device:
    return student.model_device if student.backend == "llamagen" else student._device


def llamagen_caption_slots(student, prompts: list[str], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(feats (B, C, Dt), positions (B, N)): LlamaGen caption features with at most C - N tokens, left-padded
    to C slots, and the N slots right before each caption's tokens, where its style tokens go."""
    C = student.config.cond_len
    with torch.no_grad():
        feats = student.caption_features(prompts, max_tokens=C - num_tokens)  # (B, C, Dt), pad rows zero
    first = C - (feats != 0).any(dim=-1).sum(dim=1)  # (B,) the first caption token's slot
    positions = first[:, None] - num_tokens + torch.arange(num_tokens, device=first.device)[None, :]
    return feats, positions.cpu()


def style_prompt_len(student, num_tokens: int) -> int:
    """Prompt-turn slots of a style student: the style template with its placeholders (and <s>, end of turn)
    plus the room the plain student's prompt_len leaves a prompt after its own template, so a prompt keeps
    as much text as it would without style."""
    from proxytune.backends.students.lumina.backend import PROMPT_TEMPLATE

    def length(text: str) -> int:
        return len(student.tokenizer.encode(text, add_special_tokens=False)) + 2

    plain = length(PROMPT_TEMPLATE.format(width=student.image_size, height=student.image_size, prompt=""))
    return length(st.style_prompt("", num_tokens)) + max(student.prompt_len - plain, 16)
