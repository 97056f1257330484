"""Student stage: an autoregressive image generator learns the subject.

Recipes (`student.recipe`): `proxy` (the method) trains a LoRA on the teacher's proxy set only and
never sees the real references; the paper's baselines train on the references instead: `direct-lora`,
`direct-full` (every weight of the transformer) and `augment` (a fixed, seeded set of flipped /
rotated / cropped copies). `num_proxy_images` takes the first N proxies for size sweeps. With
`proxy_count` (a growing proxy count, stages/proxy_count.py) this stage also runs each step's student
(`grow_student`: nothing to train once the growth has stopped) and the subject's own student
(`grow_select`: the chosen step's count, resumed from that step's final checkpoint).

Images are tokenized by the student's own image tokenizer once (codes cached by dataset index) and
captions encoded once per distinct prompt; each step then costs one transformer forward/backward.
Optional regularisers from the VAR subject-driven method: selective layer tuning (`lora.groups`,
`lora.layers`), prior distillation (KL from the adapter-disabled model on class-prompt samples) and a
position-weighted loss favouring early (coarse) tokens.

Output folder `student/`: adapter/ (peft format, loads with `PeftModel.from_pretrained`) or, for
direct-full, full/model.safetensors; samples.png; record.json.
"""

from __future__ import annotations

import argparse
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from proxytune import faults, layout
from proxytune.backends import students
from proxytune.backends.students.api import sampling_settings
from proxytune.files import safetensors_bytes, sha256_file, staged_dir, write_bytes_atomic
from proxytune.images import center_crop_resize, grid, list_images, open_rgb
from proxytune.outputs import CountState, StudentRecord, SynthesisRecord, read_record, write_record
from proxytune.spec import StudentSpec
from proxytune.stages import proxy_count, sharding, training
from proxytune.stages.codes_file import load_codes
from proxytune.stages.params import StageParams, load_params
from proxytune.stages.runtime import base_model_tags, config_key, device, seed_everything, stage_run
from proxytune.stages.student_setup import (augmented_references, enable_gradient_checkpointing, joint_record,
                                            optimizer, position_weights, text_encoder_to_host,
                                            training_dropout)

SERIES = ("loss", "ce", "distill", "z_loss", "grad_norm")
FULL_WEIGHTS = "full/model.safetensors"


class StudentTrainer:
    """The student's training loop (setup, train_step, train, save), on `self.spec`: the params' student
    section; `spec.recipe` names what it trains on (proxies, or the references for a baseline)."""

    def __init__(self, params: StageParams, count_state: CountState | None = None, chosen_dir: Path | None = None):
        """`count_state`: a growing proxy count's state, written beside the student; `chosen_dir`: the subject's own
        student of a growing proxy count trains as the chosen step did (its settings, its checkpoints)."""
        self.params = params
        self.spec = params.student
        self.count_state = count_state
        self.work = params.work("student")
        if chosen_dir is not None:
            fixed = self.spec.model_dump(mode="json", by_alias=True, exclude={"variants", "proxy_count"})
            self.spec = StudentSpec.model_validate({**fixed, "num_proxy_images": count_state.chosen})
            self.work = chosen_dir / ".work" / "student"  # its final checkpoint: nothing to train again
        self.device = device()
        self.proxy_dir = params.out("proxy")
        subject = params.subject
        self.instance_prompt = f"a {subject.token} {subject.class_noun}"
        self.prior_prompt = self.spec.regularisers.prior_prompt.format(**{"class": subject.class_noun})

    @property
    def full_finetune(self) -> bool:
        return self.spec.recipe == "direct-full"

    @property
    def sharded(self) -> bool:
        return self.spec.sharding == "fsdp"

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        spec = self.spec
        # accelerate: the process group (under `accelerate launch`), mixed precision, fp16 loss scaling
        self.accelerator = training.accelerator(spec.mixed_precision)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        seed = self.params.seed + spec.seed_offset
        seed_everything(seed)
        self.generator = torch.Generator().manual_seed(seed + 7919 * self.rank)
        self.bundle = students.load_student(spec.model, device=str(self.device))
        self.dropout = training_dropout(self.bundle, spec.dropout)  # the spec's, else the original's
        self.sampling = sampling_settings(self.bundle.backend, spec.sampling)  # the spec's, else the backend's
        # a joint (multi-subject) student learns every subject's proxy set; otherwise the one subject's
        self.joint_params = [load_params(Path(folder) / layout.PARAMS_FILE) for folder in self.params.joint_subjects or []]
        self.proxy = None
        if spec.recipe == "proxy":
            self.proxy = (joint_record(self.joint_params) if self.joint_params
                          else read_record(self.proxy_dir, SynthesisRecord).model_dump())
        # processes and compile may change between runs; sharding none is left out so older checkpoints keep their key
        unkeyed = {"processes", "compile"} | ({"sharding"} if spec.sharding == "none" else set())
        self.checkpoint_dir = self.work / config_key(self.params.seed, spec.model_dump(exclude=unkeyed), self._data_key())
        self._cache_inputs()
        text_encoder_to_host(self.bundle, self.device)  # its features are cached; sample grids encode on the CPU
        torch.manual_seed(seed)  # LoRA init draws from the global RNG: the same in every process
        model = self._trainable_model()
        if spec.gradient_checkpointing:
            enable_gradient_checkpointing(model, inputs_require_grad=not spec.compile)
        sharded_state = ()
        if self.sharded:
            # FSDP2: each process keeps 1/N of the weights, gradients and AdamW state (stages/sharding.py)
            self.model, self.optimizer, self.sharded_state = sharding.prepare(
                self.accelerator, {"student": model}, students.family(self.bundle.backend).decoder_layers,
                lambda params: optimizer(params, spec),
                weights=self._trained_state, load_weights=self._load_trained_state)
            sharded_state = (self.sharded_state,)
            self.trainable = [p for p in model.parameters() if p.requires_grad]  # the shards
        else:
            # accelerate: the model in one module for DDP (the training forward runs through it), the optimiser
            # that steps through the fp16 GradScaler, checkpoints that hold only the trained weights
            self.trainable = [p for p in model.parameters() if p.requires_grad]
            self.model, self.optimizer = training.prepare_training(
                self.accelerator, {"student": model}, optimizer(self.trainable, spec),
                weights=self._trained_state, load_weights=self._load_trained_state)
        self.weights = position_weights(self.bundle.seq_len, spec.regularisers.position_weighting).to(self.device)
        # the forward and loss of a step, compiled once for the batch's fixed shapes (sampling stays eager)
        self.loss_terms = training.compiled(self._loss_terms) if spec.compile else self._loss_terms
        # checkpointed beside weights, optimiser, loss scale and global RNGs: step and curves, every process's
        # data generator (and a sharded run's whole optimiser state)
        self.progress = training.resume_training(self.accelerator, self.checkpoint_dir, "student", SERIES, self.generator,
                                                 *sharded_state)

    def _trainable_model(self) -> torch.nn.Module:
        """The bundle's model set up to train: every weight (direct-full), or wrapped in the spec's LoRA."""
        spec, model = self.spec, self.bundle.model
        if self.full_finetune:
            return model.requires_grad_(True)
        from peft import LoraConfig, get_peft_model

        targets, layers = self.bundle.lora_target_modules(list(spec.lora.groups)), spec.lora.layers
        if isinstance(targets, str) and layers:  # a regex target names the layer indices itself
            targets, layers = self.bundle.lora_target_modules(list(spec.lora.groups), layers=layers), None
        lora = LoraConfig(
            r=spec.lora.rank,
            lora_alpha=spec.lora.alpha,
            lora_dropout=spec.lora.dropout,
            target_modules=targets,
            layers_to_transform=layers,
        )
        self.bundle.model = get_peft_model(model, lora)
        return self.bundle.model

    def _data_key(self) -> str:
        """What the training set depends on besides the model: the proxy digest, or the references."""
        if self.spec.recipe == "proxy":
            return self.proxy["digest"]
        return ",".join(sha256_file(p) for p in list_images(self.params.references_dir))

    def _training_images(self) -> tuple[list, list[str]]:
        """(images, prompts) of a baseline recipe's training set: the real references, in order."""
        spec, size = self.spec, self.bundle.image_size
        references = [open_rgb(p) for p in list_images(self.params.references_dir)]
        if spec.recipe == "augment":
            g = torch.Generator().manual_seed(self.params.seed + spec.seed_offset)
            images = augmented_references([center_crop_resize(r, max(r.size)) for r in references], spec.augment_copies, size, g)
        else:
            images = [center_crop_resize(r, size) for r in references]
        return images, [self.instance_prompt] * len(images)

    @torch.no_grad()
    def _cache_inputs(self) -> None:
        """Codes of every training image and the condition of every distinct prompt, by dataset index.

        Proxy codes come from the codes stage's output (encoded once per student model); the
        references of the baseline recipes are encoded here. Class-prompt samples for prior
        distillation are drawn once and kept in the scratch folder, so a resumed run skips them.
        """
        spec = self.spec
        if spec.recipe == "proxy":
            codes, conds, prompt_index = [], [], []
            for subject_params in self.joint_params or [self.params]:
                digest = read_record(subject_params.out("proxy"), SynthesisRecord).digest
                tensors = load_codes(subject_params.out("codes"), model=spec.model, proxy_digest=digest)
                n = spec.num_proxy_images or len(tensors["codes"])
                codes.append(tensors["codes"][:n])
                prompt_index.append(tensors["prompt_index"][:n] + sum(len(c) for c in conds))
                conds.append(tensors["conds"])
            self.codes, self.conds, self.prompt_index = torch.cat(codes), torch.cat(conds), torch.cat(prompt_index)
        else:
            images, prompts = self._training_images()
            distinct = sorted(set(prompts))
            codes = []
            for start in tqdm(range(0, len(images), 16), desc="student: tokenize images", unit="batch", leave=False):
                pixels = self.bundle.images_to_pixels(images[start : start + 16]).to(self.device)
                codes.append(self.bundle.encode_images(pixels).cpu())
            self.codes = torch.cat(codes)  # (N, L)
            self.conds = self.bundle.encode_prompts(distinct).cpu()  # (P, ...)
            self.prompt_index = torch.tensor([distinct.index(p) for p in prompts])  # (N,)
        self.prior_codes = self.prior_cond = None
        if spec.regularisers.prior_distillation > 0:
            self._prior_samples()

    @torch.no_grad()
    def _prior_samples(self) -> None:
        """The base model's own class-prompt samples (drawn once, cached), for prior distillation."""
        from safetensors.torch import load_file, save

        cache = self.checkpoint_dir / "prior.safetensors"
        if cache.exists():
            tensors = load_file(cache)
        else:
            seeds = [self.params.seed + 50_000 + i for i in range(self.spec.regularisers.prior_samples)]
            tensors = {
                "codes": self.bundle.generate([self.prior_prompt] * len(seeds), seeds, **self.sampling).cpu().contiguous(),
                "cond": self.bundle.encode_prompts([self.prior_prompt]).cpu().contiguous(),
            }
            if self.rank == 0:
                write_bytes_atomic(cache, save(tensors))
        self.prior_codes, self.prior_cond = tensors["codes"], tensors["cond"]

    # -- checkpointing ---------------------------------------------------------------------------
    def _trained_state(self) -> dict[str, torch.Tensor]:
        if self.full_finetune:
            return {k: v for k, v in self.bundle.model.state_dict().items()}
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.bundle.model, save_embedding_layers=False)

    def _load_trained_state(self, weights: dict[str, torch.Tensor]) -> None:
        if self.full_finetune:
            self.bundle.model.load_state_dict(weights)
        else:
            from peft.utils import set_peft_model_state_dict

            set_peft_model_state_dict(self.bundle.model, weights)

    def save_checkpoint(self) -> None:
        """accelerate's save_state (every process takes part): trained weights, optimiser, fp16 loss scale,
        RNGs, step and curves."""
        training.save_state(self.accelerator, self.checkpoint_dir, self.progress.step)

    # -- training ------------------------------------------------------------------------------
    # The model calls below run inside the prepared module's forward, under accelerate's autocast to
    # mixed_precision.
    def _distillation(self, count: int) -> torch.Tensor:
        """KL(base || tuned) on the base model's class-prompt samples; base logits with the adapter off."""
        index = torch.randint(len(self.prior_codes), (count,), generator=self.generator)
        codes = self.prior_codes[index].to(self.device)
        cond = self.prior_cond.expand(count, *self.prior_cond.shape[1:]).to(self.device)
        keep = torch.zeros(count, dtype=torch.bool, device=self.device)
        with torch.no_grad(), self.bundle.model.disable_adapter():
            base = self.bundle.image_logits(cond, codes, keep).float()
        tuned = self.bundle.image_logits(cond, codes, keep).float()
        return F.kl_div(F.log_softmax(tuned, -1), F.log_softmax(base, -1), log_target=True, reduction="none").sum(-1).mean()

    def train_step(self) -> dict[str, float]:
        spec, acc = self.spec, self.accelerator
        accumulation = spec.gradient_accumulation_steps
        sums = torch.zeros(4, device=self.device)  # ce, distill, z_loss, total loss summed over the micro-batches
        for i in range(accumulation):
            # DDP averages the gradients over processes in the last micro-batch's backward only
            # (a sharded model has no no_sync: it reduce-scatters every micro-batch, so no process ever holds
            # a whole gradient; accelerate's autocast is then applied here, as prepare does for DDP)
            with acc.no_sync(self.model) if i + 1 < accumulation else nullcontext(), \
                    acc.autocast() if self.sharded else nullcontext():
                loss, ce, distill, z_loss = self.model(self._micro_batch_loss)
                # 4. backward of this micro-batch's share of the mean; under fp16 accelerate multiplies the loss
                #    by the GradScaler's scale first, so small gradients do not underflow to zero
                acc.backward(loss / accumulation)
            sums += torch.stack([ce.detach(), distill.detach(), z_loss.detach(), loss.detach()]).float()  # no device sync
        ce, distill, z_loss, loss = sums / accumulation
        # 5. update: every process holds the mean gradient, so the weights stay equal
        if self.world > 1:
            ce, distill, z_loss, loss = acc.reduce(torch.stack([ce, distill, z_loss, loss]), "mean")
        if self.sharded:
            grad_norm = sharding.clip_grad_norm(self.trainable, spec.max_grad_norm)
        else:
            grad_norm = acc.clip_grad_norm_(self.trainable, spec.max_grad_norm)  # unscales fp16 gradients first
        self.optimizer.step()  # skipped (and the scale lowered) when fp16 gradients overflowed
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item(), "ce": ce.item(), "distill": distill.item(), "z_loss": z_loss.item(),
                "grad_norm": grad_norm.item()}

    def _micro_batch_loss(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, ce, distill, z_loss) of one micro-batch; runs inside the prepared module."""
        spec = self.spec
        # 1. a batch of training images (codes) and their captions (conditions), by dataset index
        index = torch.randint(len(self.codes), (spec.batch_size,), generator=self.generator)
        codes = self.codes[index].to(self.device)  # (B, L)
        cond = self.conds[self.prompt_index[index]].to(self.device)
        drop = (torch.rand(spec.batch_size, generator=self.generator) < spec.cfg_dropout).to(self.device)
        # 2. next-token cross-entropy (compiled with student.compile)
        ce, z_loss = self.loss_terms(cond, codes, drop)
        # 3. optional prior distillation against the adapter-disabled base
        distill = torch.zeros((), device=self.device)
        if spec.regularisers.prior_distillation > 0:
            distill = self._distillation(spec.batch_size)
        loss = ce + getattr(self.bundle, "z_loss_weight", 0.0) * z_loss + spec.regularisers.prior_distillation * distill
        return loss, ce, distill, z_loss

    def _loss_terms(self, cond: torch.Tensor, codes: torch.Tensor, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ce, z_loss): next-token cross-entropy, each code position weighted (uniform by default). A backend
        with its original's own objective (Lumina-mGPT: every image-turn token, full vocabulary, z-loss) gives
        it; otherwise the codes only, over the codebook, and z_loss is 0."""
        if hasattr(self.bundle, "sequence_loss"):
            terms = self.bundle.sequence_loss(cond, codes, drop, self.weights)
            return terms["ce"], terms["z_loss"]
        logits = self.bundle.image_logits(cond, codes, drop)  # (B, L, K)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten(), reduction="none").view_as(codes)
        return (ce * self.weights).mean(), torch.zeros((), device=codes.device)

    def train(self) -> None:
        spec = self.spec
        tokens = self.codes.shape[1] * spec.batch_size * spec.gradient_accumulation_steps
        what = "proxy images" if spec.recipe == "proxy" else f"training images ({spec.recipe})"
        tqdm.write(
            f"student: {self.bundle.backend} backend, {len(self.codes)} {what} ({self.codes.shape[1]} codes each), "
            f"{spec.steps} steps x batch {spec.batch_size}"
            f"{f' x {spec.gradient_accumulation_steps} accumulated' if spec.gradient_accumulation_steps > 1 else ''}"
            f" = {tokens} image tokens/step, "
            f"{sum(p.numel() for p in self.trainable):,} trainable params, dropout {self.dropout:g}"
            + (f", data parallel over {self.world} processes (rank {self.rank})" if self.world > 1 else "")
        )
        self.bundle.model.train()
        bar = tqdm(total=spec.steps, initial=self.progress.step, desc="student", unit="step", disable=self.rank != 0 or None)
        while self.progress.step < spec.steps:
            # dropout masks (model and LoRA) come from the global RNG: seeded from the step, a resumed run
            # draws the same ones
            torch.manual_seed((self.params.seed + spec.seed_offset) * 1_000_003 + 7919 * self.rank + self.progress.step)
            values = self.train_step()
            self.progress.record(values)
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}")
            if self.progress.step % spec.checkpoint_every == 0 and self.progress.step < spec.steps:
                self.save_checkpoint()
            elif self.progress.step == spec.steps and self.params.grow is not None:
                self.save_checkpoint()  # a growth step's final state: the chosen student and a re-run resume it
            faults.kill_point("student", "step", self.progress.step)
        bar.close()
        if self.sharded:
            self._unshard()
            return
        self.bundle.model.eval()
        if self.world > 1:  # the processes must end with the same weights; say so checkably
            from proxytune.files import sha256_bytes

            digest = sha256_bytes(b"".join(p.detach().cpu().numpy().tobytes() for p in self.trainable))
            tqdm.write(f"student: rank {self.rank} final weights sha256 {digest}")

    def _unshard(self) -> None:
        """After sharded training: gather the trained weights whole to the main process, which loads them
        into a fresh, unsharded copy of the student (the sample grid and `save` run there alone); the other
        processes drop their shards. Every process calls it (the gathers are collective)."""
        import gc

        whole = sharding.full_state(self._trained_state(), keep=self.rank == 0)
        self.sharded_state.release()  # its shards, the optimiser's state and the FSDP modules go before the copy loads
        self.model = self.optimizer = self.trainable = self.bundle.model = None
        gc.collect()  # FSDP's hooks hold the modules in reference cycles
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.rank == 0:
            self.bundle = students.load_student(self.spec.model, device=str(self.device))
            text_encoder_to_host(self.bundle, self.device)
            self._trainable_model()
            self._load_trained_state(whole)
            self.bundle.model.eval()
            tqdm.write(f"student: gathered {len(whole)} trained tensors from {self.world} shards")

    @torch.no_grad()
    def sample_grid(self, count: int = 4):
        prompts = [f"a {p.subject.token} {p.subject.class_noun}" for p in self.joint_params] or [self.instance_prompt]
        codes = self.bundle.generate(
            [prompts[i % len(prompts)] for i in range(count)],
            [self.params.evaluation.seed + i for i in range(count)],
            **self.sampling,
        )
        seen = self.bundle.decode_codes(self.codes[:count])  # what it trained on, through the tokenizer
        return grid([seen, self.bundle.decode_codes(codes)], cell=min(self.bundle.image_size * 2, 256))

    def _save_weights(self, folder: Path) -> Path:
        """The adapter (peft format) or, for full fine-tuning, the whole state dict; returns the weights file."""
        if self.full_finetune:
            path = folder / FULL_WEIGHTS
            path.parent.mkdir()
            state, seen = {}, set()
            for key, value in sorted(self.bundle.model.state_dict().items()):
                value = value.detach().cpu().contiguous()
                # tied weights (tiny-janus's head and embeddings) are one tensor: safetensors wants each key its own
                state[key] = value.clone() if value.data_ptr() in seen else value
                seen.add(value.data_ptr())
            write_bytes_atomic(path, safetensors_bytes(state, {"base_model": self.spec.model, "backend": self.bundle.backend}))
            return path
        adapter = folder / "adapter"
        model = self.bundle.model
        lora = model.peft_config[model.active_adapter]  # what peft writes as adapter_config.json
        lora.base_model_name_or_path = self.spec.model  # as the spec names it (tiny name, hub id, path), not the cache folder
        if isinstance(lora.target_modules, (set, list)):
            lora.target_modules = sorted(lora.target_modules)  # peft writes a set as a list in any order
        # LoRA never targets the embeddings (Llama projections only); False also skips peft's check for
        # a base config.json, which student folders lack (it warned and asked the hub, even offline).
        model.save_pretrained(str(adapter), save_embedding_layers=False)
        return adapter / "adapter_model.safetensors"

    def save(self, out_dir: Path) -> None:
        spec = self.spec
        tags = {**base_model_tags(spec.model), "backend": self.bundle.backend, "recipe": spec.recipe}
        if self.proxy is not None:
            tags.update({
                "teacher_version": self.proxy["teacher_version"],
                "proxy_digest": self.proxy["digest"],
                "proxy_prompts_digest": self.proxy["prompts_digest"],
                "proxy_images": str(len(self.codes)),
                "synthesis_run_id": self.proxy["run_id"],
            })
        with stage_run(self.params, "student", tags) as run, staged_dir(out_dir) as tmp:
            run.log_params({"student": spec.model_dump(mode="json"), "seed": self.params.seed, "sampling": self.sampling})
            run.log_params({"dropout": self.dropout})  # what student.dropout resolved to
            logged = {"distill": spec.regularisers.prior_distillation > 0, "z_loss": hasattr(self.bundle, "sequence_loss")}
            for key in SERIES:
                if logged.get(key, True):
                    run.log_series(key, self.progress.series[key])
            for subject_params in (self.joint_params or [self.params]) if self.proxy is not None else []:
                proxy_dir = subject_params.out("proxy")
                run.log_dataset(proxy_dir, name=f"{subject_params.experiment}.{subject_params.subject.name}.proxy",
                                digest=read_record(proxy_dir, SynthesisRecord).digest, context="training")
            weights = self._save_weights(tmp)
            adapter_digest = sha256_file(weights)
            self.sample_grid().save(tmp / "samples.png")
            run.log_artifact(tmp / "samples.png")
            registered = weights.parent
            version = run.register(
                registered,
                "student",
                {**base_model_tags(spec.model), "backend": self.bundle.backend, "recipe": spec.recipe,
                 "adapter_digest": adapter_digest,
                 **({"teacher_version": self.proxy["teacher_version"], "proxy_digest": self.proxy["digest"]}
                    if self.proxy is not None else {})},
            )
            training.write_curves(tmp, self.progress.series)  # after register: not part of the weights
            if self.count_state is not None:
                self.count_state.write(tmp / layout.COUNT_FILE)
                if self.count_state.chosen is not None:
                    run.log_params({"proxy_count.chosen": self.count_state.chosen, "proxy_count.stopped": self.count_state.stopped})
                    run.log_metrics({"proxy_count.chosen": self.count_state.chosen})
            write_record(
                tmp,
                StudentRecord(
                    stage="student",
                    run_id=run.run_id,
                    model=f"{run.experiment}.{run.subject}.student",
                    version=version,
                    **base_model_tags(spec.model),
                    backend=self.bundle.backend,
                    recipe=spec.recipe,
                    weights=weights.relative_to(tmp).as_posix(),
                    adapter_digest=adapter_digest,
                    proxy_digest=self.proxy["digest"] if self.proxy is not None else None,
                    teacher_version=self.proxy["teacher_version"] if self.proxy is not None else None,
                    final_loss=self.progress.losses[-1],
                    sampling=self.sampling,
                ),
            )
        tqdm.write(f"student: registered {run.experiment}.{run.subject}.student version {version}")


def processes(params_path: str | Path) -> int:
    """How many data-parallel processes the CLI launches this stage with (accelerate)."""
    return load_params(params_path).student.processes


def run(params_path: str | Path) -> None:
    params = load_params(params_path)
    state, chosen_dir = None, None
    if params.grow is not None and params.grow.index is not None:  # a step of a growing proxy count
        state = proxy_count.state_before(params)
        if state.stopped is not None:
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # under accelerate launch: one process writes
                proxy_count.hand_on(state, params.out("student"))
            tqdm.write(f"student: skipped, the proxy count was chosen before this step ({state.stopped})")
            return
    elif params.grow is not None:  # the subject's own student: the growth's choice
        state, chosen_dir = proxy_count.chosen_step(params)
        tqdm.write(f"student: {state.chosen} proxies chosen by the growing proxy count ({state.stopped})")
    trainer = StudentTrainer(params, state, chosen_dir)
    trainer.setup()
    trainer.train()
    if trainer.rank == 0:
        trainer.save(params.out("student"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", required=True)
    run(parser.parse_args().params)
