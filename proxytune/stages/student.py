"""Student stage: LoRA on an autoregressive image generator, trained on the proxy set only.

The student never sees the real references. Proxy images are tokenized by the student's VQ
tokenizer once (codes cached by dataset index), captions encoded once per distinct prompt; each
step then costs one transformer forward/backward. Output folder `student/`: adapter/ (peft format,
loads with `PeftModel.from_pretrained`), samples.png, record.json.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from proxytune import faults
from proxytune.backends import ar
from proxytune.files import sha256_file, staged_dir, write_bytes_atomic, write_json_atomic
from proxytune.images import center_crop_resize, grid, open_rgb
from proxytune.stages import common
from proxytune.stages.params import StageParams, load_params


@dataclass
class TrainingProgress:
    step: int = 0
    losses: list[float] = field(default_factory=list)


class StudentRecipe:
    def __init__(self, params: StageParams):
        self.params = params
        self.cfg = params.student
        self.device = common.device()
        self.proxy_dir = params.out("proxy")

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.generator = common.seed_everything(self.params.seed + cfg.seed_offset)
        self.proxy = common.read_record(self.proxy_dir)
        self.manifest = json.loads((self.proxy_dir / "manifest.json").read_text())
        self.bundle = ar.load_student(cfg.model, device=str(self.device))
        self.checkpoint_dir = self.params.work("student") / common.config_key(
            self.params.seed, cfg.model_dump(), self.proxy["digest"]
        )
        self._cache_inputs()
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.rank,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=ar.LORA_TARGET_MODULES,
        )
        torch.manual_seed(self.params.seed + cfg.seed_offset)  # LoRA init draws from the global RNG
        self.bundle.model = get_peft_model(self.bundle.model, lora)
        self.trainable = [p for p in self.bundle.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=cfg.learning_rate, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
        )
        self.progress = TrainingProgress()
        self._maybe_resume()

    @torch.no_grad()
    def _cache_inputs(self) -> None:
        """VQ codes of every proxy image and text features of every distinct prompt, computed once.

        Cached in the scratch folder (keyed by model and proxy digest) so a resumed run skips it.
        """
        from safetensors.torch import load_file, save

        cache = self.checkpoint_dir / "inputs.safetensors"
        entries = self.manifest["images"]
        prompts = sorted({e["prompt"] for e in entries})
        self.prompt_index = torch.tensor([prompts.index(e["prompt"]) for e in entries])  # (N,)
        if cache.exists():
            tensors = load_file(cache)
            self.codes, self.text_feats = tensors["codes"], tensors["text_feats"]
            return
        size = self.bundle.image_size
        codes = []
        for start in tqdm(range(0, len(entries), 16), desc="student: tokenize proxies", unit="batch", leave=False):
            images = [center_crop_resize(open_rgb(self.proxy_dir / e["file"]), size) for e in entries[start : start + 16]]
            pixels = self.bundle.images_to_pixels(images).to(self.device)
            codes.append(self.bundle.encode_images(pixels).cpu())
        self.codes = torch.cat(codes)  # (N, L)
        self.text_feats = self.bundle.encode_prompts(prompts).cpu()  # (P, C, Dt)
        write_bytes_atomic(cache, save({"codes": self.codes.contiguous(), "text_feats": self.text_feats.contiguous()}))

    # -- checkpointing ---------------------------------------------------------------------------
    def _maybe_resume(self) -> None:
        checkpoint = common.load_checkpoint(self.checkpoint_dir)
        if checkpoint is None:
            return
        from peft.utils import set_peft_model_state_dict

        lora, state = checkpoint
        set_peft_model_state_dict(self.bundle.model, lora)
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.progress = TrainingProgress(step=int(state["step"]), losses=list(state["losses"]))
        tqdm.write(f"student: resuming from step {self.progress.step} ({self.checkpoint_dir})")

    def save_checkpoint(self) -> None:
        """LoRA weights, optimiser, RNG and step."""
        from peft.utils import get_peft_model_state_dict

        state = {
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "step": self.progress.step,
            "losses": self.progress.losses,
        }
        common.save_checkpoint(self.checkpoint_dir, get_peft_model_state_dict(self.bundle.model), state)

    # -- training ------------------------------------------------------------------------------
    def train_step(self) -> float:
        cfg = self.cfg
        # 1. a batch of proxy images (codes) and their captions (features), by dataset index
        index = torch.randint(len(self.codes), (cfg.batch_size,), generator=self.generator)
        codes = self.codes[index].to(self.device)  # (B, L)
        text = self.text_feats[self.prompt_index[index]].to(self.device)  # (B, C, Dt)
        # 2. next-token loss on image tokens only, captions dropped for CFG with p = cfg_dropout
        loss = self.bundle.loss(text, codes, cfg_dropout=cfg.cfg_dropout, generator=self.generator)
        # 3. update
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def train(self) -> None:
        cfg = self.cfg
        tokens = self.codes.shape[1] * cfg.batch_size
        tqdm.write(
            f"student: {len(self.codes)} proxy images ({self.codes.shape[1]} codes each), {cfg.steps} steps x batch "
            f"{cfg.batch_size} = {tokens} image tokens/step, {sum(p.numel() for p in self.trainable):,} trainable params"
        )
        self.bundle.model.train()
        bar = tqdm(total=cfg.steps, initial=self.progress.step, desc="student", unit="step")
        while self.progress.step < cfg.steps:
            loss = self.train_step()
            self.progress.step += 1
            self.progress.losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if self.progress.step % cfg.checkpoint_every == 0 and self.progress.step < cfg.steps:
                self.save_checkpoint()
            faults.checkpoint("student", "step", self.progress.step)
        bar.close()
        self.bundle.model.eval()

    @torch.no_grad()
    def sample_grid(self, count: int = 4):
        prompt = self.manifest["images"][0]["prompt"]
        sampling = self.cfg.sampling
        codes = self.bundle.generate(
            [prompt] * count,
            [self.params.evaluation.seed + i for i in range(count)],
            cfg_scale=sampling.cfg_scale,
            top_k=sampling.top_k,
            temperature=sampling.temperature,
        )
        proxies = [open_rgb(self.proxy_dir / e["file"]) for e in self.manifest["images"][:count]]
        return grid([proxies, self.bundle.decode_codes(codes)], cell=min(self.bundle.image_size * 2, 256))

    def save(self, out_dir: Path) -> None:
        tags = {
            "teacher_version": self.proxy["teacher_version"],
            "proxy_digest": self.proxy["digest"],
            "proxy_prompts_digest": self.proxy["prompts_digest"],
            "proxy_images": str(self.proxy["num_images"]),
            "synthesis_run_id": self.proxy["run_id"],
            "base_model": self.cfg.model,
        }
        with common.stage_run(self.params, "student", tags) as run, staged_dir(out_dir) as tmp:
            run.log_params({"student": self.cfg.model_dump(mode="json"), "seed": self.params.seed})
            run.log_series("loss", self.progress.losses)
            run.log_dataset(self.proxy_dir, name=f"{self.params.experiment}.{self.params.subject.name}.proxy",
                            digest=self.proxy["digest"], context="training")
            adapter = tmp / "adapter"
            self.bundle.model.save_pretrained(str(adapter))
            # Name the base model as the spec does (a tiny name, hub id or path), not the cache folder.
            config_path = adapter / "adapter_config.json"
            adapter_config = json.loads(config_path.read_text())
            adapter_config["base_model_name_or_path"] = self.cfg.model
            if isinstance(adapter_config.get("target_modules"), list):  # peft writes a set: order varies per run
                adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
            write_json_atomic(config_path, adapter_config)
            adapter_digest = sha256_file(adapter / "adapter_model.safetensors")
            self.sample_grid().save(tmp / "samples.png")
            run.log_artifact(tmp / "samples.png")
            version = run.register(
                adapter,
                "student",
                {"base_model": self.cfg.model, "backend": "ar-llamagen", "adapter_digest": adapter_digest,
                 "teacher_version": self.proxy["teacher_version"], "proxy_digest": self.proxy["digest"]},
            )
            common.write_record(
                tmp,
                {
                    "stage": "student",
                    "run_id": run.run_id,
                    "model": f"{run.experiment}.{run.subject}.student",
                    "version": version,
                    "base_model": self.cfg.model,
                    "adapter_digest": adapter_digest,
                    "proxy_digest": self.proxy["digest"],
                    "teacher_version": self.proxy["teacher_version"],
                    "final_loss": self.progress.losses[-1],
                },
            )
        tqdm.write(f"student: registered {run.experiment}.{run.subject}.student version {version}")


def run(params_path: str | Path) -> None:
    params = load_params(params_path)
    recipe = StudentRecipe(params)
    recipe.setup()
    recipe.train()
    recipe.save(params.out("student"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", required=True)
    run(parser.parse_args().params)
