"""Zero-shot accuracy of dense / TEAL / SPON of one fused checkpoint, compared item by item.

    .venv/bin/python benchmarks/zeroshot.py out/run/fused --limit 1000 --jobs 2

dense, TEAL and SPON are three modes of the one fused checkpoint (evaluation/variants.py), each
scored on the same first `--limit` items of every task (the whole set when smaller) by `spon
eval`'s suite (evaluation/suite.py: one model load per worker, batched, shared contexts). Prints
and writes the paired table: per task and on average, SPON - TEAL and TEAL - dense with 95 %
paired-bootstrap intervals over items (evaluation/paired.py). Also the measured items/s of every
(variant, task) and, from them, the time the same suite takes at `--plan-limit` items a task.

Finished (variant, task) units are kept under --work and reused by a rerun with the same model
and options (the suite's --resume), so a stopped run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

ZEROSHOT = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq", "openbookqa", "lambada")
RESULTS = Path(__file__).resolve().parent / "results"


def task_sizes(tasks: list[str]) -> dict[str, int]:
    from spon.evaluation.registry import build_tasks

    return {name: len(task.eval_docs) for name, task in build_tasks(tasks).items()}


def throughput(doc: dict, sizes: dict[str, int], plan_limit: int, jobs: int) -> dict:
    """items/s of every (variant, task) as measured (items over the unit's scoring CPU time in
    one single-threaded process: on a shared machine the wall time also counts other jobs), and
    the time `plan_limit` items a task would take at those rates."""
    rates = {v: {t: r["n"] / r["cpu_s"] for t, r in e["tasks"].items() if r.get("cpu_s")}
             for v, e in doc["variants"].items()}
    wall_rates = {v: {t: r["n"] / r["wall_s"] for t, r in e["tasks"].items() if r.get("wall_s")}
                  for v, e in doc["variants"].items()}
    unit_s = {v: {t: min(plan_limit, sizes[t]) / rate for t, rate in per.items()} for v, per in rates.items()}
    total = sum(s for per in unit_s.values() for s in per.values())
    return {"items_per_s": rates, "items_per_wall_s": wall_rates, "plan_limit": plan_limit,
            "plan_items": {t: min(plan_limit, sizes[t]) for t in sizes},
            "plan_unit_s": unit_s, "plan_process_s": total, "plan_wall_s_estimate": total / jobs, "jobs": jobs}


def paired_suite(model_dir: str, variants: str, tasks: list[str], limit: int, work: Path, *, jobs: int = 2,
                 batch_size: int = 64, dtype: str = "fp32", plan_limit: int = 1000) -> dict:
    """The variants of one fused checkpoint on the same first `limit` items of every task, with
    the paired intervals and each item's headline metric (the result this script writes)."""
    from spon.evaluation.suite import run_suite
    from spon.evaluation.variants import parse_variants
    from spon.fuse import read_sidecar

    meta = read_sidecar(model_dir)
    t0 = time.perf_counter()
    doc = run_suite(model_dir, parse_variants(variants), tasks, work, limit, batch_size=batch_size,
                    jobs=jobs, resume=True, dtype=dtype)
    sizes = task_sizes(tasks)
    return {
        "model_dir": str(model_dir), "source_model": (meta.get("provenance") or {}).get("source_model"),
        "sparsity": meta.get("sparsity"), "protocol": meta.get("protocol"), "limit": limit, "dtype": dtype,
        "items": "the first N items of each task file (lm-eval --limit), the same for every variant",
        "task_sizes": sizes,
        "accuracy": {v: {t: {"n": r["n"], "metrics": r["metrics"], "realized_sparsity": r["realized_sparsity"]}
                         for t, r in e["tasks"].items()} for v, e in doc["variants"].items()},
        "paired": doc["paired"],
        # the headline metric of every item, so the intervals can be recomputed from this file alone
        "per_item": {v: {t: {"doc_id": r["items"]["doc_id"], "items_digest": r["items"]["items_digest"],
                             "correct": "".join(map(str, r["items"]["metrics"][doc["paired"]["tasks"][t]["metric"]]))}
                         for t, r in e["tasks"].items() if t in doc["paired"]["tasks"]}
                     for v, e in doc["variants"].items()},
        "speed": throughput(doc, sizes, plan_limit, jobs),
        "wall_s": round(time.perf_counter() - t0, 1), "suite_wall_s": doc["wall_s"], "resumed": doc["resumed"],
        "host": doc["host"], "suite_results": str(work / "results.json"),
    }


def paired_report(result: dict) -> str:
    """The paired table and the measured items per CPU-second of every (variant, task)."""
    from spon.evaluation import report

    speed = result["speed"]
    variants = list(speed["items_per_s"])
    lines = [report.paired_markdown(result["paired"]), "", "items per CPU-second (one single-threaded process):", "",
             "| task | plan items | " + " | ".join(variants) + " |", "| --- | --- |" + " --- |" * len(variants)]
    lines += [f"| {t} | {speed['plan_items'][t]} | "
              + " | ".join(f"{speed['items_per_s'][v].get(t, float('nan')):.2f}" for v in variants) + " |"
              for t in speed["plan_items"]]
    lines += ["", f"plan ({speed['plan_limit']} items a task, {len(variants)} variants): "
              f"{speed['plan_process_s'] / 60:.0f} min of single-process time, ~{speed['plan_wall_s_estimate'] / 60:.0f}"
              f" min wall with --jobs {speed['jobs']} ({os.cpu_count()} cpus here)"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", help="fused checkpoint directory (DIR/fused of `spon run`)")
    ap.add_argument("--limit", type=int, default=1000, help="items per task (the first N; whole set when smaller)")
    ap.add_argument("--tasks", default=",".join(ZEROSHOT))
    ap.add_argument("--variants", default="dense,teal,spon")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes, one per core")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                    help="weights and activations of every variant (bf16: ~3x faster with AMX)")
    ap.add_argument("--plan-limit", type=int, default=1000, help="items per task of the extrapolated full plan")
    ap.add_argument("--work", default=None, help="the suite's directory (default out/zeroshot/NAME_LIMIT)")
    ap.add_argument("--out", default=None, help="JSON (default benchmarks/results/zeroshot_NAME_LIMIT.json)")
    args = ap.parse_args()

    import torch

    from spon.fuse import read_sidecar

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("lm_eval", "httpx", "datasets", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(1)  # one single-threaded process per core is fastest for a model this small
    meta = read_sidecar(args.model_dir)
    name = f"{(meta.get('provenance') or {}).get('source_model') or Path(args.model_dir).parent.name}_s{meta.get('sparsity')}"
    tag = f"{name}_{meta.get('protocol')}_limit{args.limit}" + ("" if args.dtype == "fp32" else f"_{args.dtype}")
    work = Path(args.work or f"out/zeroshot/{tag}")
    out = Path(args.out or RESULTS / f"zeroshot_{tag}.json")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]

    result = paired_suite(args.model_dir, args.variants, tasks, args.limit, work, jobs=args.jobs,
                          batch_size=args.batch_size, dtype=args.dtype, plan_limit=args.plan_limit)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    print(f"\n{name}, protocol {meta.get('protocol')}, {args.dtype}, first {args.limit} items per task "
          f"(whole set when smaller), same items for every variant\n")
    print(paired_report(result))
    print(f"\nJSON: {out}\nsuite report: {work / 'report.md'}")


if __name__ == "__main__":
    main()
