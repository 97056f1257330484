"""Stage runtime settings: deterministic kernels on, without deterministic mode's NaN fill."""

import torch

from proxytune.stages.runtime import seed_everything


def test_seeding_turns_determinism_on_and_the_nan_fill_off():
    before = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    try:
        torch.utils.deterministic.fill_uninitialized_memory = True  # torch's default
        first = torch.rand(3, generator=seed_everything(5))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.utils.deterministic.fill_uninitialized_memory is False
        assert torch.equal(first, torch.rand(3, generator=seed_everything(5)))
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.utils.deterministic.fill_uninitialized_memory = before[1]
