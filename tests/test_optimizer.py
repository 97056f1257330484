"""The trainers' AdamW (`training.adamw`): fused where it can be, and the same update as torch's
per-tensor AdamW up to float rounding."""

import pytest
import torch

from proxytune.stages import training


def params_with_grads(seed: int) -> list[torch.Tensor]:
    """LoRA-like tensors of several shapes, with gradients."""
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=g) for shape in [(16, 64), (64, 16), (8,), (3, 5, 7)]]
    for t in tensors:
        t.requires_grad_(True)
        t.grad = torch.randn(t.shape, generator=g)
    return tensors


@pytest.mark.parametrize("steps", [1, 3])
def test_fused_adamw_makes_the_per_tensor_update(steps):
    fused, plain = params_with_grads(0), params_with_grads(0)
    settings = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.05}
    groups = lambda ps, lr2: [{"params": ps[:2]}, {"params": ps[2:], "lr": lr2}]  # noqa: E731
    opt_fused = training.adamw(groups(fused, 3e-2), **settings)
    opt_plain = torch.optim.AdamW(groups(plain, 3e-2), foreach=False, **settings)
    assert opt_fused.defaults["fused"] and not opt_plain.defaults["fused"]
    before = [p.detach().clone() for p in plain]
    for _ in range(steps):
        opt_fused.step()
        opt_plain.step()
    for a, b, start in zip(fused, plain, before):
        assert not torch.equal(b, start)  # the step moved the weights
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_non_float_parameters_fall_back_to_the_unfused_optimiser():
    complex_param = torch.zeros(4, dtype=torch.complex64, requires_grad=True)
    assert not training.adamw([complex_param], lr=1e-3).defaults["fused"]
