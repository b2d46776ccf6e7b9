"""A registry YAML over a jsonl made here runs through lm-eval and gives the hand-computed score."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from spon.evaluation.harness import evaluate_tasks, make_lm
from spon.evaluation.registry import build_tasks
from spon.fuse import load_sparse_model
from spon.sparse import mode

pytestmark = pytest.mark.slow  # lm-eval end to end (~15 s with its fixtures): not in the fast tier


@torch.no_grad()
def direct_loglikelihood(model, tok, context: str, continuation: str, bos: bool) -> float:
    """log P(continuation | context) from one forward pass, tokenized as whole-minus-context."""
    prefix = [tok.bos_token_id] if bos else []
    ctx = prefix + tok(context, add_special_tokens=False)["input_ids"]
    whole = prefix + tok(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ids = torch.tensor([ctx + cont])
    logp = F.log_softmax(model(ids[:, :-1], use_cache=False).logits[0].float(), -1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


@pytest.fixture(scope="module")
def sparse(fused_dir):
    torch.set_num_threads(1)
    model, tok, _ = load_sparse_model(fused_dir)
    return model, tok, make_lm(model, tok, batch_size=4)


def _lm_bos(lm, tok) -> bool:
    return lm.tok_encode("The cat")[:1] == [tok.bos_token_id]


@pytest.mark.parametrize("run_mode", ["dense", "spon"])
def test_yaml_task_accuracy_equals_direct_scoring(tiny_task_dir, tiny_items, sparse, run_mode):
    ITEMS = tiny_items
    model, tok, lm = sparse
    bos = _lm_bos(lm, tok)
    with mode(model, run_mode):
        picks = []
        for q, choices, _ in ITEMS:
            scores = [direct_loglikelihood(model, tok, q, " " + c, bos) for c in choices]
            picks.append(max(range(len(choices)), key=scores.__getitem__))
    expected = sum(p == g for p, (_, _, g) in zip(picks, ITEMS)) / len(ITEMS)
    assert 0 < expected < 1  # the gold labels are mixed on purpose

    tasks = build_tasks(["tiny_mc"], [tiny_task_dir])
    res = evaluate_tasks(lm, model, run_mode, tasks)
    assert res["tiny_mc"]["n"] == len(ITEMS)
    assert res["tiny_mc"]["metrics"]["acc,none"] == pytest.approx(expected)
    if run_mode == "spon":  # sparsity was active while lm-eval scored
        assert res["tiny_mc"]["realized_sparsity"] == pytest.approx(0.5, abs=0.15)
    else:
        assert res["tiny_mc"]["realized_sparsity"] == 0.0


def test_sparse_loglikelihoods_differ_from_dense_and_match_a_direct_forward(sparse, tiny_items):
    ITEMS = tiny_items
    model, tok, lm = sparse
    bos = _lm_bos(lm, tok)
    pairs = [(q, " " + c[0]) for q, c, _ in ITEMS]
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    got = {}
    for m in ("dense", "teal", "spon"):
        with mode(model, m):
            got[m] = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
            direct = [direct_loglikelihood(model, tok, c, x, bos) for c, x in pairs]
        assert got[m] == pytest.approx(direct, abs=1e-4)
    for m in ("teal", "spon"):
        assert max(abs(a - b) for a, b in zip(got[m], got["dense"])) > 0.05
    assert got["teal"] != pytest.approx(got["spon"], abs=1e-6)  # fused alpha is in the bias


def test_registry_substitutes_data_root_and_rejects_missing_data(tiny_task_dir, monkeypatch, tmp_path):
    from spon.evaluation.registry import discover
    from spon.errors import SponError

    spec = discover([tiny_task_dir])["tiny_mc"]
    assert "${SPON_EVAL_DATA}" in spec.raw["dataset_kwargs"]["data_files"]["test"]
    assert spec.config()["dataset_kwargs"]["data_files"]["test"].startswith(str(tmp_path))
    monkeypatch.setenv("SPON_EVAL_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(SponError, match="data file does not exist"):
        spec.config()


def test_lambada_scores_the_last_word_after_its_space():
    """lm-eval gives a loglikelihood task no target delimiter: the registry's LAMBADA target must
    carry the space itself, else the model is asked for the context glued to the word (every model
    scored 0). The request is (context, " " + last word), and context + target is the passage."""
    import json

    from spon.evaluation.registry import data_root

    task = build_tasks(["lambada"])["lambada"]
    doc = next(iter(task.test_docs()))
    (req,) = [task.construct_requests(doc, task.doc_to_text(doc))]
    context, target = req.arguments
    first = json.loads((data_root() / "lambada_openai.jsonl").open().readline())
    assert (context, target) == (first["context"], " " + first["continuation"])
