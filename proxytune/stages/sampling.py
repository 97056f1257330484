"""How stages draw images: in fixed blocks that a resumed run redoes whole, and, for the evaluation
stages, one sampler per model (teacher, student, tuned or base) behind a cache of its images.

Not a stage: the evaluation stages (evaluate, style_evaluate) and the generating ones (teacher's class
images, synthesis, curation) import it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from proxytune.backends import students, tiny_cache
from proxytune.backends.students.api import sampling_settings
from proxytune.backends.teachers import diffusion
from proxytune.files import digest_dir, sha256_file, write_png_atomic
from proxytune.images import is_readable, open_rgb
from proxytune.outputs import StudentRecord, read_record
from proxytune.stages.params import StageParams
from proxytune.stages.runtime import base_model_tags, config_key, device, generation_dtype


def unfinished_blocks(paths: list[Path], size: int) -> list[list[int]]:
    """The indices of `paths` in fixed blocks of `size`, keeping the blocks with a missing or unreadable file.

    The blocks are fixed, whatever is missing, and regenerated whole: float kernels may round
    differently for another batch shape, and a resumed run must write the same bytes as an
    uninterrupted one.
    """
    blocks = [list(range(i, min(i + size, len(paths)))) for i in range(0, len(paths), size)]
    return [block for block in blocks if not all(is_readable(paths[i]) for i in block)]


def seeds_for(params: StageParams, prompt_index: int) -> list[int]:
    """The evaluation seeds of one prompt: image k of prompt p gets `evaluation.seed + 1000 p + k`."""
    evaluation = params.evaluation
    return [evaluation.seed + 1000 * prompt_index + k for k in range(evaluation.images_per_prompt)]


@torch.no_grad()
def sample_prompts(sampler, params: StageParams, prompts: list[str], name: str, stage: str = "evaluate") -> list[list]:
    """Per prompt, `evaluation.images_per_prompt` images of `sampler` with the prompt's `seeds_for`."""
    return [sampler([p] * params.evaluation.images_per_prompt, seeds_for(params, i))
            for i, p in enumerate(tqdm(prompts, desc=f"{stage}: {name}", unit="prompt"))]


# -- evaluation samplers: one object per model with the same call ------------------------------
TEACHER_SAMPLES = Path(".proxytune") / "teacher_samples"  # under the project root (the stage's cwd)
STUDENT_SAMPLES = Path(".proxytune") / "student_samples"


class SampleCache:
    """One model's images, a folder per call: FOLDER/KEY/NNN.png, KEY a digest of `setting` (everything
    the images depend on besides the call) and the call's prompts and seeds.

    A call is always one batch, so cached bytes equal generated ones (PNG is lossless). A missing or
    damaged file means the whole call is generated again.
    """

    def __init__(self, folder: Path, setting: tuple):
        self.folder, self.setting = folder, setting

    def __call__(self, prompts: list[str], seeds: list[int], generate) -> list:
        from proxytune.errors import ProxytuneError

        folder = self.folder / config_key(*self.setting, prompts, seeds)
        paths = [folder / f"{i:03d}.png" for i in range(len(prompts))]
        try:
            return [open_rgb(path) for path in paths]
        except ProxytuneError:
            pass
        images = generate(prompts, seeds)
        for path, image in zip(paths, images):
            write_png_atomic(path, image)
        return images


class TeacherSampler:
    """The teacher pipeline with its LoRA (or, `tuned=False`, the base pipeline), behind a sample cache.

    A teacher's images depend only on its adapter files and the sampler settings, so each call's
    images are kept under .proxytune/teacher_samples/KEY. Re-evaluating after a student change, a
    student variant, or a crash after sampling reuses them, and the pipeline is loaded only when
    something is missing. The base teacher has no adapter: its key says "base" (and, for a toy model,
    the digest of its shipped weights) instead of the adapter digest and LoRA scale, so every
    evaluation of the same base model, prompts and seeds shares its images.
    """

    def __init__(self, params: StageParams, tuned: bool = True):
        self.params = params
        self.adapter = params.out("teacher") / "adapter" if tuned else None
        t, s = params.teacher, params.synthesis
        # a toy model's name stays while its shipped weights may change: the base key carries their digest
        base = "base:" + base_model_tags(t.model).get("base_model_digest", "")
        self.cache = SampleCache(TEACHER_SAMPLES, (digest_dir(self.adapter) if tuned else base, t.model, t.revision,
                                                   t.resolution, s.lora_scale if tuned else None,
                                                   s.num_inference_steps, s.guidance_scale,
                                                   str(generation_dtype(s.dtype)),
                                                   # a quantised base samples other images; the default keeps old keys
                                                   *([s.quantize] if s.quantize != "none" else [])))
        self._pipe = None
        self.path = diffusion.resolve(params.teacher.model)
        self.random_init = tiny_cache.is_random_init(self.path)

    @property
    def pipe(self):
        if self._pipe is None:
            params = self.params
            dtype = generation_dtype(params.synthesis.dtype)
            if self.adapter is None:
                self._pipe = diffusion.load_pipeline(params.teacher.model, revision=params.teacher.revision, dtype=dtype,
                                                     quantize=params.synthesis.quantize,
                                                     quantize_field="synthesis.quantize")
            else:
                self._pipe = diffusion.load_pipeline_with_lora(
                    params.teacher.model, self.adapter, revision=params.teacher.revision, scale=params.synthesis.lora_scale,
                    dtype=dtype, quantize=params.synthesis.quantize,
                )
            note = diffusion.place_for_generation(self._pipe, device(), cpu_offload=params.synthesis.cpu_offload,
                                                  vae_tiling=params.synthesis.vae_tiling)
            if note:
                tqdm.write(note)
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    def __call__(self, prompts: list[str], seeds: list[int]) -> list:
        s = self.params.synthesis
        return self.cache(prompts, seeds, lambda p, k: diffusion.generate(
            self.pipe, p, k, steps=s.num_inference_steps, guidance=s.guidance_scale, size=self.params.teacher.resolution))


class StudentSampler:
    """The tuned student (its adapter or full weights), or with `tuned=False` the base student, behind
    a sample cache (.proxytune/student_samples/KEY) like the teacher's: every variant of an experiment
    evaluates the same base student on the same prompts and seeds, and draws it once. The key holds
    the tuned weights' digest (or "base" and the resolved checkpoint folder), and the sampler settings;
    the model is loaded only when something is missing."""

    def __init__(self, params: StageParams, tuned: bool = True, *, sampling: dict | None = None, bundle=None):
        """
        Args:
            sampling: the sampler settings (default: the spec's over the backend's defaults).
            bundle: an already loaded base student to draw with (`tuned=False` only).
        """
        if bundle is not None and tuned:
            raise ValueError("StudentSampler: a given bundle is drawn as the base student (tuned=False)")
        self.params = params
        student = params.student
        self.path = students.resolve(student.model)
        self.random_init = tiny_cache.is_random_init(self.path)
        if sampling is None:
            sampling = sampling_settings(students.detect(self.path, student.model), student.sampling)
        self.sampling = sampling
        self.weights = self._weights_file(params) if tuned else None
        if self.weights is None:
            identity = "base:" + base_model_tags(student.model).get("base_model_digest", "")
        elif self.weights.parent.name == "adapter":
            identity = digest_dir(self.weights.parent)
        else:
            identity = sha256_file(self.weights)
        self.cache = SampleCache(STUDENT_SAMPLES, (identity, student.model, str(self.path), self.sampling))
        self._bundle = bundle

    @staticmethod
    def _weights_file(params: StageParams) -> Path:
        # the student stage's record names its weights: a peft adapter, or full weights (direct-full)
        folder = params.student_out()  # the subject's own, or the experiment's multi-subject student
        return folder / (read_record(folder, StudentRecord).weights or "adapter/adapter_model.safetensors")

    @property
    def bundle(self):
        if self._bundle is None:
            self._bundle = students.load_student(self.params.student.model, device=str(device()))
            if self.weights is not None and self.weights.parent.name == "adapter":
                from peft import PeftModel

                self._bundle.model = PeftModel.from_pretrained(self._bundle.model, str(self.weights.parent)).eval()
            elif self.weights is not None:
                from safetensors.torch import load_file

                self._bundle.model.load_state_dict(load_file(self.weights))
        return self._bundle

    def __call__(self, prompts: list[str], seeds: list[int]) -> list:
        """The images of `prompts`, `evaluation.student_batch_size` at a time (each batch its own cache entry)."""
        size = self.params.evaluation.student_batch_size or len(prompts)
        images = []
        for start in range(0, len(prompts), size):
            images += self.cache(prompts[start : start + size], seeds[start : start + size],
                                 lambda p, k: self.bundle.decode_codes(self.bundle.generate(p, k, **self.sampling)))
        return images
