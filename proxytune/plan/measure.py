"""The estimator against what the CPU allocator really allocates, on real steps of small models.

For each case: a model built from a built-in tiny model's config, made deeper than the estimator's
shallow copy (so the depth scaling is exercised too) and run at a batch above 1 (so is the batch
scaling). The real step runs on a fresh model under torch.profiler with profile_memory=True;
its peak is the running sum of the allocator's allocation events and the frees of those blocks.
The estimate is what `plan` uses for the same step: B x (traced peak - traced end) + traced end,
from `estimate.scaled_trace`.

    python -m proxytune.plan.measure        # prints one line per case
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from proxytune.plan import estimate, models, steps


@dataclass
class Case:
    name: str
    component: models.Component
    make_step: object  # (component, batch) -> (build, step)
    batch: int
    key: dict


def allocator_peak(model, step) -> int:
    """Peak bytes the CPU allocator holds during `step(model)` on top of what was allocated before.

    No warm-up step: the trace is of a fresh model too, so whatever the first step makes lazily
    (gradients, cached tables) is counted on both sides. Only the frees of blocks allocated during
    the step count: PyTorch's CPU reporter remembers the sizes of blocks an earlier profiler session
    saw, so a free of such a block (a garbage collection of an earlier test's model, say) comes
    back as a negative event that would lower the peak."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model)
    events, todo = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        event = todo.pop()
        todo.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.ptr, event.extra_fields.alloc_size))
    live: dict[int, int] = {}
    current = peak = 0
    for _, ptr, nbytes in sorted(events, key=lambda event: event[0]):
        if nbytes > 0:
            live[ptr] = nbytes
        elif ptr not in live:
            continue  # allocated before the step
        else:
            nbytes = -live.pop(ptr)
        current += nbytes
        peak = max(peak, current)
    return peak


def estimated_peak(case: Case) -> int:
    trace = estimate.scaled_trace(case.component, case.key, lambda part: case.make_step(part, 1))
    return int(case.batch * (trace["peak"] - trace["end"]) + trace["end"])


def measured_peak(case: Case) -> int:
    torch.manual_seed(0)
    build, step = case.make_step(case.component, case.batch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on shared cores: threads only wait for each other (20x slower here)
    try:
        return allocator_peak(build(), step)
    finally:
        torch.set_num_threads(threads)


def cases(root: Path = Path(".")) -> list[Case]:
    """tiny-sd's UNet (transformer depth 3) LoRA step, tiny-llamagen's student (6 layers) LoRA step,
    the same with gradient checkpointing and in bf16, tiny-sd3's MMDiT (5 blocks) LoRA step: the three kinds of
    training step plan traces."""
    lora = steps.Options(lora_rank=4, lora_targets=("to_q", "to_k", "to_v", "to_out.0"))
    sd = models.describe_teacher("tiny-sd", root)
    unet = models.Component("unet", {**sd.denoiser.config, "transformer_layers_per_block": 3})
    sd_shape = steps.DenoiserShape("sd", 16)
    sd3 = models.describe_teacher("tiny-sd3", root)
    mmdit = models.Component("sd3", {**sd3.denoiser.config, "num_layers": 5})
    sd3_shape = steps.DenoiserShape("sd3", 32, t5_tokens=sd3.t5_tokens)
    student = models.describe_student("tiny-llamagen", root)
    ar = models.Component("llamagen", {**student.parts["model"].config, "num_hidden_layers": 6})
    ar_lora = steps.Options(lora_rank=8, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    ar_ckpt = steps.Options(lora_rank=8, lora_targets=ar_lora.lora_targets, checkpointing=True)
    ar_bf16 = steps.Options(weights="bfloat16", autocast=True, lora_rank=8, lora_targets=ar_lora.lora_targets)
    return [
        Case("tiny-sd UNet LoRA, transformer depth 3, 16x16 latents, batch 4", unet,
             lambda c, b: steps.denoiser_step(c, sd_shape, lora, train=True, batch=b), 4,
             {"step": "teacher", "shape": sd_shape.__dict__, **lora.key()}),
        Case("tiny-llamagen LoRA, 6 layers, batch 8", ar,
             lambda c, b: steps.student_step(c, student.image_size, 0, ar_lora, batch=b), 8,
             {"step": "student", "size": student.image_size, "prompt": 0, **ar_lora.key()}),
        Case("tiny-llamagen LoRA, 6 layers, batch 8, gradient checkpointing", ar,
             lambda c, b: steps.student_step(c, student.image_size, 0, ar_ckpt, batch=b), 8,
             {"step": "student", "size": student.image_size, "prompt": 0, **ar_ckpt.key()}),
        Case("tiny-llamagen LoRA, 6 layers, batch 8, bf16 weights and autocast", ar,
             lambda c, b: steps.student_step(c, student.image_size, 0, ar_bf16, batch=b), 8,
             {"step": "student", "size": student.image_size, "prompt": 0, **ar_bf16.key()}),
        Case("tiny-sd3 MMDiT LoRA, 5 blocks, 32x32 latents, batch 4", mmdit,
             lambda c, b: steps.denoiser_step(c, sd3_shape, lora, train=True, batch=b), 4,
             {"step": "teacher", "shape": sd3_shape.__dict__, **lora.key()}),
    ]


def main() -> None:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    for case in cases():
        real, est = measured_peak(case), estimated_peak(case)
        print(f"{case.name}: allocator {real / 2**20:.2f} MiB, estimate {est / 2**20:.2f} MiB, "
              f"{(est - real) / real:+.1%}")


if __name__ == "__main__":
    main()
