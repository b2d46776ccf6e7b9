"""Scoring each multiple-choice context once, and every other request with the LM head on its
continuation only, gives HFLM's loglikelihoods and greedy flags."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance

from spon.evaluation import shared_context
from spon.evaluation.harness import make_lm
from spon.fuse import load_sparse_model
from spon.sparse import mode

pytestmark = pytest.mark.slow  # the fused_dir fixture and lm-eval/torchao (~10-20 s): not in the fast tier


@pytest.fixture(scope="module")
def lm(fused_dir):
    torch.set_num_threads(1)
    model, tok, _ = load_sparse_model(fused_dir)
    return model, make_lm(model, tok, batch_size=4)


def _requests(items):
    long_story = " ".join(["Once upon a time, there was a little girl named Lily who liked to play outside."] * 60)
    pairs = [(q, " " + c) for q, choices, _ in items for c in choices]
    pairs += [(long_story, " yes"), (long_story, " no"), (long_story, " and then they all went home happy.")]
    pairs += [("A context with one choice only:", " it goes the plain way.")]
    return [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]


@pytest.mark.parametrize("run_mode", ["dense", "teal", "spon"])
def test_shared_context_equals_hflm(lm, tiny_items, run_mode):
    model, harness = lm
    reqs = _requests(tiny_items)
    encoded = [(r.args, *harness._encode_pair(*r.args)) for r in reqs]
    assert len(encoded[-4][1]) > harness.max_length  # the long story is truncated on both paths
    groups, rest = shared_context.group_by_context(encoded, harness.max_length)
    assert sum(map(len, groups)) >= 2 * len(tiny_items) + 2 and len(rest) >= 1  # both paths are exercised
    with mode(model, run_mode):
        harness.share_context = False
        plain = harness.loglikelihood(reqs, disable_tqdm=True)
        harness.share_context = True
        shared = harness.loglikelihood(reqs, disable_tqdm=True)
    assert [g for _, g in shared] == [g for _, g in plain]
    assert [ll for ll, _ in shared] == pytest.approx([ll for ll, _ in plain], abs=1e-4)


def test_batches_cover_every_group_once_within_budgets():
    # contexts of widths 500, 40..10 and continuations up to 30 tokens, two choices each
    widths = [500] + list(range(40, 9, -1))
    requests, groups = [], []
    for w in widths:
        ctx = list(range(w))
        groups.append([len(requests), len(requests) + 1])
        requests += [(None, ctx, [1] * (w % 30 + 1)), (None, ctx, [2] * 3)]
    out = list(shared_context.batches(groups, requests, max_length=512, max_groups=8, token_budget=200))
    seen = [i for batch in out for g in batch for i in g]
    assert sorted(seen) == list(range(len(requests)))
    assert out[0] == [groups[0]]  # the 500-token outlier does not set the width of short contexts
    for batch in out:
        ctx_w = [len(requests[g[0]][1]) for g in batch]
        assert len(batch) <= 8
        assert len(batch) == 1 or (len(batch) * max(ctx_w) <= 200 and min(ctx_w) >= 0.75 * max(ctx_w))


def test_single_batches_cover_every_request_once_within_budgets():
    # one 500-token outlier, then sequences of 60..11 tokens (context + continuation - 1)
    requests = [(None, list(range(490)), [1] * 11)] + [(None, list(range(w)), [2] * 2) for w in range(60, 10, -1)]
    out = list(shared_context.single_batches(list(range(len(requests))), requests, max_length=512, max_rows=8,
                                             token_budget=300))
    assert sorted(i for b in out for i in b) == list(range(len(requests)))
    assert out[0] == [0]  # the outlier does not set the width of short rows
    for batch in out:
        widths = [len(requests[i][1]) + len(requests[i][2]) - 1 for i in batch]
        assert len(batch) <= 8
        assert len(batch) == 1 or (len(batch) * max(widths) <= 300 and min(widths) >= 0.75 * max(widths))
    # rows x longest continuation (the logits kept) within scored_budget
    capped = list(shared_context.single_batches(list(range(len(requests))), requests, max_length=512, max_rows=8,
                                                token_budget=300, scored_budget=5))
    assert sorted(i for b in capped for i in b) == list(range(len(requests)))
    assert all(len(b) * max(len(requests[i][2]) for i in b) <= 5 for b in capped if len(b) > 1)
    assert max(map(len, capped)) == 2  # two 2-token continuations fit in 5, three do not


def test_last_half_models_keep_hflms_one_forward(lm, tiny_items, monkeypatch):
    """TEAL's last_half protocol keeps the first half of each forward dense: a context and its
    choices run as two forwards would sparsify other positions, so such a model is scored by
    HFLM's path (and the shared path is never entered)."""
    from spon.sparse import set_protocol

    model, harness = lm
    reqs = _requests(tiny_items)

    def refuse(*args, **kwargs):
        raise AssertionError("the shared-context path ran on a last_half model")

    set_protocol(model, "last_half")
    try:
        with mode(model, "spon"), monkeypatch.context() as m:
            m.setattr(shared_context, "score_batch", refuse)
            m.setattr(shared_context, "score_singles", refuse)
            harness.share_context = True
            harness.loglikelihood(reqs, disable_tqdm=True)
        with mode(model, "dense"):  # dense has no protocol: the fast path stays
            assert not harness._position_dependent_sparsity()
    finally:
        set_protocol(model, "all")
