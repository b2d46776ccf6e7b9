"""The knobs a real-model recipe is made of: per-model presets, thresholds taken on the sparse
model, a cached teacher, alpha on a subset of projections, a fixed number of scored tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spon.calibration import read_documents, sample_blocks
from spon.config import DistillConfig, SparsityConfig, load_config
from spon.distill import distill
from spon.errors import SponError
from spon.sources import load_model
from spon.perplexity import perplexity
from spon.sparse import by_name, counting_zeros, mode, wrap_projections
from spon.thresholds import compute_thresholds


@pytest.fixture(scope="module")
def blocks(stories_path):
    model, tok = load_model(str(stories_path))
    return sample_blocks(model, tok, num_blocks=40, block_len=64, seed=3)


def fresh(stories_path):
    model, tok = load_model(str(stories_path))
    wrap_projections(model)
    return model, tok


# ----------------------------------------------------------------------------- presets

def test_a_named_model_brings_its_preset_under_file_and_flags(tmp_path):
    # SmolLM2-135M's recipe (spon/presets.py), spelled out: the test pins the values, not the table.
    cfg = load_config(None, {"model": "smollm2-135m"})
    assert cfg.preset == "smollm2-135m"
    assert (cfg.calibration.source, cfg.calibration.num_blocks, cfg.calibration.block_len,
            cfg.calibration.heldout_blocks) == ("text", 88, 256, 32)
    # two calibration domains: wikitext-2 validation (the local copy) and the standard library's calibration half
    assert [Path(f).name for f in cfg.calibration.files] == ["valid.txt", "corpus:python-stdlib"]
    assert (cfg.distill.steps, cfg.distill.lr, cfg.distill.batch_size, cfg.distill.init, cfg.distill.warmup,
            cfg.distill.checkpoint_every, cfg.distill.compute_dtype, cfg.distill.teacher_cache_gb,
            cfg.distill.retake_thresholds) == (400, 3e-4, 2, "closed_form", 10, 50, "bf16", 4.0, True)
    assert (cfg.eval.window, cfg.eval.stride, cfg.eval.max_tokens) == (512, 512, 25600)
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"model": "smollm2-135m", "distill": {"lr": 5e-4}}))
    cfg = load_config(f, {"distill.steps": 3})  # file over preset, flag over file; the rest of the section stays
    assert (cfg.distill.lr, cfg.distill.steps, cfg.distill.batch_size) == (5e-4, 3, 2)


def test_no_preset_for_other_models_or_when_switched_off():
    default = load_config(None, {})
    assert default.preset == "none" and default.distill.lr == 1e-2 and default.calibration.block_len == 128
    off = load_config(None, {"model": "smollm2-135m", "preset": "none"})
    assert off.preset == "none" and off.distill.lr == default.distill.lr
    forced = load_config(None, {"preset": "smollm2-135m"})  # a local copy of the same model, say
    assert forced.preset == "smollm2-135m" and forced.distill.lr == 3e-4 and forced.model is None
    with pytest.raises(SponError, match="unknown preset 'nope'"):
        load_config(None, {"preset": "nope"})


# ----------------------------------------------------------------------------- thresholds

@torch.no_grad()
@pytest.mark.parametrize("target", [0.5, 0.7])
def test_sparse_upstream_thresholds_realize_the_target_dense_ones_overshoot(stories_path, blocks, target):
    realized = {}
    for on in ("sparse", "dense"):
        model, _ = fresh(stories_path)
        compute_thresholds(model, blocks, SparsityConfig(sparsity=target, calibrate_on=on))
        with mode(model, "teal"), counting_zeros(model) as z:
            model(blocks, use_cache=False)
        realized[on] = z
    per = realized["sparse"]["per_projection"]
    assert all(abs(v - target) < 0.002 for v in per.values()), per  # each projection, on the calibration text
    # the dense quantiles drift: downstream inputs shrink once upstream projections are sparse
    assert abs(realized["dense"]["weighted"] - target) > 3 * abs(realized["sparse"]["weighted"] - target)


# ----------------------------------------------------------------------------- distillation

def _distill(stories_path, blocks, **kw):
    model, _ = fresh(stories_path)
    compute_thresholds(model, blocks[:32], SparsityConfig(sparsity=0.5))
    cfg = DistillConfig(steps=6, lr=5e-3, warmup=1, batch_size=8, checkpoint_every=3, **kw)
    # The blocks are the model's own samples: selection on KL alone, as the pipeline does for them.
    return model, distill(model, blocks[:32], blocks[32:], cfg, progress=False, nll_guard=False)


def test_the_cached_teacher_trains_the_same_alpha(stories_path, blocks):
    _, cached = _distill(stories_path, blocks)  # default budget: the teacher's log-probs fit
    _, fresh_teacher = _distill(stories_path, blocks, teacher_cache_gb=0.0)
    assert cached.kl_history == pytest.approx(fresh_teacher.kl_history, rel=1e-4)
    assert cached.heldout_kl_after == pytest.approx(fresh_teacher.heldout_kl_after, rel=1e-4)
    for n, a in cached.alphas.items():
        torch.testing.assert_close(a, fresh_teacher.alphas[n], atol=1e-5, rtol=1e-3)


def test_alpha_on_down_only(stories_path, blocks):
    model, r = _distill(stories_path, blocks, targets=["down"], init="closed_form")
    assert r.selected_step is not None
    for n, m in by_name(model).items():
        assert (m.alpha.abs().sum() > 0) == (m.kind == "down"), n
        assert m.threshold.item() > 0  # every projection stays sparse
    only_q, _ = load_model(str(stories_path))
    wrap_projections(only_q, ["q"])
    compute_thresholds(only_q, blocks[:32], SparsityConfig(sparsity=0.5, targets=["q"]))
    with pytest.raises(SponError, match="no sparse linears to train alpha for"):
        distill(only_q, blocks[:32], blocks[32:], DistillConfig(steps=1, targets=["down"]), progress=False)


# ----------------------------------------------------------------------------- evaluation

def test_max_tokens_scores_exactly_that_prefix(stories_path, sample_txt):
    model, tok = load_model(str(stories_path))
    docs = read_documents(sample_txt)
    full = perplexity(model, tok, docs, window=128, stride=128)
    part = perplexity(model, tok, docs, window=128, stride=128, max_tokens=500)
    assert part["tokens"] == 500 and full["tokens"] > 500 and part["perplexity"] != full["perplexity"]
    # the same as scoring the documents cut by hand to 500 predicted tokens
    ids, left = [], 500
    nll = 0.0
    import math

    from spon.perplexity import document_nll

    for d in docs:
        t = [tok.bos_token_id] + tok(d, add_special_tokens=False)["input_ids"]
        t = t[: left + 1]
        s, c = document_nll(model, torch.tensor(t), 128, 128)
        nll, left = nll + s, left - c
        if left == 0:
            break
    assert part["perplexity"] == pytest.approx(math.exp(nll / 500), rel=1e-9)
    assert perplexity(model, tok, docs, window=128, stride=128, max_tokens=10**9) == full
