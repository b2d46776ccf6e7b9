"""The large-vocabulary teacher (spon.distill): when the dense log-probs do not fit the cache
budget, the KL is computed from final hidden states by the LM head in chunks of tokens. It must be
the plain KL (and NLL, and the gradient alpha trains on) to fp32 tolerance, on every architecture:
Gemma-2's final-logit soft-cap and Gemma-3's tied head included."""

from __future__ import annotations

import pytest
import torch

from spon.calibration import sample_blocks
from spon.config import SparsityConfig
from spon.distill import Teacher, _kl_and_student, chunked_kl_and_nll, closed_form_alpha, final_hidden
from spon.sources import load_model
from spon.sparse import load_alphas, mode, sparse_linears, wrap_projections
from spon.thresholds import compute_thresholds


def _sparse(path):
    torch.manual_seed(0)
    model, tok = load_model(str(path))
    wrap_projections(model)
    blocks = sample_blocks(model, tok, num_blocks=12, block_len=24, seed=0)
    compute_thresholds(model, blocks[:8], SparsityConfig(sparsity=0.5))
    load_alphas(model, closed_form_alpha(model, blocks[:8]))
    return model, blocks


def _grads(model, loss):
    params = [m.alpha for m in sparse_linears(model)]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3_text"])
def test_chunked_kl_is_the_plain_kl(arch, tiny_models):
    model, blocks = _sparse(tiny_models[arch])
    ids = blocks[8:11]
    with torch.no_grad(), mode(model, "dense"):
        h_teacher = final_hidden(model, ids)
    for m in sparse_linears(model):
        m.alpha.requires_grad_(True)
    with mode(model, "spon"):
        kl, student = _kl_and_student(model, ids, None)
        nll = -student[:, :-1].gather(-1, ids[:, 1:, None]).mean()
        plain_grads = _grads(model, kl)
        for chunk in (5, 7, 1000):  # uneven chunks, and one chunk for everything
            ckl, cnll = chunked_kl_and_nll(model, ids, h_teacher, chunk=chunk)
            torch.testing.assert_close(ckl, kl.detach(), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(cnll, nll.detach(), rtol=1e-5, atol=1e-6)
            for a, b in zip(_grads(model, ckl), plain_grads):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert kl.item() > 1e-3  # sparsification matters: the comparison is not of zeros
    assert max(g.abs().max().item() for g in plain_grads) > 1e-4


def test_a_large_vocabulary_teacher_caches_hidden_states_not_log_probs(tiny_models):
    model, blocks = _sparse(tiny_models["gemma2"])
    vocab, hidden = model.get_output_embeddings().weight.shape
    train = blocks[:8]
    # a budget between the hidden states' size and the log-probs' size
    budget = train.numel() * (hidden * 4 + 1) / 1e9
    assert train.numel() * vocab * 4 > budget * 1e9
    chunk_bytes = 5 * vocab * 4  # this tiny vocabulary as if it were large: chunks of 5 tokens
    cached_logprobs = Teacher(model, train, budget_gb=1.0)  # a small vocabulary: the plain KL, log-probs cached
    assert Teacher(model, train, budget_gb=1.0, logits_chunk_bytes=chunk_bytes).cached is None  # large: never
    cached_hidden = Teacher(model, train, budget_gb=budget, logits_chunk_bytes=chunk_bytes)
    recomputed = Teacher(model, train, budget_gb=0.0, logits_chunk_bytes=chunk_bytes)
    plain = Teacher(model, train, budget_gb=0.0)  # one block's logits are far below LOGITS_CHUNK_BYTES
    assert not plain.chunked and plain.cached is None and recomputed.chunk == 5
    assert cached_logprobs.cached is not None and not cached_logprobs.chunked
    assert cached_hidden.cached is None and cached_hidden.chunked and cached_hidden.hidden.shape == (8, 24, hidden)
    assert recomputed.cached is None and recomputed.chunked and recomputed.hidden is None
    idx = torch.tensor([5, 1, 6])
    with torch.no_grad(), mode(model, "teal"):
        kl, nll = cached_logprobs.kl_and_nll(idx)
        for t in (cached_hidden, recomputed, plain):
            k, n = t.kl_and_nll(idx)
            torch.testing.assert_close(k, kl, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(n, nll, rtol=1e-5, atol=1e-6)
        with mode(model, "dense"):  # the teacher against itself
            assert cached_hidden.kl(idx).abs().item() < 1e-6


def test_chunked_kl_under_bf16_autocast_follows_the_plain_one(tiny_models):
    """The student in bf16 autocast (compute_dtype bf16): the LM head's matmul in bf16 both ways."""
    model, blocks = _sparse(tiny_models["gemma3_text"])
    ids = blocks[8:10]
    with torch.no_grad(), mode(model, "dense"):
        h_teacher = final_hidden(model, ids)
        teacher = torch.log_softmax(model(ids).logits.float(), -1)
    for m in sparse_linears(model):
        m.alpha.requires_grad_(True)
    with mode(model, "spon"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kl, _ = _kl_and_student(model, ids, teacher)
            ckl, _ = chunked_kl_and_nll(model, ids, h_teacher, chunk=6)
        torch.testing.assert_close(ckl, kl.detach(), rtol=2e-2, atol=1e-4)
        for a, b in zip(_grads(model, ckl), _grads(model, kl)):
            assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
