"""The teacher's quantised memory options on the tiny models.

fp8 and nf4 frozen bases (teacher.quantize, synthesis.quantize), proved as the int8 one is in
test_memory_options: the frozen Linear weights really are float8 / 4-bit (their bytes), a training step
changes the float32 LoRA, the saved LoRA loads with the same values into the unquantised pipeline and,
unfused, beside the quantised base, whose image stays near the float pipeline's. The teacher's 8-bit AdamW
(torchao's): it learns, its state is 8-bit, its warmup schedule reaches it, and a resumed run continues
bit for bit."""

import numpy as np
import pytest
import torch

pytest.importorskip("torchao")  # the `quantize` extra (in dev)

from proxytune.backends.teachers import diffusion, quantize  # noqa: E402
from conftest import make_params, tiny_spec  # noqa: E402

# measured on tiny-flux with a LoRA beside it, 3 seeds (mean absolute difference from the fused float32
# pipeline's image, in levels of 255): int8 0.12, fp8 0.74-0.82, nf4 2.8-3.1; about twice that is allowed
IMAGE_TOLERANCE = {"fp8": 2.0, "nf4": 6.0}


def _linears(model) -> list[torch.nn.Linear]:
    """The frozen Linear layers: the LoRA-wrapped layers' base layers and every other frozen Linear."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]


def _expected_bytes(plain: torch.nn.Module, quantize_as: str) -> int:
    """The bytes torchao's copy of `plain` (a float32 model) should take: each Linear weight as float8 with a
    float32 scale a row, or as NF4 (`quantize.nf4_bytes`); everything else as loaded."""
    total = quantize.weight_bytes(plain)
    for layer in _linears(plain):
        n = layer.weight.numel()
        total -= 4 * n
        total += n + 4 * layer.weight.shape[0] if quantize_as == "fp8" else quantize.nf4_bytes(n, 4)
    return total


@pytest.mark.parametrize("quantize_as", ["fp8", "nf4"])
def test_quantized_teacher_trains_its_lora_which_reloads_unquantised_and_generates_close(project, tmp_path, quantize_as):
    from proxytune.stages.teacher import TeacherTrainer

    plain = diffusion.denoiser(diffusion.load_pipeline("tiny-flux"))
    recipe = TeacherTrainer(make_params(project, tiny_spec(teacher={"model": "tiny-flux", "steps": 1,
                                                                    "quantize": quantize_as})))
    recipe.setup()
    denoiser = recipe.denoiser
    inner = {"fp8": ("qdata", torch.float8_e4m3fn), "nf4": ("quantized_data", torch.uint8)}[quantize_as]
    frozen = _linears(denoiser)
    assert len(frozen) == len(_linears(plain)) and any(hasattr(m, "base_layer") for m in denoiser.modules())
    assert all(getattr(m.weight, inner[0]).dtype == inner[1] for m in frozen)  # every one (tiny-flux: whole blocks)
    if quantize_as == "nf4":  # two 4-bit values a byte
        assert all(m.weight.quantized_data.numel() * 2 == m.weight.numel() for m in frozen)
    lora_bytes = sum(p.numel() * 4 for p in recipe.trainable)
    held = quantize.weight_bytes(denoiser) - lora_bytes
    assert held == _expected_bytes(plain, quantize_as)
    assert held < {"fp8": 0.3, "nf4": 0.2}[quantize_as] * quantize.weight_bytes(plain)  # 0.29 and 0.16 here
    assert all(p.dtype == torch.float32 for p in recipe.trainable)
    before = [p.detach().clone() for p in recipe.trainable]
    logs = recipe.train_step()
    assert np.isfinite(logs["loss"]) and logs["grad_norm"] > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, recipe.trainable))

    # the saved LoRA loads into the unquantised base with the trained values, and beside the quantised one
    path = diffusion.save_lora(recipe.pipe, tmp_path / "lora")
    trained = {n: p for n, p in denoiser.named_parameters() if "lora_" in n}
    fused = diffusion.load_pipeline_with_lora("tiny-flux", path.parent)
    assert not any(quantize.is_quantized(m.weight) for m in _linears(diffusion.denoiser(fused)))
    on_base = diffusion.load_pipeline_with_lora("tiny-flux", path.parent, quantize=quantize_as)
    loaded = {n.replace(".subject.", ".default."): p
              for n, p in diffusion.denoiser(on_base).named_parameters() if "lora_" in n}
    assert trained and loaded.keys() == trained.keys()
    for key in trained:
        torch.testing.assert_close(loaded[key], trained[key], rtol=0, atol=0)
    wrapped = [m for m in diffusion.denoiser(on_base).modules() if hasattr(m, "base_layer")]
    assert wrapped and all(quantize.is_quantized(m.base_layer.weight) for m in wrapped)
    kwargs = {"steps": 2, "guidance": 3.5, "size": 64}
    a, b = (np.asarray(diffusion.generate(p, ["a sks dog"], [0], **kwargs)[0], dtype=float) for p in (fused, on_base))
    difference = np.abs(a - b).mean()
    assert 0 < difference < IMAGE_TOLERANCE[quantize_as], difference


def test_nf4_keeps_a_weight_of_partial_blocks_and_groups_the_block_scales():
    """A weight NF4 cannot hold (not whole 64-value blocks) stays float and is named; the blocks' absmax
    scales are grouped by 256 where the block count allows, else by its largest divisor under 256."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(5, 3), torch.nn.Linear(320, 320))
    model.requires_grad_(False)
    plain = [m.weight.clone() for m in model]
    assert quantize.to_nf4(model) == ["1"]
    assert [quantize.is_quantized(m.weight) for m in model] == [True, False, True]
    assert torch.equal(model[1].weight, plain[1])
    assert (model[0].weight.scaler_block_size, model[2].weight.scaler_block_size) == (256, 200)  # 256 and 1600 blocks
    # 4-bit: each value within half the widest gap between NF4's quantiles (0.152 of its block's absmax, 0.16 with
    # the absmax's own int8 rounding) of the original
    restored = model[2].weight.get_original_weight()
    blocks = plain[2].reshape(-1, 64)
    error = (restored.reshape(-1, 64) - blocks).abs().max(dim=1).values
    assert (error <= 0.16 * blocks.abs().max(dim=1).values + 1e-6).all() and error.max() > 0
    assert quantize.weight_bytes(model) == sum(quantize.nf4_bytes(w.numel(), 4) for w in (plain[0], plain[2])) \
        + 4 * (plain[1].numel() + sum(m.bias.numel() for m in model))


@pytest.mark.parametrize("quantize_as", ["fp8", "nf4"])
def test_quantized_base_without_torchao_is_a_one_line_error(monkeypatch, quantize_as):
    import sys

    from proxytune.errors import ProxytuneError

    for name in ("torchao", "torchao.quantization"):  # None in sys.modules: `import` raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ProxytuneError, match=rf"^synthesis.quantize: {quantize_as} needs torchao, which is not "
                                             r"installed \(pip install 'proxytune\[quantize\]'\)$"):
        diffusion.load_pipeline("tiny-sd", quantize=quantize_as, quantize_field="synthesis.quantize")


# -- the teacher's 8-bit AdamW (torchao's, as the student's) -------------------------------------------------


def test_teacher_8bit_adam_learns_with_8bit_state_follows_its_warmup_and_resumes_bit_for_bit(project, photos):
    from conftest import copy_images
    from test_memory_options import _optimizer_state_bytes
    from test_teacher import _fixed_batch_loss
    from proxytune.stages.teacher import TeacherTrainer

    copy_images(photos / "dog", project / "one", count=1)
    # rank 128: every LoRA tensor of tiny-sd's attention has >= 4096 values, the least torchao quantises
    lora = {"rank": 128, "alpha": 128, "target_modules": ["to_q", "to_v"]}
    spec = tiny_spec(teacher={"model": "tiny-sd", "steps": 6, "checkpoint_every": 3, "batch_size": 1, "lora": lora,
                              "learning_rate": 1e-2, "lr_warmup_steps": 2, "random_flip": False, "use_8bit_adam": True})
    spec["subjects"][0]["images"] = "../one"
    params = make_params(project, spec)

    def trainer():
        recipe = TeacherTrainer(params)
        recipe.setup()
        return recipe

    straight = trainer()
    straight.checkpoint_dir = straight.checkpoint_dir.with_name("straight")
    before = _fixed_batch_loss(straight)
    straight.train()
    assert type(straight.optimizer.optimizer).__name__ == "AdamW8bit"
    after = _fixed_batch_loss(straight)
    assert after < 0.9 * before  # it overfits its one reference (1.157 -> 1.038)
    # the warmup schedule reaches torchao's tensor learning rate: 0, half, then the full rate
    np.testing.assert_allclose(straight.progress.series["lr"], [0.0, 5e-3] + [1e-2] * 4, rtol=1e-6)
    # both moments 1 byte a value + a float32 scale per block of 256 + its 256-entry float32 code table
    sizes = [p.numel() for p in straight.trainable]
    assert all(n >= 4096 and n % 256 == 0 for n in sizes)
    assert _optimizer_state_bytes(straight.optimizer) == sum(2 * (n + n // 256 * 4 + 1024) for n in sizes)

    first = trainer()
    first.spec.steps = 3  # "killed" right after the step-3 checkpoint
    first.train()
    first.spec.steps = 6
    first.save_checkpoint()
    resumed = trainer()
    assert resumed.progress.step == 3
    resumed.train()
    assert resumed.progress.series == straight.progress.series
    a, b = diffusion.lora_state_dict(straight.denoiser), diffusion.lora_state_dict(resumed.denoiser)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- plan: the quantised bases' bytes, and nf4 proposed where int8 is not enough ------------------------------


def test_plan_weighs_each_quantised_base_as_torchao_loads_it():
    """plan's bill of a quantised denoiser (`estimate.frozen_bytes` from parameter counts on the meta device)
    against the bytes torchao really holds for tiny-flux loaded in bf16, as a GPU run loads it."""
    from pathlib import Path

    from proxytune.plan import estimate, models

    counts = estimate.count(models.describe_teacher("tiny-flux", Path(".")).denoiser)
    assert counts["nf4_linear"] == counts["linear"] > 0  # tiny-flux: every Linear weight is whole 64-value blocks
    bf16 = estimate.frozen_bytes(counts, "bfloat16")
    for quantize_as in ("int8", "fp8", "nf4"):
        loaded = diffusion.load_pipeline("tiny-flux", dtype=torch.bfloat16, quantize=quantize_as).transformer
        assert estimate.frozen_bytes(counts, "bfloat16", quantize_as) == quantize.weight_bytes(loaded), quantize_as
    assert estimate.frozen_bytes(counts, "bfloat16", "nf4") < 0.45 * bf16  # 0.40 here: per-row and per-weight extras
    # at FLUX.1-dev's size the extras vanish: 11.9B Linear weights at 0.52 byte, 5.7 GiB against 22.2 in bf16
    flux = estimate.count(models.describe_teacher("black-forest-labs/FLUX.1-dev", Path(".")).denoiser)
    assert flux["nf4_linear"] == flux["linear"]
    assert 0.25 < estimate.frozen_bytes(flux, "bfloat16", "nf4") / estimate.frozen_bytes(flux, "bfloat16") < 0.27


def test_suggest_proposes_nf4_only_where_no_setting_with_int8_fits():
    from proxytune.plan import estimate, options
    from proxytune.plan.gpus import Gpu
    from proxytune.spec.synthesis import SynthesisSpec

    def fake(spec):  # the denoiser 16 GiB, int8 8, nf4 4; an image 2 GiB; CPU offload saves 4
        gib = {"none": 16, "int8": 8, "nf4": 4}[spec.quantize] + 2 * spec.batch_size - 4 * spec.cpu_offload
        est = estimate.StageEstimate("synthesis", "", weights=int(gib * estimate.GIB))
        est.seconds = 1.0
        return est

    def gpu(gib):
        return Gpu("test", gib + 1.5, 100.0, 10.0, 1000)  # `gib` usable

    spec = SynthesisSpec(batch_size=4, dtype="bfloat16")
    # int8 with a smaller batch fits (two changes) though nf4 alone would (one): int8 is proposed
    found = options.suggest("synthesis", spec, fake, options.SYNTHESIS_SWITCHES, gpu(10))
    assert found.changes == {"quantize": "int8", "batch_size": 1}
    # nothing with int8 fits 5 GiB (int8 + offload + batch 1: 6): nf4 is, with the fewest other changes
    found = options.suggest("synthesis", spec, fake, options.SYNTHESIS_SWITCHES, gpu(5))
    assert found.changes == {"cpu_offload": True, "quantize": "nf4", "batch_size": 2}
    assert found.text == "synthesis.cpu_offload: true, synthesis.quantize: nf4, synthesis.batch_size: 2"
    # a spec already on int8 may move to nf4; one on nf4 is never sent back to int8
    on_int8 = spec.model_copy(update={"quantize": "int8", "cpu_offload": True})
    assert options.suggest("synthesis", on_int8, fake, options.SYNTHESIS_SWITCHES, gpu(5)).changes == {
        "quantize": "nf4", "batch_size": 2}
    on_nf4 = spec.model_copy(update={"quantize": "nf4"})
    assert options.suggest("synthesis", on_nf4, fake, options.SYNTHESIS_SWITCHES, gpu(7)).changes == {"batch_size": 1}
