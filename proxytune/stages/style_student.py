"""Style student stage (StyleAR, issue 15): Lumina-mGPT (or LlamaGen) learns to draw any prompt in the style of an image.

Model (backends/stylear/style_student.py): a frozen CLIP image encoder's penultimate hidden states go through a
perceiver resampler (trained fully) to `style_student.num_style_tokens` style tokens, which replace the
"S*" placeholders of StyleAR's prompt template (LlamaGen: the caption slots right before the caption); a
LoRA (peft, the `student.lora` settings) adapts the Chameleon (Llama) model.

Data: the curation stage's output only. Every training example is a (caption, image) pair and its style
tokens come from the image itself (binary data suffices: the model learns to read style off the tokens
and content off the caption). Each example is a raw pair with probability ratio / (ratio + 1)
(`style.raw.ratio`, default 3: raw:stylised 3:1, StyleAR's best mix), else a curated one. Images are
tokenized by the student's VQ and encoded by CLIP once, before training (cached in the scratch folder).

The step, per micro-batch: pick examples -> style tokens from their cached CLIP features (Gaussian noise of
std `train_noise_strength` when set) -> CFG dropout (`student.cfg_dropout`: prompt turn masked out, style
tokens with it; LlamaGen: the null caption) -> Lumina's fine-tuning loss (cross-entropy over the image turn +
z-loss; LlamaGen: next-code cross-entropy) -> backward;
then clip, step. Resumable: checkpoints (LoRA + resampler weights, optimiser, RNG, step, curves) every
`student.checkpoint_every` steps, as the student stage's.

Output folder `student/`: model/ (adapter/, style_resampler/, proxytune_style.json: registered in MLflow as
EXPERIMENT.STYLE.student with the style teacher and the curated set as its lineage), samples.png
(reference | the student's images of two prompts in its style), loss.csv, record.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from proxytune import faults, layout
from proxytune.backends import encoders, students
from proxytune.backends.students.api import sampling_settings
from proxytune.backends.stylear.style_student import SAMPLING, StyleStudent
from proxytune.errors import ProxytuneError
from proxytune.files import sha256_file, staged_dir, write_bytes_atomic
from proxytune.images import center_crop_resize, grid, list_images, open_rgb
from proxytune.outputs import CuratedManifest, CurationRecord, StyleStudentRecord, read_record, write_record
from proxytune.stages import training
from proxytune.stages.params import StageParams, load_params
from proxytune.stages.runtime import base_model_tags, config_key, device, seed_everything, stage_run

SERIES = ("loss", "ce", "z_loss", "grad_norm", "raw_fraction")
MODEL_DIR = "model"
SAMPLE_PROMPTS = ("a cat", "a house by a lake")


class StyleStudentTrainer:
    """The style student's training loop (setup, train_step, train, save), on `self.spec` (the params'
    student section) and `self.style_spec` (its style_student section)."""

    def __init__(self, params: StageParams):
        if params.style is None or params.style_student is None:
            raise ProxytuneError(f"{params.path}: the style_student stage is for styles (no style section)")
        self.params = params
        self.spec = params.student
        self.style_spec = params.style_student
        self.device = device()
        self.curated_dir = params.out("curated")

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        spec, style_spec = self.spec, self.style_spec
        # accelerate: mixed precision and fp16 loss scaling (the stage runs one process)
        self.accelerator = training.accelerator(spec.mixed_precision)
        seed = self.params.seed + spec.seed_offset
        seed_everything(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.bundle = students.load_student(spec.model, device=str(self.device))
        self.sampling = sampling_settings(SAMPLING[self.bundle.backend], spec.sampling)  # unset: StyleAR's (Lumina) or LlamaGen's
        clip = encoders.load_clip(style_spec.clip_model, device=str(self.device))
        r = style_spec.resampler
        # the resampler is drawn from its own seed: the LoRA init below does not move it
        self.style = StyleStudent.build(self.bundle, clip, num_tokens=style_spec.num_style_tokens, depth=r.depth,
                                        heads=r.heads, dim_head=r.dim_head, dim=r.dim, ff_mult=r.ff_mult, seed=seed)
        self.curated = read_record(self.curated_dir, CurationRecord)
        self.checkpoint_dir = self.params.work("style_student") / config_key(
            self.params.seed, spec.model_dump(exclude={"processes"}), style_spec.model_dump(), self.params.style.raw.ratio,
            self.curated.digest, self.curated.raw_digest)
        self._cache_inputs()
        torch.manual_seed(seed)  # LoRA init draws from the global RNG
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                          target_modules=self.bundle.lora_target_modules(list(spec.lora.groups)),
                          layers_to_transform=spec.lora.layers)
        self.bundle.model = get_peft_model(self.bundle.model, lora)
        self.style.resampler.train().requires_grad_(True)
        self.lora_params = [p for p in self.bundle.model.parameters() if p.requires_grad]
        self.trainable = self.lora_params + list(self.style.resampler.parameters())
        groups = [{"params": self.lora_params, "lr": spec.learning_rate},
                  {"params": list(self.style.resampler.parameters()), "lr": style_spec.resampler_lr or spec.learning_rate}]
        # accelerate: autocast around the prepared module's forward, the optimiser that steps through the
        # fp16 GradScaler, checkpoints that hold only the LoRA and resampler weights
        self.model, self.optimizer = training.prepare_training(
            self.accelerator, {"student": self.bundle.model, "resampler": self.style.resampler},
            training.adamw(groups, betas=tuple(spec.betas), weight_decay=spec.weight_decay),
            weights=self._trained_state, load_weights=self._load_trained_state)
        self.weights = torch.ones(self.bundle.seq_len, device=self.device)
        self.progress = training.resume_training(self.accelerator, self.checkpoint_dir, "style student", SERIES,
                                                 self.generator)

    @torch.no_grad()
    def _cache_inputs(self) -> None:
        """VQ codes and CLIP features of every curated and raw image, and the prompt turn of every distinct
        caption, by dataset index; computed once and kept in the scratch folder (a resumed run skips it)."""
        from safetensors.torch import load_file, save

        manifest = CuratedManifest.read(self.curated_dir / layout.MANIFEST_FILE)
        entries = [*manifest.images, *manifest.raw.images]
        self.num_curated = len(manifest.images)
        captions = [e.prompt for e in entries]
        distinct = sorted(set(captions))
        # keyed by what the encodings depend on only: another learning rate or step count reuses them
        cache = self.params.work("style_student") / "inputs-{}.safetensors".format(config_key(
            self.spec.model, self.style_spec.clip_model, self.style.num_tokens, self.style.prompt_len,
            self.curated.digest, self.curated.raw_digest))
        if cache.exists():
            tensors = load_file(cache)
        else:
            codes, features = [], []
            size = self.bundle.image_size
            for start in tqdm(range(0, len(entries), 16), desc="style student: encode images", unit="batch", leave=False):
                images = [open_rgb(self.curated_dir / e.file) for e in entries[start : start + 16]]
                pixels = self.bundle.images_to_pixels([center_crop_resize(i, size) for i in images]).to(self.device)
                codes.append(self.bundle.encode_images(pixels).cpu())
                features.append(self.style.image_features(images))
            cond, positions = self.style.encode_prompts(distinct)
            tensors = {"codes": torch.cat(codes).contiguous(), "features": torch.cat(features).contiguous(),
                       "cond": cond.contiguous(), "positions": positions.contiguous(),
                       "caption_index": torch.tensor([distinct.index(c) for c in captions])}
            write_bytes_atomic(cache, save(tensors))
        self.codes, self.features = tensors["codes"], tensors["features"]
        self.cond, self.positions, self.caption_index = tensors["cond"], tensors["positions"], tensors["caption_index"]
        ratio = self.params.style.raw.ratio
        self.raw_probability = ratio / (ratio + 1) if len(entries) > self.num_curated else 0.0

    # -- checkpointing ---------------------------------------------------------------------------
    def _trained_state(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        state = {f"lora.{k}": v for k, v in get_peft_model_state_dict(self.bundle.model, save_embedding_layers=False).items()}
        state.update({f"resampler.{k}": v for k, v in self.style.resampler.state_dict().items()})
        return state

    def _load_trained_state(self, weights: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(self.bundle.model, {k[5:]: v for k, v in weights.items() if k.startswith("lora.")})
        self.style.resampler.load_state_dict({k[10:]: v for k, v in weights.items() if k.startswith("resampler.")})

    def save_checkpoint(self) -> None:
        training.save_state(self.accelerator, self.checkpoint_dir, self.progress.step)

    # -- training ------------------------------------------------------------------------------
    def _batch_indices(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(dataset indices, is_raw) of `count` examples: raw with probability ratio / (ratio + 1)."""
        g = self.generator
        raw = torch.rand(count, generator=g) < self.raw_probability
        curated = torch.randint(self.num_curated, (count,), generator=g)
        n_raw = max(len(self.codes) - self.num_curated, 1)
        raw_index = self.num_curated + torch.randint(n_raw, (count,), generator=g)
        return torch.where(raw, raw_index, curated), raw

    def _micro_batch_loss(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        spec, style_spec = self.spec, self.style_spec
        # 1. examples, raw or curated; their codes, captions and (from the target image itself) CLIP features
        index, raw = self._batch_indices(spec.batch_size)
        codes = self.codes[index].to(self.device)
        cond, positions = self.cond[self.caption_index[index]], self.positions[self.caption_index[index]]
        # 2. style tokens through the resampler (trained), with the training noise when set
        noise = [torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=self.generator)))
                 for _ in range(spec.batch_size)] if style_spec.train_noise_strength else None
        tokens = self.style.style_tokens(self.features[index], style_spec.train_noise_strength, noise)
        # 3. CFG dropout: the whole prompt turn (text and style tokens) masked out
        drop = (torch.rand(spec.batch_size, generator=self.generator) < spec.cfg_dropout).to(self.device)
        # 4. the backend's objective (Lumina-mGPT: the image turn + z-loss; LlamaGen: the codes), under
        #    accelerate's autocast: this runs in the prepared module
        terms = self.style.sequence_loss(cond, positions, tokens, codes, drop, self.weights)
        loss = terms["ce"] + self.bundle.z_loss_weight * terms["z_loss"]
        return loss, terms["ce"], terms["z_loss"], raw.float().mean()

    def train_step(self) -> dict[str, float]:
        spec, acc = self.spec, self.accelerator
        accumulation = spec.gradient_accumulation_steps
        sums = torch.zeros(4, device=self.device)  # loss, ce, z_loss, raw fraction over the micro-batches
        for _ in range(accumulation):
            loss, ce, z_loss, raw = self.model(self._micro_batch_loss)
            acc.backward(loss / accumulation)  # fp16: the GradScaler's scale multiplies the loss first
            sums += torch.stack([loss.detach(), ce.detach(), z_loss.detach(), raw.to(self.device)]).float()
        loss, ce, z_loss, raw = (sums / accumulation).tolist()
        grad_norm = acc.clip_grad_norm_(self.trainable, spec.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "ce": ce, "z_loss": z_loss, "grad_norm": float(grad_norm), "raw_fraction": raw}

    def train(self) -> None:
        spec = self.spec
        tqdm.write(
            f"style student: {len(self.codes)} pairs ({self.num_curated} curated, {len(self.codes) - self.num_curated} raw; "
            f"raw with p = {self.raw_probability:.2f}), {spec.steps} steps x batch {spec.batch_size}, "
            f"{self.style.num_tokens} style tokens, prompt turn {self.style.prompt_len}, "
            f"{sum(p.numel() for p in self.lora_params):,} LoRA + "
            f"{sum(p.numel() for p in self.style.resampler.parameters()):,} resampler params"
        )
        self.bundle.model.train()
        bar = tqdm(total=spec.steps, initial=self.progress.step, desc="style student", unit="step")
        while self.progress.step < spec.steps:
            torch.manual_seed((self.params.seed + spec.seed_offset) * 1_000_003 + self.progress.step)  # LoRA dropout
            values = self.train_step()
            self.progress.record(values)
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}")
            if self.progress.step % spec.checkpoint_every == 0 and self.progress.step < spec.steps:
                self.save_checkpoint()
            faults.kill_point("style_student", "step", self.progress.step)
        bar.close()
        self.bundle.model.eval()
        self.style.resampler.eval()

    @torch.no_grad()
    def sample_grid(self):
        """Per reference (at most 2): the reference, then the student's image of each sample prompt in its style."""
        references = [open_rgb(p) for p in list_images(self.params.references_dir)[:2]]
        rows = []
        for r, reference in enumerate(references):
            features = self.style.image_features([reference])
            codes = self.style.generate(list(SAMPLE_PROMPTS), features, [self.params.evaluation.seed + r] * len(SAMPLE_PROMPTS),
                                        noise_strength=self.style_spec.noise_strength, **self.sampling)
            rows.append([center_crop_resize(reference, self.bundle.image_size), *self.bundle.decode_codes(codes)])
        return grid(rows, cell=min(self.bundle.image_size * 2, 256))

    def save(self, out_dir: Path) -> None:
        spec, style_spec, curated = self.spec, self.style_spec, self.curated
        params = self.params
        lineage = {"teacher_version": curated.teacher_version, "proxy_digest": curated.digest,
                   "proxy_prompts_digest": curated.prompts_digest, "proxy_images": str(self.num_curated),
                   "synthesis_run_id": curated.run_id, "raw_digest": str(curated.raw_digest),
                   "raw_images": str(len(self.codes) - self.num_curated)}
        tags = {**base_model_tags(spec.model), "backend": self.bundle.backend, "recipe": "stylear",
                "style": params.style.name, "clip_model": style_spec.clip_model, **lineage,
                "dvc_stage": layout.stage_name("style_student", params.experiment, params.subject.name)}
        with stage_run(params, "style_student", tags) as run, staged_dir(out_dir) as tmp:
            run.log_params({"student": spec.model_dump(mode="json"), "style_student": style_spec.model_dump(mode="json"),
                            "seed": params.seed, "sampling": self.sampling, "raw_ratio": params.style.raw.ratio})
            for key in SERIES:
                run.log_series(key, self.progress.series[key])
            run.log_dataset(self.curated_dir / "images", name=f"{params.experiment}.{params.style.name}.curated",
                            digest=curated.digest, context="training")
            model_dir = tmp / MODEL_DIR
            weights = self.style.save(model_dir, base_model=spec.model, clip_model=style_spec.clip_model,
                                      noise_strength=style_spec.noise_strength, sampling=self.sampling)
            adapter_digest = sha256_file(weights[0])
            self.sample_grid().save(tmp / "samples.png")
            run.log_artifact(tmp / "samples.png")
            version = run.register(model_dir, "student", {
                **base_model_tags(spec.model), "backend": self.bundle.backend, "recipe": "stylear",
                "adapter_digest": adapter_digest, "resampler_digest": sha256_file(weights[1]),
                "teacher_version": curated.teacher_version, "proxy_digest": curated.digest})
            training.write_curves(tmp, self.progress.series)
            write_record(tmp, StyleStudentRecord(
                stage="style_student", run_id=run.run_id, model=f"{run.experiment}.{run.subject}.student",
                version=version, **base_model_tags(spec.model), backend=self.bundle.backend,
                recipe="stylear", weights=MODEL_DIR, adapter_digest=adapter_digest,
                proxy_digest=curated.digest, raw_digest=curated.raw_digest,
                teacher_version=curated.teacher_version, final_loss=self.progress.series["loss"][-1],
                sampling=self.sampling, noise_strength=style_spec.noise_strength, clip_model=style_spec.clip_model))
        tqdm.write(f"style student: registered {run.experiment}.{run.subject}.student version {version}")


def run(params_path: str | Path) -> None:
    params = load_params(params_path)
    trainer = StyleStudentTrainer(params)
    trainer.setup()
    trainer.train()
    trainer.save(params.out("student"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", required=True)
    run(parser.parse_args().params)
