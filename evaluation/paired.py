"""Paired comparisons of variants scored on the same items: per-item correctness, paired bootstrap.

Two variants of one model scored on the same questions are strongly correlated (most items are
right or wrong for both), so the difference of their accuracies is far more precise than two
independent stderrs suggest. The interval here comes from a paired bootstrap over items: each
replicate draws item indices once and takes the mean difference of the two variants on exactly
those items. Across tasks, each replicate resamples within every task and averages the task
means (each task weighs the same, as in the usual average of task accuracies).

Items are identified by lm-eval's doc id and a digest of the documents themselves, so pairing is
exact and checked: variants scored on different items are refused, never silently aligned.
"""

from __future__ import annotations

import hashlib

import numpy as np

from spon.errors import SponError

# Per-item metrics that are 0/1 correctness (the mean over items is the task's accuracy).
ITEM_METRICS = ("acc", "acc_norm", "exact_match")
REPLICATES = 10_000
CONFIDENCE = 0.95
# Replicates drawn per block: bounds memory at about BLOCK_ELEMENTS int32 indices (HellaSwag's
# 10,042 items x 10,000 replicates would be 400 MB at once).
BLOCK_ELEMENTS = 4_000_000


def item_scores(samples: list[dict]) -> dict:
    """lm-eval's logged samples of one task -> {"doc_id": [...], "items_digest", "metrics":
    {"acc,none": [0/1 per item], ...}}, in doc-id order. The digest covers every item's doc
    hash, so two runs with the same digest scored the same documents in the same order."""
    by_filter: dict[str, dict[int, dict]] = {}
    for s in samples:
        by_filter.setdefault(s["filter"], {})[int(s["doc_id"])] = s
    if not by_filter:
        return {"doc_id": [], "items_digest": hashlib.sha256(b"").hexdigest(), "metrics": {}}
    first = next(iter(by_filter.values()))
    doc_ids = sorted(first)
    digest = hashlib.sha256("\n".join(f"{i}:{first[i]['doc_hash']}" for i in doc_ids).encode()).hexdigest()
    metrics = {}
    for filt, rows in by_filter.items():
        if sorted(rows) != doc_ids:
            raise SponError(f"filter {filt!r} scored other items than {next(iter(by_filter))!r}")
        for name in ITEM_METRICS:
            if name in rows[doc_ids[0]]:
                metrics[f"{name},{filt}"] = [int(bool(rows[i][name])) for i in doc_ids]
    return {"doc_id": doc_ids, "items_digest": digest, "metrics": metrics}


def paired_columns(a: dict, b: dict, metric: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The per-item values of `metric` for two variants' item records of one task, checked to be
    the same items (`what` names the pair in the error)."""
    if a["doc_id"] != b["doc_id"] or a["items_digest"] != b["items_digest"]:
        raise SponError(f"{what}: the variants were scored on different items "
                        f"({len(a['doc_id'])} vs {len(b['doc_id'])} items, digests differ); cannot pair them")
    if metric not in a["metrics"] or metric not in b["metrics"]:
        raise SponError(f"{what}: no per-item {metric!r} for both variants")
    return np.asarray(a["metrics"][metric], dtype=np.float64), np.asarray(b["metrics"][metric], dtype=np.float64)


def _resampled_means(diff: np.ndarray, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """The mean of `diff` over `replicates` bootstrap resamples of its items (indices drawn with
    replacement), drawn in blocks so memory stays bounded."""
    n = diff.shape[0]
    out = np.empty(replicates)
    step = max(1, BLOCK_ELEMENTS // max(n, 1))
    for r0 in range(0, replicates, step):
        r1 = min(replicates, r0 + step)
        idx = rng.integers(0, n, size=(r1 - r0, n), dtype=np.int32 if n < 2**31 else np.int64)
        out[r0:r1] = diff[idx].mean(axis=1)
    return out


def _interval(diff_mean: float, replicate_means: np.ndarray, confidence: float) -> dict:
    lo, hi = np.quantile(replicate_means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"diff": float(diff_mean), "lo": float(lo), "hi": float(hi)}


def paired_bootstrap(a, b, replicates: int = REPLICATES, seed: int = 0, confidence: float = CONFIDENCE) -> dict:
    """mean(a - b) over items and its percentile interval from a paired bootstrap: every
    replicate resamples item indices once and uses the same indices for both variants."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise SponError(f"paired bootstrap needs two equal-length, non-empty item vectors (got {a.shape} and {b.shape})")
    diff = a - b
    means = _resampled_means(diff, replicates, np.random.default_rng(seed))
    return {**_interval(diff.mean(), means, confidence), "n": int(diff.size), "replicates": replicates,
            "confidence": confidence}


def paired_bootstrap_average(pairs: list[tuple], replicates: int = REPLICATES, seed: int = 0,
                             confidence: float = CONFIDENCE) -> dict:
    """The average over tasks of mean(a - b), with its interval: every replicate resamples items
    within each task (independently across tasks) and averages the task means."""
    if not pairs:
        raise SponError("no tasks to average")
    rng = np.random.default_rng(seed)
    total = np.zeros(replicates)
    point = 0.0
    for a, b in pairs:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape or a.size == 0:
            raise SponError("paired bootstrap needs two equal-length, non-empty item vectors per task")
        diff = a - b
        point += diff.mean()
        total += _resampled_means(diff, replicates, rng)
    k = len(pairs)
    return {**_interval(point / k, total / k, confidence), "tasks": k, "replicates": replicates, "confidence": confidence}


def comparisons(names: list[str]) -> list[tuple[str, str]]:
    """Which variant pairs (a, b) to report as a - b: SPON - TEAL and TEAL - dense within each
    weight scheme (fp32, int8, ...), and each quantized variant against its fp32 mode."""
    present = set(names)
    out = []
    for better, worse in (("spon", "teal"), ("teal", "dense")):
        for name in names:
            mode_name, _, quant = name.partition("-")
            other = worse + (f"-{quant}" if quant else "")
            if mode_name == better and other in present:
                out.append((name, other))
    for name in names:
        mode_name, _, quant = name.partition("-")
        if quant and mode_name in present:
            out.append((name, mode_name))
    return out


def compare(variants: dict[str, dict], headline: dict[str, str], replicates: int = REPLICATES, seed: int = 0) -> dict:
    """The paired table of a suite's results: for every comparison pair and every task scored with
    per-item records by both variants, the difference of the task's headline metric with its
    interval, and the average over those tasks. `variants` is results.json's "variants";
    `headline` maps task -> metric key (e.g. "acc_norm,none"); a task not in it uses the first
    metric it logged per item."""
    names = list(variants)
    pairs = comparisons(names)
    headline = dict(headline)
    tasks = []
    for t in dict.fromkeys(t for v in variants.values() for t in v["tasks"]):
        if not all(variants[n]["tasks"].get(t, {}).get("items", {}).get("metrics") for n in names):
            continue  # not scored per item by every variant (a perplexity task, an old checkpoint)
        logged = variants[names[0]]["tasks"][t]["items"]["metrics"]
        headline[t] = headline.get(t) or next(iter(logged))
        if headline[t] not in logged:
            raise SponError(f"task {t}: headline metric {headline[t]!r} was not logged per item (logged: {list(logged)})")
        tasks.append(t)
    if not pairs or not tasks:
        return {"comparisons": [], "tasks": {}, "average": {}}
    rows: dict[str, dict] = {}
    average: dict[str, dict] = {}
    for a, b in pairs:
        label = f"{a} - {b}"
        columns = []
        for t in tasks:
            metric = headline[t]
            x, y = paired_columns(variants[a]["tasks"][t]["items"], variants[b]["tasks"][t]["items"], metric,
                                  f"task {t}, {a} vs {b}")
            columns.append((x, y))
            row = rows.setdefault(t, {"metric": metric, "n": int(x.size),
                                      "accuracy": {n: float(np.mean(variants[n]["tasks"][t]["items"]["metrics"][metric]))
                                                   for n in names}, "diff": {}})
            row["diff"][label] = paired_bootstrap(x, y, replicates, seed)
        average[label] = paired_bootstrap_average(columns, replicates, seed)
    avg_acc = {n: float(np.mean([rows[t]["accuracy"][n] for t in tasks])) for n in names}
    return {"comparisons": [f"{a} - {b}" for a, b in pairs], "tasks": rows,
            "average": {"accuracy": avg_acc, "diff": average, "tasks": tasks},
            "method": f"paired bootstrap over items, {replicates} replicates, seed {seed}, "
                      f"{int(CONFIDENCE * 100)} % percentile interval; the average resamples within each task"}
