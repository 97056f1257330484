"""Memory options (issue 27 item 3), proved by behaviour on the tiny models: the same losses and
gradients as without them, and less memory where that is the point (the CPU allocator's peak, read
from PyTorch's profiler)."""

import pytest
import torch

from proxytune.backends import students
from proxytune.plan import measure
from conftest import add_lora


def cpu_peak_bytes(fn) -> int:
    """Peak of the CPU allocator's live bytes while `fn` runs, above what was live before (PyTorch's
    profiler's allocation and free events, as `proxytune plan` is checked against)."""
    return measure.allocator_peak(None, lambda _: fn())


# -- chunked cross-entropy (Lumina-mGPT's full-vocabulary objective) ----------------------------------------


def _lumina_step(bundle, trainable, batch: int, chunk: int):
    """One loss + backward of `sequence_loss` with `chunk` positions of logits at a time."""
    gen = torch.Generator().manual_seed(0)
    cond = bundle.encode_prompts([f"a S* dog number {i}" for i in range(batch)])
    codes = torch.randint(0, bundle.codebook_size, (batch, bundle.seq_len), generator=gen)
    drop = torch.arange(batch) % 3 == 1  # some rows unconditional (their first label is not counted)
    weights = torch.linspace(0.5, 1.5, bundle.seq_len)
    bundle.loss_chunk = chunk
    for p in trainable:
        p.grad = None
    terms = bundle.sequence_loss(cond, codes, drop, weights)
    (terms["ce"] + bundle.z_loss_weight * terms["z_loss"]).backward()
    return {k: v.detach() for k, v in terms.items()}, [p.grad.clone() for p in trainable]


def test_chunked_cross_entropy_gives_the_same_loss_and_gradients_with_a_lower_peak():
    bundle = students.load_student("tiny-lumina-mgpt")
    trainable = add_lora(bundle)
    bundle.model.train()
    batch, whole = 8, 10**9  # a chunk larger than all positions: the whole logits at once, as before
    labels = 3 + bundle.grid * (bundle.grid + 1) + 2  # image turn: break, 2 sizes, codes and row ends, eoss, eot
    vocab = bundle._lm_head.weight.shape[0]
    plain_terms, plain_grads = _lumina_step(bundle, trainable, batch, whole)
    chunk_terms, chunk_grads = _lumina_step(bundle, trainable, batch, 64)  # 10 chunks, the last one short
    for key in ("ce", "z_loss"):
        torch.testing.assert_close(chunk_terms[key], plain_terms[key], rtol=1e-5, atol=1e-6)
    assert any(g.abs().max() > 0 for g in plain_grads)
    for ours, theirs in zip(chunk_grads, plain_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)
    # peak: the whole run keeps (B, A, V) float32 logits and their log-softmax for the backward; chunked, only
    # 64 positions' logits exist at once (recomputed in the backward)
    logits_bytes = batch * labels * vocab * 4
    plain_peak = cpu_peak_bytes(lambda: _lumina_step(bundle, trainable, batch, whole))
    chunk_peak = cpu_peak_bytes(lambda: _lumina_step(bundle, trainable, batch, 64))
    assert plain_peak - chunk_peak > logits_bytes, (plain_peak, chunk_peak, logits_bytes)
    assert chunk_peak < 0.5 * plain_peak


def test_chunked_cross_entropy_without_autograd_needs_no_checkpoint():
    """Under no_grad (evaluation) the chunks run plainly and give the same terms."""
    bundle = students.load_student("tiny-lumina-mgpt")
    cond = bundle.encode_prompts(["a S* dog"] * 2)
    codes = torch.randint(0, bundle.codebook_size, (2, bundle.seq_len), generator=torch.Generator().manual_seed(1))
    args = (cond, codes, torch.zeros(2, dtype=torch.bool), torch.ones(bundle.seq_len))
    with torch.no_grad():
        bundle.loss_chunk = 10**9
        whole = bundle.sequence_loss(*args)
        bundle.loss_chunk = 7
        chunked = bundle.sequence_loss(*args)
    for key in whole:
        torch.testing.assert_close(chunked[key], whole[key], rtol=1e-5, atol=1e-6)


# -- a quantised frozen base for the teacher (teacher.quantize) -------------------------------------------------


def test_int8_teacher_trains_its_float32_lora_on_int8_weights_and_the_lora_reloads_unquantised(project, tmp_path):
    pytest.importorskip("torchao")  # the `quantize` extra (in dev)
    import numpy as np

    from proxytune.backends.teachers import diffusion
    from proxytune.stages.teacher import TeacherTrainer
    from conftest import make_params, tiny_spec

    plain = diffusion.denoiser(diffusion.load_pipeline("tiny-flux"))
    recipe = TeacherTrainer(make_params(project, tiny_spec(teacher={"model": "tiny-flux", "steps": 1, "quantize": "int8"})))
    recipe.setup()
    denoiser = recipe.denoiser
    base = [m.base_layer for m in denoiser.modules() if hasattr(m, "base_layer")]  # the LoRA-wrapped layers
    assert base and all(m.weight.qdata.dtype == torch.int8 for m in base)  # torchao's Int8Tensor underneath
    linears = [m for m in denoiser.modules() if isinstance(m, torch.nn.Linear) and not hasattr(m, "base_layer")
               and "lora_" not in type(m).__name__ and m not in base and m.weight.requires_grad is False]
    assert all(hasattr(m.weight, "qdata") for m in linears)  # every frozen Linear, not only the LoRA targets
    # the transformer is nearly all Linear: its weights fall to about a quarter (int8 + one fp32 scale a row)
    lora_bytes = sum(p.numel() * 4 for p in recipe.trainable)
    assert diffusion.weight_bytes(denoiser) - lora_bytes < 0.35 * diffusion.weight_bytes(plain)
    assert all(p.dtype == torch.float32 for p in recipe.trainable)
    before = [p.detach().clone() for p in recipe.trainable]
    logs = recipe.train_step()
    assert torch.isfinite(torch.tensor(logs["loss"])) and logs["grad_norm"] > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, recipe.trainable))
    # the saved LoRA loads into the unquantised base for synthesis, with the trained values
    path = diffusion.save_lora(recipe.pipe, tmp_path / "lora")
    pipe = diffusion.load_pipeline_with_lora("tiny-flux", path.parent, fuse=False)
    trained = {n: p for n, p in denoiser.named_parameters() if "lora_" in n}
    loaded = {n.replace(".subject.", ".default."): p for n, p in diffusion.denoiser(pipe).named_parameters() if "lora_" in n}
    assert trained and loaded.keys() == trained.keys()
    for key in trained:
        torch.testing.assert_close(loaded[key], trained[key])
    assert not any(hasattr(m.weight, "qdata") for m in diffusion.denoiser(pipe).modules() if isinstance(m, torch.nn.Linear))
    # synthesis.quantize: the same LoRA, unfused, beside the int8 base; images near the unquantised ones
    int8 = diffusion.load_pipeline_with_lora("tiny-flux", path.parent, quantize="int8")
    on_int8 = {n.replace(".subject.", ".default."): p
               for n, p in diffusion.denoiser(int8).named_parameters() if "lora_" in n}
    assert on_int8.keys() == trained.keys() and all(torch.equal(on_int8[k], loaded[k]) for k in trained)
    wrapped = [m for m in diffusion.denoiser(int8).modules() if hasattr(m, "base_layer")]
    assert wrapped and all(hasattr(m.base_layer.weight, "qdata") for m in wrapped)
    kwargs = {"steps": 2, "guidance": 3.5, "size": 64}
    fused = diffusion.load_pipeline_with_lora("tiny-flux", path.parent)
    a, b = (np.asarray(diffusion.generate(p, ["a sks dog"], [0], **kwargs)[0], dtype=float) for p in (fused, int8))
    assert np.abs(a - b).mean() < 2.0, np.abs(a - b).mean()  # int8 rounding: within 2 levels of 255 on average


def test_int8_teacher_without_torchao_is_a_one_line_error(monkeypatch):
    import sys

    from proxytune.backends.teachers import diffusion
    from proxytune.errors import ProxytuneError

    for name in ("torchao", "torchao.quantization"):  # None in sys.modules: `import` raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ProxytuneError, match=r"^teacher.quantize: int8 needs torchao, which is not installed "
                                             r"\(pip install 'proxytune\[quantize\]'\)$"):
        diffusion.load_pipeline("tiny-sd", quantize="int8")  # refused before any weight loads


# -- gradient checkpointing (student.gradient_checkpointing, teacher.gradient_checkpointing) ----------------


def _student_loss(bundle, batch: int = 2) -> torch.Tensor:
    """The student stage's objective on one fixed batch (student._micro_batch_loss without the data)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    cond = bundle.encode_prompts([f"a S* dog {i}" for i in range(batch)])
    codes = torch.randint(0, bundle.codebook_size, (batch, bundle.seq_len), generator=gen)
    drop = torch.tensor([False, True])
    if hasattr(bundle, "sequence_loss"):
        terms = bundle.sequence_loss(cond, codes, drop, torch.ones(bundle.seq_len))
        return terms["ce"] + bundle.z_loss_weight * terms["z_loss"]
    logits = bundle.image_logits(cond, codes, drop)
    return F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten())


def _checkpointed_layers(model) -> list[torch.nn.Module]:
    """The language model's decoder layers that transformers will checkpoint (not the vision towers')."""
    return [m for m in model.modules() if "DecoderLayer" in type(m).__name__ and m.gradient_checkpointing is True]


@pytest.mark.parametrize("model", ["tiny-llamagen", "tiny-lumina-mgpt", "tiny-janus"])
def test_student_gradient_checkpointing_recomputes_the_layers_with_the_same_loss_and_gradients(model):
    from proxytune.stages.student_setup import enable_gradient_checkpointing

    results = []
    for checkpointing in (False, True):
        bundle = students.load_student(model)
        trainable = add_lora(bundle)
        if checkpointing:
            enable_gradient_checkpointing(bundle.model)
        bundle.model.train()  # as the stage trains (transformers checkpoints only in training mode)
        layers = _checkpointed_layers(bundle.model) if checkpointing else []
        calls = []
        for layer in layers:  # transformers checkpoints the layer's forward, not its hooks: count a child's calls
            next(layer.children()).register_forward_pre_hook(lambda *_: calls.append(1))
        loss = _student_loss(bundle)
        forwards = len(calls)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in trainable], forwards, len(calls), len(layers)))
    (plain_loss, plain_grads, *_), (loss, grads, forwards, total, layers) = results
    # checkpointing is really on: every decoder layer runs again in the backward
    assert layers >= 2 and forwards == layers and total == 2 * layers
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert any(g.abs().max() > 0 for g in plain_grads)
    for ours, theirs in zip(grads, plain_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd3", "tiny-flux"])  # tiny-sd: test_teacher_features
def test_teacher_gradient_checkpointing_recomputes_blocks_with_the_same_loss_and_gradients(model):
    """The teacher stage's `denoiser.enable_gradient_checkpointing()` on every family: the LoRA step's loss
    and gradients are unchanged, and the backward runs the denoiser's Linear layers again (recompute)."""
    from proxytune.backends.teachers import diffusion

    size, gen = 64, torch.Generator().manual_seed(0)
    timesteps = torch.tensor([100.0, 700.0])
    results, noisy = [], None
    for checkpointing in (False, True):
        pipe = diffusion.load_pipeline(model)
        denoiser = diffusion.denoiser(pipe)
        text = diffusion.encode_prompts(pipe, ["a sks dog", "a dog"])
        if noisy is None:
            flux = diffusion.family_of(pipe).name == "flux"  # FLUX's transformer takes packed 2x2 latents
            channels = denoiser.config.in_channels // (4 if flux else 1)
            noisy = torch.randn(2, channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor, generator=gen)
        torch.manual_seed(0)
        trainable = diffusion.add_lora(denoiser, rank=4, alpha=4.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        if checkpointing:
            denoiser.enable_gradient_checkpointing()  # what the teacher stage calls
        denoiser.train()
        calls = []
        for layer in denoiser.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.register_forward_pre_hook(lambda *_: calls.append(1))
        loss = diffusion.predict(pipe, noisy, timesteps, text, size=size).pow(2).mean()
        forwards = len(calls)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in trainable], forwards, len(calls)))
    (plain_loss, plain_grads, plain_forwards, plain_total), (loss, grads, forwards, total) = results
    assert plain_total == plain_forwards and forwards == plain_forwards  # the backward of a plain run calls nothing
    assert total > 1.5 * forwards  # checkpointed: most Linear layers run again in the backward
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-7)
    assert any(g.abs().max() > 0 for g in plain_grads)
    for ours, theirs in zip(grads, plain_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


# -- synthesis memory options (synthesis.vae_tiling, synthesis.cpu_offload) -------------------------------------


def test_vae_tiling_decodes_in_tiles_to_nearly_the_same_images(dreambench):
    """What `vae_tiling` changes is the VAE's decode. The toy world's toy-sd has a trained VAE (a random one's
    GroupNorm statistics and mid-block attention differ wildly between a tile and the whole), tiled at its
    config's sample_size of 64 px (8 latents, 25 % overlap): a real image's 128 px latents decode in tiles to
    nearly the untiled image, closer to it than the VAE's own reconstruction error. A real photo (DreamBench's):
    the toy world's flat renders reconstruct too well for that yardstick."""
    import numpy as np
    from PIL import Image

    from proxytune.backends.teachers import diffusion

    pipe = diffusion.load_pipeline("toy-sd")
    image = Image.open(sorted((dreambench / "dog").iterdir())[0]).convert("RGB").resize((128, 128))
    pixels = torch.tensor(np.asarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean  # untiled: the same latents for both decodes
        decoded, calls = [], []
        pipe.vae.decoder.register_forward_pre_hook(lambda *_: calls.append(1))
        for tiling in (False, True):
            assert diffusion.place_for_generation(pipe, torch.device("cpu"), vae_tiling=tiling) is None
            decoded.append(pipe.vae.decode(latents).sample.clamp(-1, 1))
    # once untiled, then 3 x 3 tiles (8-latent tiles every 6 latents): the latents really were split
    assert len(calls) == 1 + 9
    plain, tiled = decoded
    assert plain.shape == tiled.shape == (1, 3, 128, 128)
    difference = (plain - tiled).abs()
    assert difference.max() > 0 and difference.mean() < (plain - pixels).abs().mean()
    assert np.corrcoef(plain.flatten(), tiled.flatten())[0, 1] > 0.85


def test_cpu_offload_on_cpu_is_skipped_with_a_note():
    from proxytune.backends.teachers import diffusion

    pipe = diffusion.load_pipeline("tiny-sd")
    note = diffusion.place_for_generation(pipe, torch.device("cpu"), cpu_offload=True)
    assert note == "synthesis.cpu_offload: skipped on CPU (it moves models between the GPU and host memory)"
    assert not hasattr(pipe, "_all_hooks") or not pipe._all_hooks  # no offload hooks installed
    assert diffusion.generate(pipe, ["a dog"], [0], steps=1, guidance=1.0, size=64)[0].size == (64, 64)


# -- 8-bit AdamW for the student (torchao) ---------------------------------------------------------------


def _optimizer_state_bytes(optimizer) -> int:
    """Bytes of every optimiser state tensor, a torchao 8-bit state by its int8 codes and scales."""
    from proxytune.backends.teachers.diffusion import weight_bytes

    holder = torch.nn.Module()
    for i, state in enumerate(optimizer.state.values()):
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.ndim:
                holder.register_buffer(f"s{i}_{name}", value)
    return weight_bytes(holder)


def test_student_8bit_adam_overfits_with_a_quarter_of_the_state_and_resumes_bit_for_bit(project):
    pytest.importorskip("torchao")
    from conftest import make_params, tiny_spec
    from test_student import assert_resumes_bit_for_bit, fake_proxy_set, recipe

    # rank 64: every LoRA tensor of the tiny model has >= 4096 values, the least torchao quantises
    student = {"steps": 8, "checkpoint_every": 4, "batch_size": 2, "lora": {"rank": 64, "alpha": 64}}
    plain_params = make_params(project, tiny_spec(student={**student, "steps": 1}))
    params = make_params(project, tiny_spec(student={**student, "use_8bit_adam": True}))
    fake_proxy_set(params)

    straight = recipe(params)
    straight.checkpoint_dir = straight.checkpoint_dir.with_name("straight")
    straight.train()
    assert type(straight.optimizer.optimizer).__name__ == "AdamW8bit"
    assert straight.progress.losses[-1] < 0.9 * straight.progress.losses[0]  # it learns the proxy codes (6.68 -> 5.41)
    plain = recipe(plain_params)
    plain.train()
    eight, full = _optimizer_state_bytes(straight.optimizer), _optimizer_state_bytes(plain.optimizer)
    assert type(plain.optimizer.optimizer) is torch.optim.AdamW
    # two moments: 1 byte a value + a float32 scale per block of 256 + its 256-entry float32 code table, for
    # tensors torchao quantises (>= 4096 values, whole blocks), else float32 (here the LoRA of the 32-wide
    # condition projection)
    sizes = [p.numel() for p in straight.trainable]
    assert eight == sum(2 * (n + n // 256 * 4 + 1024) if n >= 4096 and n % 256 == 0 else 8 * n for n in sizes)
    assert full == 8 * sum(sizes) and eight < 0.31 * full, (eight, full)  # 0.305

    assert_resumes_bit_for_bit(params, straight, half=4)


def test_student_8bit_adam_without_torchao_is_a_one_line_error(monkeypatch):
    import sys

    from proxytune.errors import ProxytuneError
    from proxytune.spec.student import StudentSettings
    from proxytune.stages.student_setup import optimizer

    monkeypatch.setitem(sys.modules, "torchao.optim", None)  # import fails as if torchao were absent
    with pytest.raises(ProxytuneError, match=r"^student.use_8bit_adam: needs torchao"):
        optimizer([torch.nn.Parameter(torch.zeros(2))], StudentSettings(use_8bit_adam=True))


# -- text encoders off the GPU once their outputs are cached ---------------------------------------------


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_teacher_generates_the_same_images_from_cached_text_after_freeing_its_text_encoders(model):
    """What the teacher stage does after caching its prompts: the sample grid's text is encoded once, the
    text encoders are dropped, and generation from the cached tensors gives the same pixels (up to the
    rounding of encoding one prompt rather than a batch of copies: SDXL's pooled CLIP output differs by
    2e-7, one image by 1 level of 255)."""
    import numpy as np

    from proxytune.backends.teachers import diffusion

    pipe = diffusion.load_pipeline(model)
    kwargs = {"steps": 2, "guidance": 3.0, "size": 64}
    before = diffusion.generate(pipe, ["a sks dog"] * 2, [0, 1], **kwargs)
    text = diffusion.generation_text(pipe, "a sks dog", guidance=3.0)
    diffusion.free_text_encoders(pipe)
    assert all(getattr(pipe, name) is None for name in diffusion.family_of(pipe).text_encoders)
    after = diffusion.generate(pipe, ["a sks dog"] * 2, [0, 1], text=text, **kwargs)
    for a, b in zip(before, after):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    assert not np.array_equal(np.asarray(after[0]), np.asarray(after[1]))  # two seeds, two images


def test_student_moves_llamagen_t5_off_the_accelerator_and_still_encodes():
    """LlamaGen's T5 is needed only to encode prompts: after caching, the student stage moves it to host
    memory (`student_setup.text_encoder_to_host`); the sample grid's prompts are then encoded there
    (`generate` moves the features to the model's device)."""
    from types import SimpleNamespace

    from proxytune.stages.student_setup import text_encoder_to_host

    bundle = students.load_student("tiny-llamagen")
    before = bundle.encode_prompts(["a S* dog"])
    assert text_encoder_to_host(bundle, torch.device("cuda")) is True  # the stage's device on a GPU machine
    assert next(bundle.text_encoder.parameters()).device.type == "cpu"
    assert text_encoder_to_host(bundle, torch.device("cpu")) is False  # already in host memory
    assert text_encoder_to_host(SimpleNamespace(model=None), torch.device("cuda")) is False  # no separate encoder
    assert torch.equal(bundle.encode_prompts(["a S* dog"]), before)
