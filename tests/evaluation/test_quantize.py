"""Weight-only int8/int4 of the fused sparse model: accuracy, sparsity kept, save/load round trip."""

from __future__ import annotations

import pytest
import torch

from spon.calibration import read_documents
from spon.errors import SponError
from spon.fuse import load_sparse_model
from spon.perplexity import perplexity
from spon.quantize import load_quantized, quantize_model, save_quantized
from spon.sparse import mode, sparse_linears

pytestmark = pytest.mark.slow  # the fused_dir fixture and lm-eval/torchao (~10-20 s): not in the fast tier


@pytest.fixture(scope="module")
def spon_fp32(fused_dir, sample_txt):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok, _ = load_sparse_model(fused_dir)
    yield perplexity(model, tok, read_documents(sample_txt))
    torch.set_num_threads(threads)  # process-wide: give later tests their threads back


def test_int8_spon_perplexity_within_2_percent_of_fp32(fused_dir, sample_txt, spon_fp32):
    model, tok, _ = load_sparse_model(fused_dir)
    quantize_model(model, "int8")
    assert all(type(m.linear.weight).__name__ == "Int8Tensor" for m in sparse_linears(model))
    assert all(m.linear.bias.dtype == torch.float32 for m in sparse_linears(model))  # b' = b + W alpha stays fp
    r = perplexity(model, tok, read_documents(sample_txt))
    assert r["tokens"] == spon_fp32["tokens"] == 1804
    assert r["perplexity"] == pytest.approx(spon_fp32["perplexity"], rel=0.02)
    assert r["perplexity"] != spon_fp32["perplexity"]  # the weights really changed
    assert r["realized_sparsity"] == pytest.approx(spon_fp32["realized_sparsity"], abs=0.01)
    assert r["realized_sparsity"] == pytest.approx(0.5, abs=0.1)


def test_int4_runs_sparse_and_degrades_more_than_int8(fused_dir, sample_txt, spon_fp32):
    model, tok, _ = load_sparse_model(fused_dir)
    info = quantize_model(model, "int4", group_size=32)
    assert info["per_row_in_features"] == [172]  # down_proj's 172 inputs do not tile by 32
    r = perplexity(model, tok, read_documents(sample_txt))
    assert spon_fp32["perplexity"] * 1.0 < r["perplexity"] < spon_fp32["perplexity"] * 1.5
    assert r["realized_sparsity"] == pytest.approx(0.5, abs=0.1)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_saves_and_loads_with_identical_logits(fused_dir, tmp_path, scheme):
    model, tok, _ = load_sparse_model(fused_dir)
    info = quantize_model(model, scheme)
    out = save_quantized(model, tok, tmp_path / scheme, fused_dir, info)
    assert not (out / "model.safetensors").exists()  # no fp copy of the weights
    back, _, meta = load_quantized(out)
    assert meta["sparsity"] == 0.5
    ids = tok("Once upon a time, there was a little dog named Max.", return_tensors="pt").input_ids
    for m in ("spon", "teal", "dense"):
        with torch.no_grad(), mode(model, m), mode(back, m):
            a = model(ids, use_cache=False).logits
            b = back(ids, use_cache=False).logits
        assert torch.equal(a, b), m
    assert type(sparse_linears(back)[0].linear.weight) is type(sparse_linears(model)[0].linear.weight)


def test_nf4_runs_sparse_or_says_what_it_needs(fused_dir, sample_txt, spon_fp32):
    """bitsandbytes is optional: without it nf4 is a one-line user error; with it (>= 0.46 runs
    NF4 on CPU too) the NF4 model runs sparse through SparseLinear's own F.linear call."""
    model, tok, _ = load_sparse_model(fused_dir)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(SponError, match="nf4 needs bitsandbytes"):
            quantize_model(model, "nf4")
        return
    quantize_model(model, "nf4")
    r = perplexity(model, tok, read_documents(sample_txt))
    assert spon_fp32["perplexity"] < r["perplexity"] < spon_fp32["perplexity"] * 1.5
    assert r["realized_sparsity"] == pytest.approx(0.5, abs=0.1)


def test_unknown_scheme_is_a_user_error(fused_dir):
    model, _, _ = load_sparse_model(fused_dir)
    with pytest.raises(SponError, match="unknown quantization"):
        quantize_model(model, "int3")
