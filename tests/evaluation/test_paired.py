"""Paired bootstrap over items: intervals with known answers, pairing checked, the report's table."""

from __future__ import annotations

import json
import math
import re
import time

import numpy as np
import pytest

from spon.errors import SponError
from spon.evaluation import paired
from spon.evaluation.report import paired_markdown


def _items(values: dict[str, list[int]], doc_ids=None, digest="d") -> dict:
    n = len(next(iter(values.values())))
    return {"doc_id": list(doc_ids if doc_ids is not None else range(n)), "items_digest": digest,
            "metrics": {k: list(v) for k, v in values.items()}}


def test_identical_variants_give_a_degenerate_zero_interval():
    a = np.random.default_rng(1).integers(0, 2, 500)
    r = paired.paired_bootstrap(a, a.copy())
    assert (r["diff"], r["lo"], r["hi"], r["n"]) == (0.0, 0.0, 0.0, 500)


def test_constant_difference_has_no_spread():
    r = paired.paired_bootstrap(np.ones(300), np.zeros(300))
    assert (r["diff"], r["lo"], r["hi"]) == (1.0, 1.0, 1.0)


def test_known_difference_interval_matches_the_binomial_width():
    # 100 of 1000 items right for a only, the rest equal: mean difference 0.1; the resampled mean
    # of a 0/1 vector with p = 0.1 has sd sqrt(0.1 * 0.9 / 1000) = 0.00949, so the 95 % interval
    # is 0.1 -+ 1.96 * 0.00949 = [0.0814, 0.1186] (within bootstrap noise).
    b = np.zeros(1000)
    a = b.copy()
    a[np.random.default_rng(0).permutation(1000)[:100]] = 1
    r = paired.paired_bootstrap(a, b, replicates=10_000, seed=3)
    assert r["diff"] == pytest.approx(0.1)
    half = 1.96 * math.sqrt(0.1 * 0.9 / 1000)
    assert r["lo"] == pytest.approx(0.1 - half, abs=0.003)
    assert r["hi"] == pytest.approx(0.1 + half, abs=0.003)
    # a - b and b - a are mirror images; the same seed draws the same replicates
    back = paired.paired_bootstrap(b, a, replicates=10_000, seed=3)
    assert (back["diff"], back["lo"], back["hi"]) == pytest.approx((-r["diff"], -r["hi"], -r["lo"]))
    assert paired.paired_bootstrap(a, b, replicates=10_000, seed=3) == r


def test_pairing_is_far_tighter_than_independent_stderrs_on_correlated_variants():
    # Two variants that agree on 95 % of 1000 items (as dense and TEAL do): the paired interval
    # must be much narrower than the one from two independent stderrs, which ignores the agreement.
    rng = np.random.default_rng(7)
    a = (rng.random(1000) < 0.6).astype(float)
    b = a.copy()
    flip = rng.permutation(1000)[:50]
    b[flip] = 1 - b[flip]
    r = paired.paired_bootstrap(a, b)
    independent = 2 * 1.96 * math.sqrt(a.var() / a.size + b.var() / b.size)
    assert r["lo"] <= r["diff"] <= r["hi"]
    assert (r["hi"] - r["lo"]) < independent / 3


def test_average_over_tasks_resamples_within_each_task():
    # task 1: difference 0.1 (sd 0.00949 as above); task 2: identical variants (no spread). The
    # average is 0.05 with half task 1's sd: interval 0.05 -+ 1.96 * 0.00474.
    b1 = np.zeros(1000)
    a1 = b1.copy()
    a1[:100] = 1
    a2 = np.random.default_rng(2).integers(0, 2, 400).astype(float)
    r = paired.paired_bootstrap_average([(a1, b1), (a2, a2.copy())], replicates=10_000, seed=5)
    assert r["diff"] == pytest.approx(0.05) and r["tasks"] == 2
    half = 1.96 * math.sqrt(0.1 * 0.9 / 1000) / 2
    assert r["lo"] == pytest.approx(0.05 - half, abs=0.002)
    assert r["hi"] == pytest.approx(0.05 + half, abs=0.002)
    # the average is of task means, not of pooled items (task 2 has fewer items, same weight)
    assert paired.paired_bootstrap_average([(np.ones(10), np.zeros(10)), (np.zeros(990), np.zeros(990))])["diff"] == 0.5


def test_ten_thousand_replicates_of_a_thousand_items_take_well_under_a_second():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 1000), rng.integers(0, 2, 1000)
    paired.paired_bootstrap(a, b, replicates=100)  # warm numpy up
    t0 = time.perf_counter()
    paired.paired_bootstrap(a, b, replicates=10_000)
    assert time.perf_counter() - t0 < 1.0


def test_variants_scored_on_different_items_are_refused():
    a = _items({"acc,none": [1, 0, 1]})
    with pytest.raises(SponError, match="different items"):
        paired.paired_columns(a, _items({"acc,none": [1, 0, 1]}, doc_ids=[0, 1, 3]), "acc,none", "t")
    with pytest.raises(SponError, match="different items"):  # same ids, other documents
        paired.paired_columns(a, _items({"acc,none": [1, 0, 1]}, digest="other"), "acc,none", "t")
    with pytest.raises(SponError, match="different items"):
        paired.paired_columns(a, _items({"acc,none": [1, 0]}), "acc,none", "t")
    x, y = paired.paired_columns(a, _items({"acc,none": [0, 0, 1]}), "acc,none", "t")
    assert x.tolist() == [1, 0, 1] and y.tolist() == [0, 0, 1]


def test_item_scores_from_logged_samples_in_doc_id_order():
    samples = [{"doc_id": i, "doc_hash": f"h{i}", "filter": "none", "acc": a, "acc_norm": n, "perplexity": 1.5}
               for i, a, n in [(2, 1.0, 0.0), (0, 0.0, 1.0), (1, True, False)]]
    got = paired.item_scores(samples)
    assert got["doc_id"] == [0, 1, 2]
    assert got["metrics"] == {"acc,none": [0, 1, 1], "acc_norm,none": [1, 0, 0]}  # no perplexity: not 0/1
    assert got["items_digest"] == paired.item_scores(list(reversed(samples)))["items_digest"]
    samples[0]["doc_hash"] = "changed"
    assert got["items_digest"] != paired.item_scores(samples)["items_digest"]


def test_comparisons_pair_modes_within_each_weight_scheme():
    assert paired.comparisons(["dense", "teal", "spon"]) == [("spon", "teal"), ("teal", "dense")]
    assert paired.comparisons(["dense", "spon", "spon-int8", "teal-int8"]) == [
        ("spon-int8", "teal-int8"), ("spon-int8", "spon")]
    assert paired.comparisons(["dense", "spon"]) == []


def _variant(values: dict[str, list[int]]) -> dict:
    return {"tasks": {t: {"items": _items({"acc,none": v})} for t, v in values.items()}}


def test_compare_and_its_markdown_table():
    rng = np.random.default_rng(11)
    dense_a, dense_b = rng.integers(0, 2, 200), rng.integers(0, 2, 120)
    teal_a, teal_b = dense_a.copy(), dense_b.copy()
    teal_a[:40] = 0  # TEAL loses items dense had
    spon_a, spon_b = teal_a.copy(), teal_b.copy()
    spon_a[:20] = dense_a[:20]  # SPON wins back half of them
    variants = {"dense": _variant({"t1": dense_a, "t2": dense_b}), "teal": _variant({"t1": teal_a, "t2": teal_b}),
                "spon": _variant({"t1": spon_a, "t2": spon_b})}
    doc = paired.compare(variants, {})
    assert doc["comparisons"] == ["spon - teal", "teal - dense"]
    t1 = doc["tasks"]["t1"]
    assert t1["n"] == 200 and t1["metric"] == "acc,none"
    assert t1["diff"]["spon - teal"]["diff"] == pytest.approx(dense_a[:20].sum() / 200)
    assert t1["diff"]["teal - dense"]["diff"] == pytest.approx(-dense_a[:40].sum() / 200)
    assert doc["tasks"]["t2"]["diff"]["spon - teal"] == {**doc["tasks"]["t2"]["diff"]["spon - teal"],
                                                          "diff": 0.0, "lo": 0.0, "hi": 0.0}
    avg = doc["average"]
    assert avg["diff"]["spon - teal"]["diff"] == pytest.approx((dense_a[:20].sum() / 200) / 2)
    assert avg["accuracy"]["dense"] == pytest.approx((dense_a.mean() + dense_b.mean()) / 2)
    json.dumps(doc)  # results.json holds it as it is

    md = paired_markdown(doc)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("|")][2:]
    assert [r[0] for r in rows] == ["t1", "t2", "**average (2 tasks)**"]
    for row in rows:
        key = row[0]
        src = doc["tasks"][key] if key in doc["tasks"] else {**avg, "n": 320}
        assert int(row[2]) == src["n"]
        for name, text in zip(["dense", "teal", "spon"], row[3:6]):
            assert float(text) == pytest.approx(src["accuracy"][name], abs=5.01e-4)
        for label, text in zip(doc["comparisons"], row[6:8]):
            d, lo, hi = map(float, re.findall(r"[-+]\d+\.\d+", text))
            want = src["diff"][label]
            assert (d, lo, hi) == pytest.approx((want["diff"], want["lo"], want["hi"]), abs=5.01e-4)
            assert text.startswith("**") == (want["lo"] > 0 or want["hi"] < 0)


@pytest.mark.slow
def test_suite_keeps_items_and_reports_paired_differences(fused_dir, tiny_task_dir, tmp_path, sample_txt, tiny_items):
    """dense/teal/spon through lm-eval: every variant's per-item record is of the same items, its
    mean is lm-eval's accuracy, and results.json carries the paired table the report renders."""
    from spon.evaluation.suite import run_suite
    from spon.evaluation.variants import parse_variants

    doc = run_suite(str(fused_dir), parse_variants("dense,teal,spon"), ["tiny_mc"], tmp_path / "out",
                    task_dirs=[tiny_task_dir], batch_size=8, fidelity_text=sample_txt)
    for v in doc["variants"].values():
        r = v["tasks"]["tiny_mc"]
        assert r["items"]["doc_id"] == list(range(len(tiny_items)))
        assert np.mean(r["items"]["metrics"]["acc,none"]) == pytest.approx(r["metrics"]["acc,none"])
    p = json.loads((tmp_path / "out" / "results.json").read_text())["paired"]
    assert p["comparisons"] == ["spon - teal", "teal - dense"]
    row = p["tasks"]["tiny_mc"]
    assert row["n"] == len(tiny_items)
    for label, (a, b) in zip(p["comparisons"], [("spon", "teal"), ("teal", "dense")]):
        want = doc["variants"][a]["tasks"]["tiny_mc"]["metrics"]["acc,none"] - doc["variants"][b]["tasks"]["tiny_mc"]["metrics"]["acc,none"]
        assert row["diff"][label]["diff"] == pytest.approx(want)
        assert row["diff"][label]["lo"] <= row["diff"][label]["diff"] <= row["diff"][label]["hi"]
    assert "## Paired differences" in (tmp_path / "out" / "report.md").read_text()
