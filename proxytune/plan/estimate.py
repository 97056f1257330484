"""Peak accelerator memory and time of each stage of a spec, without weights or a GPU.

How the numbers are made:
- **Weights, gradients, optimiser state**: exact parameter counts of each component built from its
  config on the meta device (the LoRA's from peft injected into that meta model with the spec's rank
  and targets), times the bytes of the dtype the stage holds them in: frozen weights in the stage's
  dtype, LoRA parameters and their gradients in float32, AdamW's two states in float32 (8-bit AdamW:
  2 bytes a parameter).
- **Activations**: one step (forward and backward for training) traced on fake tensors
  (`trace.trace_step`) at batch 1 on a shallow copy of the model: every repeated block kind
  (`models.depth_knobs`: a UNet level's transformer depth, FLUX's double and single blocks, a
  decoder's layers) at 1 block (SD3: 2), then once more with that kind one block deeper. Peak bytes,
  bytes still alive after the step and FLOPs are linear in each depth (each block adds the
  activations it saves for backward, the backward peak is where all of them are alive), so the full
  model's figure is shallow + sum over kinds of (full - shallow) x (one deeper - shallow). They are
  also linear in the batch, so a batch of B is B x the batch-1 figure. A batch-1 trace of a shallow
  SDXL UNet at 1024 px takes seconds instead of the ~20 minutes of the full model, and traces are
  cached under PROXYTUNE_HOME/plan. Gradient checkpointing is traced as it runs (the recomputation
  happens inside the traced backward). Checked against the CPU allocator on deeper-than-traced models
  at batch 4-8 (`proxytune.plan.measure`, tests/test_plan.py at 15 %): -0.9 % (UNet), -1.3 %
  (LlamaGen), -4.9 % (LlamaGen, checkpointing), -1.0 % (LlamaGen, bf16), +1.3 % (MMDiT); a scaled trace is within 2 % of the
  full-depth one. What it does not see (CUDA kernels' own workspaces and attention backends, the
  caching allocator's fragmentation, the optimiser step's temporaries) is what `gpus.RESERVED_GIB`
  leaves free.
- **Time**: the traced FLOPs (matmuls, convolutions, attention) times the steps or images, at the
  GPU's bf16 or fp32 peak times `gpus.EFFICIENCY`; autoregressive sampling also by reading every
  weight once per token at the GPU's bandwidth, whichever is slower.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from proxytune.plan import models, steps
from proxytune.plan.gpus import EFFICIENCY, PCIE_GBS, RESERVED_GIB, Gpu
from proxytune.plan.trace import trace_step

GIB = 2**30
# 2: FLOPs counted in LiveBytes (checkpointed steps were too big); 3: Lumina-mGPT's chunked loss;
# 4: counts of frozen Linear weights (teacher.quantize); 5: and of their NF4 blocks
TRACE_VERSION = 5
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class StageEstimate:
    """One stage's expected peak memory (bytes, by kind) and time on one GPU."""

    stage: str
    what: str
    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    flops: float = 0.0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    fits: bool | None = None
    suggestion: str | None = None
    setup: int = 0  # bytes on the GPU before the step starts, where more is loaded then (text encoders)

    @property
    def peak(self) -> int:
        return max(self.setup, self.weights + self.gradients + self.optimizer + self.activations)

    def check(self, gpu: Gpu) -> bool:
        self.fits = self.peak <= (gpu.memory_gib - RESERVED_GIB) * GIB
        return self.fits


# -- traces, cached -------------------------------------------------------------------------------
def _cache_dir() -> Path:
    home = Path(os.environ.get("PROXYTUNE_HOME", Path.home() / ".cache" / "proxytune")).expanduser()
    return home / "plan" / "traces"


def _cached(key: dict, make) -> dict:
    digest = hashlib.sha256(json.dumps({**key, "v": TRACE_VERSION, "torch": torch.__version__},
                                       sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = _cache_dir() / f"{digest}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    result = make()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two plans at once each write their own
        tmp.write_text(json.dumps(result))
        tmp.replace(path)
    except OSError:  # a read-only home only costs the next run the same seconds
        pass
    return result


def scaled_trace(component: models.Component, step_key: dict, make_step) -> dict:
    """Peak, end bytes and FLOPs of the full-depth component at batch 1, from shallow traces.

    Args:
        component: the model at full depth.
        step_key: everything besides the config that changes the trace (for the cache key).
        make_step: component -> (build, step) for `trace.trace_step`.
    """
    knobs = models.depth_knobs(component)
    shallow = {path: low for path, low, _ in knobs}

    def run(values: dict) -> dict:
        part = models.with_knobs(component, values)

        def make() -> dict:
            build, step = make_step(part)
            found = trace_step(build, step)
            return {"peak": found.peak_bytes, "end": found.end_bytes, "flops": found.flops}

        return _cached({"kind": part.kind, "config": part.config, **step_key}, make)

    base = run(shallow)
    total = dict(base)
    for path, low, full in knobs:
        deeper = run({**shallow, path: low + 1})
        for name in total:
            total[name] += (full - low) * (deeper[name] - base[name])
    return total


def count(component: models.Component, options: steps.Options | None = None) -> dict[str, int]:
    """Exact frozen and trainable parameter counts (LoRA from peft when options name a rank), cached
    like the traces: building a 7B model on the meta device still takes seconds."""

    def make() -> dict[str, int]:
        with torch.device("meta"):
            module = models.build(component)
            module.requires_grad_(options is not None and not options.lora_rank)
            if options is not None and options.lora_rank:
                from peft import LoraConfig, inject_adapter_in_model

                targets = options.lora_targets if isinstance(options.lora_targets, str) else list(options.lora_targets)
                inject_adapter_in_model(LoraConfig(r=options.lora_rank, lora_alpha=options.lora_rank,
                                                   target_modules=targets), module)
        return models.count_parameters(module)

    lora = {} if options is None else {"rank": options.lora_rank, "targets": options.lora_targets}
    return _cached({"count": component.kind, "config": component.config, "lora": lora}, make)


def shard_groups(component: models.Component, layer_classes: tuple[str, ...]) -> dict[str, int]:
    """Parameters of what `student.sharding: fsdp` gathers whole: {"layer": the largest decoder layer
    (classes `layer_classes`), "outside": everything outside the decoder layers (embeddings, head, norms:
    the root's group)}, from the meta model, cached like `count`."""

    def make() -> dict[str, int]:
        with torch.device("meta"):
            module = models.build(component)
        layers = [m for m in module.modules() if type(m).__name__ in layer_classes]
        sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        return {"layer": max(sizes, default=0), "outside": sum(p.numel() for p in module.parameters()) - sum(sizes)}

    return _cached({"shard_groups": component.kind, "config": component.config, "layers": list(layer_classes)}, make)


def params(count: float) -> str:
    """A parameter count for people: 2.57B, 11.6M, 40.0k."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}" if unit == "B" else f"{count / size:.1f}{unit}"
    return str(int(count))


def _time(flops: float, gpu: Gpu, half: bool) -> float:
    return flops / (gpu.tflops(half) * 1e12 * EFFICIENCY)


def frozen_bytes(counts: dict[str, int], dtype: str, quantize: str = "none") -> int:
    """Bytes of a component's frozen weights in `dtype`, quantised as `teacher.quantize` loads the denoiser
    (torchao's tensors, backends/teachers/quantize.py); what is not quantised (convolutions, norms, biases,
    embeddings, and for nf4 a weight of partial blocks) stays in `dtype`.

    int8: each frozen nn.Linear weight at 1 byte a value plus, per row, a float32 scale and an int8 zero
    point (`Int8Tensor`). fp8: 1 byte a value plus a float32 scale a row (`Float8Tensor`). nf4: half a byte a
    value, an int8 absmax a block of 64, and in `dtype` a scale a group of blocks, their mean and the
    16-entry quantile table a weight (`NF4Tensor`; `quantize.nf4_bytes`).
    """
    size = _BYTES[dtype]
    if quantize in ("int8", "fp8"):
        rows = counts["linear_rows"] * (4 + (quantize == "int8"))
        return counts["linear"] + rows + (counts["frozen"] - counts["linear"]) * size
    if quantize == "nf4":
        scales = (counts["nf4_groups"] + 17 * counts["nf4_tensors"]) * size  # group scales, mean, quantile table
        nf4 = counts["nf4_linear"] // 2 + counts["nf4_blocks"] + scales
        return nf4 + (counts["frozen"] - counts["nf4_linear"]) * size
    return counts["frozen"] * size


# -- stages ---------------------------------------------------------------------------------------
def _latent(teacher: models.TeacherModel, resolution: int) -> int:
    vae = teacher.parts.get("vae")
    factor = 2 ** (len(vae.config.get("block_out_channels", [0] * 4)) - 1) if vae else 8
    return resolution // factor


def _shape(teacher: models.TeacherModel, resolution: int) -> steps.DenoiserShape:
    return steps.DenoiserShape(teacher.family, _latent(teacher, resolution), t5_tokens=teacher.t5_tokens)


def teacher_training(spec, teacher: models.TeacherModel, gpu: Gpu) -> StageEstimate:
    """The DreamBooth LoRA step of `spec.teacher` (a TeacherSpec)."""
    half = spec.mixed_precision != "no"
    weights = "bfloat16" if half else "float32"
    options = steps.Options(weights=weights, autocast=half, checkpointing=spec.gradient_checkpointing,
                            lora_rank=spec.lora.rank, lora_targets=tuple(spec.lora.target_modules))
    denoiser = teacher.denoiser
    counts = count(denoiser, options)
    quantize = getattr(spec, "quantize", "none")
    denoiser_bytes = frozen_bytes(counts, weights, quantize)
    frozen = sum(count(part)["frozen"] for name, part in teacher.parts.items() if part is not denoiser and name != "vae")
    vae = count(teacher.parts["vae"])["frozen"] if "vae" in teacher.parts else 0
    # the text encoders leave the GPU once the prompts are encoded, unless one of them trains
    kept = frozen if spec.train_text_encoder else 0
    shape = _shape(teacher, spec.resolution)
    trace = scaled_trace(denoiser, {"step": "teacher", "shape": shape.__dict__, **options.key()},
                         lambda part: steps.denoiser_step(part, shape, options, train=True))
    batch = spec.batch_size * (2 if spec.prior_preservation.enabled else 1)
    trainable = counts["trainable"]
    est = StageEstimate(
        "teacher", f"{teacher.family} {'UNet' if denoiser.kind == 'unet' else 'transformer'} LoRA r{spec.lora.rank}, {spec.resolution} px, batch {batch}"
        f"{', bf16' if half else ', fp32'}{', checkpointing' if spec.gradient_checkpointing else ''}"
        f"{', 8-bit AdamW' if spec.use_8bit_adam else ''}{f', {quantize} denoiser' if quantize != 'none' else ''}",
        weights=denoiser_bytes + kept * _BYTES[weights] + vae * 4 + trainable * 4,
        gradients=trainable * 4, optimizer=trainable * (2 if spec.use_8bit_adam else 8),
        activations=batch * max(0, trace["peak"] - trace["end"]),
        setup=denoiser_bytes + frozen * _BYTES[weights] + vae * 4)
    est.flops = trace["flops"] * batch * spec.steps * spec.gradient_accumulation_steps
    est.seconds = _time(est.flops, gpu, half)
    est.notes.append(f"{params(counts['frozen'] + kept + vae)} frozen parameters on the GPU while training "
                     f"(denoiser {params(counts['frozen'])}), {params(trainable)} trained")
    if quantize != "none":
        est.notes.append(_quantized_note(counts, quantize, denoiser_bytes, weights))
    if frozen and not spec.train_text_encoder:
        est.notes.append(f"text encoders ({params(frozen)}, {frozen * _BYTES[weights] / GIB:.1f} GiB) on the GPU only "
                         f"while the prompts are encoded: {est.setup / GIB:.1f} GiB then")
    if spec.train_text_encoder:
        est.notes.append("the text encoder's LoRA is not counted")
    return est


def _quantized_note(counts: dict[str, int], quantize: str, held: int, dtype: str) -> str:
    """What a quantised denoiser holds, for the plan's notes."""
    if quantize == "nf4":
        what = f"its {params(counts['nf4_linear'])} Linear weights in whole 64-value blocks at 4 bits"
        left = counts["linear"] - counts["nf4_linear"]
        what += f" ({params(left)} in partial blocks stay {dtype})" if left else ""
    else:
        what = f"its {params(counts['linear'])} Linear weights at 1 byte"
    return f"{quantize} denoiser: {what} ({held / GIB:.1f} GiB, against {counts['frozen'] * _BYTES[dtype] / GIB:.1f})"


def generation_dtype(spec) -> str:
    """The dtype the teacher generates in: `synthesis.dtype` where the spec has it ("auto" is bfloat16 on
    the GPUs plan knows, all of which have it), else float32, as the synthesis stage loads it today."""
    choice = getattr(spec, "dtype", "float32")
    return "bfloat16" if choice == "auto" else choice


def vae_tile(vae: models.Component, latent: int) -> int:
    """Latent pixels a side the VAE decodes at once with `synthesis.vae_tiling`: diffusers' tile is the
    config's `sample_size` pixels, and only a larger latent is cut into tiles."""
    factor = 2 ** (len(vae.config.get("block_out_channels", [0] * 4)) - 1)
    size = vae.config.get("sample_size", 512)
    return min(latent, (size[0] if isinstance(size, list) else size) // factor)


def synthesis(spec, teacher: models.TeacherModel, resolution: int, gpu: Gpu, *, images: int | None = None,
              stage: str = "synthesis", steps_per_image: int | None = None, guidance: bool = True) -> StageEstimate:
    """Generating proxies (`spec` a SynthesisSpec) in its generation dtype.

    `quantize` (int8, fp8, nf4) weighs the denoiser as `frozen_bytes` does (its unfused LoRA, a few MB, is not counted).
    Without `cpu_offload` every model of the pipeline stays on the GPU; with it (diffusers' model CPU
    offload) only the running one is, so the peak is the largest of (a model + its activations), and every
    batch copies each model to the GPU and back at `gpus.PCIE_GBS`. `vae_tiling` decodes tiles of
    `vae_tile` latent pixels (the output image is still whole)."""
    dtype = generation_dtype(spec)
    offload, tiling = getattr(spec, "cpu_offload", False), getattr(spec, "vae_tiling", False)
    options = steps.Options(weights=dtype)
    shape = _shape(teacher, resolution)
    denoiser = teacher.denoiser
    forward = scaled_trace(denoiser, {"step": "sample", "shape": shape.__dict__, **options.key()},
                           lambda part: steps.denoiser_step(part, shape, options, train=False))
    decode, decoded = {"peak": 0, "flops": 0}, 0
    if "vae" in teacher.parts:
        vae = teacher.parts["vae"]
        latent = vae_tile(vae, shape.latent) if tiling else shape.latent
        decode = scaled_trace(vae, {"step": "decode", "latent": latent, "dtype": dtype},
                              lambda part: steps.vae_decode_step(part, latent, dtype))
        if latent < shape.latent:  # the tiles' FLOPs cover the image (overlaps aside); the image is kept whole
            decode = {"peak": decode["peak"], "flops": decode["flops"] * (shape.latent / latent) ** 2}
            decoded = 3 * resolution**2 * _BYTES[dtype]
    quantize = getattr(spec, "quantize", "none")  # the denoiser's base weights
    sizes = {name: frozen_bytes(count(part), dtype, quantize if part is denoiser else "none")
             for name, part in teacher.parts.items()}
    cfg = 2 if guidance and teacher.family != "flux" else 1  # FLUX.1-dev's guidance is an input, not a batch
    batch = spec.batch_size
    images = images if images is not None else spec.num_images
    denoise_steps = steps_per_image or spec.num_inference_steps
    denoising, decoding = batch * cfg * forward["peak"], batch * (decode["peak"] + decoded)
    what = (f"{teacher.family} sampling, {resolution} px, batch {batch}{' x2 (CFG)' if cfg == 2 else ''}, "
            f"{denoise_steps} steps, {images} images, {dtype}{f', {quantize} denoiser' if quantize != 'none' else ''}"
            f"{', CPU offload' if offload else ''}"
            f"{', VAE tiling' if tiling else ''}")
    if offload:  # one model at a time: the peak is the largest model with what it computes
        name_of_denoiser = "unet" if "unet" in teacher.parts else "transformer"
        running = {name: (size, denoising if name == name_of_denoiser else decoding if name == "vae" else 0)
                   for name, size in sizes.items()}
        name, (weights, activations) = max(running.items(), key=lambda item: sum(item[1]))
        est = StageEstimate(stage, what, weights=weights, activations=activations)
        est.notes.append(f"CPU offload: one model on the GPU at a time, the peak while the {name} runs; "
                         f"{sum(sizes.values()) / GIB:.1f} GiB of models copied in and out per batch")
    else:
        est = StageEstimate(stage, what, weights=sum(sizes.values()), activations=max(denoising, decoding))
    est.flops = images * (denoise_steps * cfg * forward["flops"] + decode["flops"])
    est.seconds = _time(est.flops, gpu, dtype != "float32")
    if offload:
        est.seconds += -(-images // batch) * 2 * sum(sizes.values()) / (PCIE_GBS * 1e9)
    return est


def _student_parts(student: models.StudentModel, text: bool = True) -> int:
    """Parameters of the student's separate parts (VQ, and the text encoder unless `text` is False)."""
    return sum(count(part)["frozen"] for name, part in student.parts.items()
               if name != "model" and (text or name != "text_encoder"))


def _lora_targets(student: models.StudentModel, groups: list[str]) -> tuple[str, ...] | str:
    from proxytune.backends.students.api import LORA_GROUPS

    if student.backend == "janus":
        from proxytune.backends.students.janus.backend import GROUP_PREFIX

        names = "|".join(rf"{GROUP_PREFIX[g]}\.({'|'.join(LORA_GROUPS[g])})" for g in groups)
        return r".*language_model\.layers\.\d+\.(" + names + ")"
    return tuple(name for g in groups for name in LORA_GROUPS[g])


def student_training(spec, student: models.StudentModel, gpu: Gpu) -> StageEstimate:
    """The student step of `spec.student` (a StudentSpec): LoRA, or every weight for recipe direct-full."""
    half = spec.mixed_precision != "no"
    full = spec.recipe == "direct-full"
    dtype = student.dtype if student.dtype in _BYTES else "float32"
    options = steps.Options(weights=dtype, autocast=half, checkpointing=spec.gradient_checkpointing,
                            lora_rank=0 if full else spec.lora.rank,
                            lora_targets=() if full else _lora_targets(student, list(spec.lora.groups)))
    model = student.parts["model"]
    counts = count(model, options)
    trainable = counts["trainable"]
    per_trained = _BYTES[dtype] if full else 4
    trace = scaled_trace(model, {"step": "student", "size": student.image_size, "prompt": student.prompt_tokens,
                                 **options.key()},
                         lambda part: steps.student_step(part, student.image_size, student.prompt_tokens, options))
    seq, codes = steps.student_sequence(model, student.image_size, student.prompt_tokens)
    batch = spec.batch_size
    est = StageEstimate(
        "student", f"{student.backend} {'full fine-tune' if full else f'LoRA r{spec.lora.rank}'}, {seq} tokens, "
        f"batch {batch}, {dtype} weights{', bf16 autocast' if half else ''}"
        f"{', checkpointing' if spec.gradient_checkpointing else ''}",
        weights=counts["frozen"] * _BYTES[dtype] + trainable * per_trained + _student_parts(student, text=False) * 4,
        gradients=trainable * per_trained,
        optimizer=trainable * (2 if getattr(spec, "use_8bit_adam", False) else 2 * per_trained),
        activations=batch * max(0, trace["peak"] - trace["end"]),
        setup=counts["frozen"] * _BYTES[dtype] + _student_parts(student) * 4)
    est.flops = trace["flops"] * batch * spec.steps * spec.gradient_accumulation_steps
    est.seconds = _time(est.flops, gpu, half or dtype != "float32")
    if getattr(spec, "use_8bit_adam", False):
        est.what += ", 8-bit AdamW"
    est.notes.append(f"{params(counts['frozen'] + trainable)} parameters in the model, {params(trainable)} trained"
                     + (f"; {params(_student_parts(student, text=False))} in its VQ (float32, on the GPU)"
                        if "vq" in student.parts else ""))
    if "text_encoder" in student.parts:
        text = count(student.parts["text_encoder"])["frozen"]
        est.notes.append(f"its text encoder ({params(text)}, float32) leaves the GPU once the prompts are encoded: "
                         f"{est.setup / GIB:.1f} GiB until then")
    if getattr(spec, "sharding", "none") == "fsdp":
        _shard(est, spec.processes, student, counts, dtype, per_trained)
    return est


def _shard(est: StageEstimate, shards: int, student: models.StudentModel, counts: dict, dtype: str,
           per_trained: int) -> None:
    """`student.sharding: fsdp` over `shards` processes (stages/sharding.py): each GPU holds 1/shards of
    the model's weights, gradients and AdamW state; activations are each process's own batch, unchanged.
    Gathered whole while they run (working memory, added to the weights and gradients): the parameters
    outside the decoder layers for the whole step, and two decoder layers (the running one and the one
    FSDP prefetches), with their gradients until they are reduce-scattered. The whole model is loaded onto
    each GPU before it is sharded (the setup)."""
    from proxytune.backends import students

    groups = shard_groups(student.parts["model"], students.family(student.backend).decoder_layers)
    total, trainable = counts["frozen"] + counts["trainable"], counts["trainable"]
    separate = _student_parts(student, text=False) * 4  # the VQ: not sharded
    gathered = groups["outside"] + 2 * groups["layer"]
    trained_share = trainable / total if total else 0.0  # of a gathered parameter, the part with a gradient
    est.weights = (est.weights - separate) // shards + gathered * _BYTES[dtype] + separate
    est.gradients = est.gradients // shards + int((groups["outside"] + groups["layer"]) * trained_share * per_trained)
    est.optimizer //= shards
    est.setup = max(est.setup, counts["frozen"] * _BYTES[dtype] + trainable * per_trained + _student_parts(student) * 4)
    est.what += f", sharded over {shards} GPUs (FSDP)"
    est.notes.append(f"sharded: each GPU holds 1/{shards} of the weights, gradients and AdamW state, plus "
                     f"{params(gathered)} parameters gathered whole while they run (outside the decoder layers, "
                     f"and two layers); the whole model passes through each GPU once while it is loaded")


def codes(student: models.StudentModel, images: int, gpu: Gpu, batch: int = 16) -> StageEstimate:
    """Encoding the proxies to codes with the student's image tokenizer: only it and the text encoder
    are on the accelerator (the generator stays on the CPU: `tokenizers_to`)."""
    dtype = student.dtype if student.dtype in _BYTES else "float32"
    model = student.parts["model"]
    encoder = student.parts.get("vq") or models.Component(
        {"chameleon": "chameleon-vq", "janus": "janus-vq"}.get(model.kind, ""), model.config)
    if "vq" in student.parts:  # separate parts (LlamaGen: VQ and T5), loaded in float32
        weights = _student_parts(student) * 4
    else:  # the VQ inside the model, in the model's dtype
        weights = count(encoder)["frozen"] * _BYTES[dtype] if encoder.kind else 0
    est = StageEstimate("codes", f"{student.backend} image tokenizer, {student.image_size} px, batch {batch}", weights=weights)
    if encoder.kind:
        vq_dtype = "float32" if "vq" in student.parts else dtype
        trace = scaled_trace(encoder, {"step": "encode", "size": student.image_size, "dtype": vq_dtype},
                             lambda part: steps.encoder_step(part, student.image_size, vq_dtype))
        est.activations = batch * trace["peak"]
        est.flops = images * trace["flops"]
        est.seconds = _time(est.flops, gpu, vq_dtype != "float32")
    return est


def student_sampling(spec, student: models.StudentModel, gpu: Gpu, images: int, batch: int) -> StageEstimate:
    """Evaluation images from the student: KV-cached sampling with the conditional and unconditional
    prompt in one batch (classifier-free guidance)."""
    dtype = student.dtype if student.dtype in _BYTES else "float32"
    model = student.parts["model"]
    counts = count(model)
    cfg = model.config.get("text_config", model.config)
    layers, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    heads, kv_heads = cfg.get("num_attention_heads", 1), cfg.get("num_key_value_heads") or cfg.get("num_attention_heads", 1)
    vocab = cfg.get("vocab_size", cfg.get("codebook_size", 16384))
    seq, codes_per_image = steps.student_sequence(model, student.image_size, student.prompt_tokens)
    rows = 2 * batch
    kv = 2 * layers * rows * seq * hidden * kv_heads // heads * _BYTES[dtype]
    logits = rows * vocab * 4 * 2
    weights = counts["frozen"] * _BYTES[dtype] + _student_parts(student) * 4
    est = StageEstimate("evaluate", f"{student.backend} sampling, batch {batch} x2 (CFG), {seq} tokens, {images} images",
                        weights=weights, activations=kv + logits)
    params = counts["frozen"]
    est.flops = images * 2 * 2 * params * seq
    per_token = counts["frozen"] * _BYTES[dtype] / (gpu.bandwidth_gbs * 1e9 * EFFICIENCY)
    est.seconds = max(_time(est.flops, gpu, dtype != "float32"), -(-images // batch) * codes_per_image * per_token)
    est.notes.append("activations: the KV cache of the whole batch and its logits")
    return est
