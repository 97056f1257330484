"""Evaluation scoring: the evaluate stage's CLIP-I / CLIP-T / DINO scoring of N generated images vs
the same scores from plain transformers calls written here.

optimised: `subject_scores.per_image_scores` (the scorers the evaluation registers) with `encoders.load_clip` and
           `encoders.load_dino`, under the stage's global settings (`runtime.seed_everything`).
plain:     `CLIPModel.get_image_features` / `get_text_features` on the CLIP processor's and tokenizer's
           output, `ViTModel(...).last_hidden_state[:, 0]` on the DreamBench DINO preprocessing,
           cosine similarities by hand; batches of 32 images and 64 texts, as the stage's encoders
           use; no deterministic mode.
Both score the same images (the DreamBench dog references and their mirror images, at 64 px as the
tiny student makes them) against the same reference embeddings, with tiny-clip and tiny-dino.
Both must give the same scores (checked, within 1e-5).

Target (issue 27): time stage / plain <= 0.9.

    python benchmarks/evaluation_scoring.py              # ~1 minute on 2 cores
    python benchmarks/evaluation_scoring.py --images 64
"""

from __future__ import annotations

import _common as C

TARGET = 0.9
TOKEN = "S*"


def inputs(count: int):
    from PIL import ImageOps

    from proxytune.images import load_references

    references = load_references(C.dreambench_subject("dog"), 64)
    images = [references[i % len(references)] if (i // len(references)) % 2 == 0
              else ImageOps.mirror(references[i % len(references)]) for i in range(count)]
    prompts = [f"a {TOKEN} dog on the beach", f"a {TOKEN} dog in the snow"]
    per_prompt = count // len(prompts)
    return references, [images[i * per_prompt : (i + 1) * per_prompt] for i in range(len(prompts))], prompts


class StageScoring:
    def __init__(self, references, images, prompts):
        from proxytune.backends import encoders
        from proxytune.stages.runtime import seed_everything

        seed_everything(0)
        self.clip, self.dino = encoders.load_clip("tiny-clip"), encoders.load_dino("tiny-dino")
        self.refs = self.clip.image_embeds(references), self.dino.image_embeds(references)
        self.images, self.prompts = images, prompts

    def score(self) -> dict:
        import torch

        from proxytune.backends import subject_scores

        torch.use_deterministic_algorithms(True, warn_only=True)  # as the stage runs (flags are per process)
        return subject_scores.per_image_scores(self.images, self.prompts, TOKEN, self.clip, self.dino, *self.refs)


class PlainScoring:
    def __init__(self, references, images, prompts, stage: StageScoring):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, ViTModel

        from proxytune.backends import dreambench_prompts

        clip_path, dino_path = stage.clip.path, stage.dino.path  # the same weights, loaded again here
        self.clip = CLIPModel.from_pretrained(clip_path).eval()
        self.processor = AutoImageProcessor.from_pretrained(clip_path, backend="pil")
        self.tokenizer = AutoTokenizer.from_pretrained(clip_path)
        self.dino = ViTModel.from_pretrained(dino_path, add_pooling_layer=False).eval()
        self.flat = [image for group in images for image in group]
        self.texts = [dreambench_prompts.strip_identifier(p, TOKEN) for p, group in zip(prompts, images) for _ in group]
        self.ref_clip, self.ref_dino = self.clip_images(references), self.dino_images(references)

    def clip_images(self, images):
        import torch

        feats = []
        with torch.no_grad():
            for start in range(0, len(images), 32):
                pixels = self.processor(images=images[start : start + 32], return_tensors="pt")["pixel_values"]
                out = self.clip.get_image_features(pixel_values=pixels)
                feats.append(out if isinstance(out, torch.Tensor) else out.pooler_output)
        return torch.nn.functional.normalize(torch.cat(feats), dim=-1)

    def clip_texts(self, texts):
        import torch

        feats = []
        with torch.no_grad():
            for start in range(0, len(texts), 64):
                tokens = self.tokenizer(texts[start : start + 64], padding=True, truncation=True,
                                        max_length=self.clip.config.text_config.max_position_embeddings, return_tensors="pt")
                out = self.clip.get_text_features(**tokens)
                feats.append(out if isinstance(out, torch.Tensor) else out.pooler_output)
        return torch.nn.functional.normalize(torch.cat(feats), dim=-1)

    def dino_images(self, images):
        import torch

        from proxytune.backends.encoders import dino_preprocess

        feats = []
        with torch.no_grad():
            for start in range(0, len(images), 32):
                feats.append(self.dino(pixel_values=dino_preprocess(images[start : start + 32])).last_hidden_state[:, 0])
        return torch.nn.functional.normalize(torch.cat(feats), dim=-1)

    def score(self) -> dict:
        import torch

        torch.use_deterministic_algorithms(False)
        gen_clip = self.clip_images(self.flat)
        return {
            "clip_i": (gen_clip @ self.ref_clip.T).mean(1).numpy(),
            "clip_t": (gen_clip * self.clip_texts(self.texts)).sum(1).numpy(),
            "dino": (self.dino_images(self.flat) @ self.ref_dino.T).mean(1).numpy(),
        }


def main() -> None:
    p = C.parser(__doc__.splitlines()[0], warmup=1, repeats=7, inner=1)
    p.add_argument("--images", type=int, default=32, help="generated images scored per call (default 32)")
    args = p.parse_args()
    C.prepare_env()
    C.say(f"evaluation_scoring: {C.now()}; {C.machine()}")
    C.say(f"\n== CLIP-I, CLIP-T and DINO of {args.images} images (64 px) against the dog references; tiny-clip, tiny-dino")
    references, images, prompts = inputs(args.images)
    stage = StageScoring(references, images, prompts)
    plain = PlainScoring(references, images, prompts, stage)
    import numpy as np

    a, b = stage.score(), plain.score()
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    samples = C.time_interleaved({"plain": plain.score, "stage": stage.score}, warmup=args.warmup,
                                 repeats=args.repeats, inner=args.inner)
    t_plain, t_stage = C.median(samples.times["plain"]), C.median(samples.times["stage"])
    C.say("")
    C.table(["variant", "median s / call", "min-max s", "images/s"], [
        ["plain transformers calls", f"{t_plain:.4f}", C.spread(samples.times["plain"]), f"{args.images / t_plain:.1f}"],
        ["stage (subject_scores.per_image_scores)", f"{t_stage:.4f}", C.spread(samples.times["stage"]), f"{args.images / t_stage:.1f}"],
    ])
    C.say(f"\n  largest score difference stage vs plain: {diff:.2e} ({'same scores' if diff < 1e-5 else 'DIFFERENT'})")
    C.say("  " + samples.note())
    C.say(f"  RESULT: time stage/plain = {t_stage / t_plain:.3f}x (target <= {TARGET:g}x): {C.verdict(t_stage / t_plain <= TARGET)}")


if __name__ == "__main__":
    main()
