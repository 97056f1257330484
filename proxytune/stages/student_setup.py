"""The student stage's pieces around its training loop: the augmentation baseline's training set, the
position weights of the loss, the model's dropout and gradient checkpointing, and the proxy record of a
joint (multi-subject) student. Not a stage (the student stage imports it)."""

from __future__ import annotations

import torch

from proxytune.backends.students.api import unwrapped
from proxytune.outputs import SynthesisRecord, read_record
from proxytune.stages.params import StageParams


def position_weights(length: int, strength: float) -> torch.Tensor:
    """(L,) weights exp(-strength * t / L), normalised to mean 1 (uniform at strength 0)."""
    w = torch.exp(-strength * torch.arange(length, dtype=torch.float32) / length)
    return w / w.mean()


def augmented_references(images: list, count: int, size: int, generator: torch.Generator) -> list:
    """The paper's geometric augmentation baseline: `count` copies of the references, each with a
    random flip, a rotation in [-5, 5] degrees and a centred-area crop of 0.9-1.0 of the side."""
    from PIL import Image, ImageOps

    out = []
    for i in range(count):
        image = images[i % len(images)]
        flip, angle, scale, dx, dy = torch.rand(5, generator=generator).tolist()
        if flip < 0.5:
            image = ImageOps.mirror(image)
        image = image.rotate(10 * angle - 5, resample=Image.Resampling.BICUBIC)
        side = round(min(image.size) * (0.9 + 0.1 * scale))
        left, top = round((image.width - side) * dx), round((image.height - side) * dy)
        out.append(image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC))
    return out


def joint_record(joint_params: list[StageParams]) -> dict:
    """The proxy record of a joint (multi-subject) student: every subject's set, one digest over their digests."""
    from proxytune.files import sha256_bytes

    records = [read_record(p.out("proxy"), SynthesisRecord) for p in joint_params]
    return {
        "digest": sha256_bytes("\n".join(r.digest for r in records).encode()),
        "prompts_digest": sha256_bytes("\n".join(r.prompts_digest for r in records).encode()),
        "teacher_version": ",".join(r.teacher_version for r in records),
        "run_id": ",".join(r.run_id for r in records),
        "subjects": [p.subject.name for p in joint_params],
    }


def training_dropout(bundle, given: float | None) -> float:
    """Set the dropout the student trains with and return it: `student.dropout`, else its family's
    original (llamagen: LlamaGen's 0.1 token / residual / FFN dropout).

    Raises:
        ProxytuneError: a non-zero dropout for a family without the option.
    """
    from proxytune.backends import students

    default = students.family(bundle.backend).dropout
    if default is not None:
        p = default if given is None else given
        unwrapped(bundle.model).set_dropout(p)
        return p
    if given:
        from proxytune.errors import ProxytuneError

        raise ProxytuneError(f"student.dropout: the {bundle.backend} backend has no dropout option; leave it null or 0")
    return 0.0


def optimizer(trainable: list, spec) -> torch.optim.Optimizer:
    """AdamW over the trained parameters (`spec` the StudentSpec): torchao's 8-bit one with
    `use_8bit_adam`, else torch's (fused, `training.adamw`).

    Raises:
        ProxytuneError: `use_8bit_adam` without torchao installed.
    """
    settings = {"betas": tuple(spec.betas), "weight_decay": spec.weight_decay}
    if spec.use_8bit_adam:
        try:
            from torchao.optim import AdamW8bit  # its import-time noise: proxytune/__init__.py
        except ImportError:
            from proxytune.errors import ProxytuneError

            raise ProxytuneError("student.use_8bit_adam: needs torchao, which is not installed "
                                 "(pip install 'proxytune[quantize]')") from None
        return AdamW8bit(trainable, lr=spec.learning_rate, **settings)
    from proxytune.stages import training

    return training.adamw(trainable, lr=spec.learning_rate, **settings)


def text_encoder_to_host(bundle, device: torch.device) -> bool:
    """Move a student's separate text encoder (LlamaGen's FLAN-T5-XL, 4.6 GB in float32) to host memory
    once the stage has cached its prompt features: training reads only the cache, and the sample grid's
    few prompts are encoded on the CPU (the backend moves the features to the model). True if moved."""
    encoder = getattr(bundle, "text_encoder", None)
    if encoder is None or device.type == "cpu":
        return False
    encoder.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return True


def enable_gradient_checkpointing(model, *, inputs_require_grad: bool = True) -> None:
    """Non-reentrant checkpointing of the decoder layers. `inputs_require_grad=False` leaves out transformers'
    hook that marks the input embeddings as requiring grad: non-reentrant checkpointing reaches the LoRA
    weights without it, and torch.compile cannot trace it (a graph break and a recompile every step)."""
    base = unwrapped(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        from proxytune.errors import ProxytuneError

        raise ProxytuneError(f"student.gradient_checkpointing: {type(base).__name__} does not support it")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if inputs_require_grad and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    elif not inputs_require_grad:
        base.disable_input_require_grads()  # gradient_checkpointing_enable adds it for a peft model
