"""Memory options (issue 27 item 3), proved by behaviour on the tiny models: the same losses and
gradients as without them, and less memory where that is the point (the CPU allocator's peak, read
from PyTorch's profiler)."""

import pytest
import torch

from proxytune.backends import students
from conftest import add_lora


def cpu_peak_bytes(fn) -> int:
    """Peak of the CPU allocator's live bytes while `fn` runs, above what was live before.

    PyTorch's profiler records every allocation and free on CPU: each op's own (self) allocations minus
    frees, and frees outside any op as "[memory]" events. Their running sum in time order is the live
    memory after each op; allocations freed inside one op (its temporaries) are not seen, so this is a
    slight under-estimate of the true peak, the same for both sides of a comparison."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


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
