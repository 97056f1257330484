"""`student.compile`: the training forward and loss through torch.compile give eager's step, and the
adapter a compiled run saves loads into an eager model.

The compile here uses torch's "aot_eager" backend: TorchDynamo captures the Python (the peft LoRA
wrappers, dropout, non-reentrant gradient checkpointing, the loss) into graphs and AOTAutograd derives
their backward, exactly as with the default "inductor" backend, but the graphs then run on eager
kernels instead of generated C++ code. So this checks the capture (one graph, no graph break, no
recompile), the derived gradients and that the saved adapter is the plain model's, in a few seconds of
compiling; it does not check inductor's kernels (their numerics, or inductor's own random numbers for
dropout). Inductor's code generation takes about 30-50 s for this model on 2 busy cores;
benchmarks/student_step.py runs it.
"""

import pytest
import torch

from proxytune.backends import students
from proxytune.stages import training
from conftest import record_step_gradients
from test_training_precision import student_for

# Dropout is off: the compiled graph draws its dropout masks in another order than eager (the same
# seed gives other masks, so the losses differ by about 0.5%); the dropout modules are still traced.
SETTINGS = {"steps": 2, "batch_size": 2, "dropout": 0.0, "gradient_checkpointing": True,
            "lora": {"rank": 4, "alpha": 4}}


@pytest.fixture
def graphs(monkeypatch) -> list:
    """Compile with aot_eager, recording every graph Dynamo hands it."""
    captured = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        captured.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    monkeypatch.setattr(training, "COMPILE_BACKEND", backend)
    yield captured
    torch._dynamo.reset()


def _steps(recipe, count: int) -> list[tuple[dict, list[torch.Tensor]]]:
    """`count` training steps from fixed global seeds: each step's values and LoRA gradients (before clipping)."""
    grads = record_step_gradients(recipe)
    recipe.bundle.model.train()
    values = []
    for step in range(count):
        torch.manual_seed(1000 + step)  # the dropout masks, as train() seeds them per step
        values.append(recipe.train_step())
    return list(zip(values, grads))


def test_compiled_step_matches_eager_and_its_adapter_reloads_in_eager(project, graphs, tmp_path):
    eager = student_for(project, **SETTINGS)
    compiled = student_for(project, compile=True, **SETTINGS)
    assert compiled.checkpoint_dir == eager.checkpoint_dir  # compile is not part of what a checkpoint resumes

    eager_steps = _steps(eager, 2)
    compiled_steps = _steps(compiled, 1)
    assert len(graphs) == 1  # the forward and loss in one graph: no graph break (and student.compile compiled)
    compiled_steps += _steps(compiled, 1)
    assert len(graphs) == 1  # static shapes: the second step reuses the first step's graph

    for (eager_values, eager_grads), (values, grads) in zip(eager_steps, compiled_steps):
        assert values["loss"] == pytest.approx(eager_values["loss"], rel=1e-5)
        assert values["grad_norm"] == pytest.approx(eager_values["grad_norm"], rel=1e-4)
        assert len(grads) == len(eager_grads) == len(compiled.trainable)
        for g, e in zip(grads, eager_grads):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    assert any(bool(g.abs().max() > 0) for g in compiled_steps[-1][1])  # the LoRA did learn

    # the compiled run's adapter, saved as the stage saves it, loads into a fresh eager model
    from peft import PeftModel
    from safetensors.torch import load_file

    weights = compiled._save_weights(tmp_path)
    assert not any("_orig_mod" in key for key in load_file(weights))
    fresh = students.load_student(compiled.spec.model)
    fresh.model.eval()
    compiled.bundle.model.eval()
    cond, codes = compiled.conds[compiled.prompt_index[:2]], compiled.codes[:2]
    keep = torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        untuned = fresh.image_logits(cond, codes, keep)
        fresh.model = PeftModel.from_pretrained(fresh.model, str(weights.parent)).eval()
        trained = compiled.bundle.image_logits(cond, codes, keep)
        reloaded = fresh.image_logits(cond, codes, keep)
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-6)
    assert (trained - untuned).abs().max() > 1e-4  # the comparison is not between two untuned models
