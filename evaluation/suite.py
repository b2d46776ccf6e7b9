"""One evaluation call: every requested variant on every requested task, then the report."""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from pathlib import Path

import torch

from evaluation import report
from evaluation.fidelity import Fidelity
from evaluation.harness import evaluate_tasks, make_lm
from evaluation.registry import DEFAULT_TASKS, build_tasks
from evaluation.variants import ModelPool, Variant
from spon.errors import SponError

log = logging.getLogger(__name__)
FIDELITY_TEXT = Path(__file__).resolve().parent.parent.parent / "shared" / "assets" / "data" / "tinystories" / "sample.txt"


def _clean(metrics: dict) -> dict:
    """JSON-safe metrics: plain floats, non-finite values (e.g. an undefined stderr) as None."""
    return {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}


def run_suite(
    model_dir: str,
    variants: list[Variant],
    task_names: list[str] = DEFAULT_TASKS,
    out_dir: str | Path = "out/eval",
    limit: int | float | None = None,
    task_dirs: list[str] = (),
    batch_size: int = 64,
    device: str = "cpu",
    bootstrap_iters: int = 1000,
    group_size: int = 32,
    fidelity_text: str | Path | None = None,
) -> dict:
    t0 = time.perf_counter()
    if not (Path(model_dir) / "spon.json").is_file():
        raise SponError(f"{model_dir} is not a fused spon model directory (no spon.json); make one with `spon run`")
    tasks = build_tasks(list(task_names), task_dirs)
    from lm_eval.tasks import TaskManager

    # simple_evaluate builds a TaskManager per call when given none, indexing ~14k built-in YAMLs
    # (~30 s each time here). Build one: empty when every task is a registry Task object.
    builtin = any(isinstance(t, str) for t in tasks.values())
    task_manager = TaskManager(include_defaults=builtin)
    if builtin:
        unknown = [t for t in tasks.values() if isinstance(t, str) and t not in task_manager.all_tasks]
        if unknown:
            raise SponError(f"unknown task(s) {unknown}: not in the registry ({', '.join(DEFAULT_TASKS)}, ...) nor lm-eval")
    pool = ModelPool(model_dir, device, group_size)
    base, tok, meta = pool.get(None)
    fid_path = Path(fidelity_text or FIDELITY_TEXT)
    fidelity = Fidelity(base, tok, fid_path) if fid_path.is_file() else None

    doc: dict = {
        "model_dir": str(model_dir),
        "meta": {"sparsity": meta.get("sparsity"), "protocol": meta.get("protocol"), "targets": meta.get("targets")},
        "tasks": list(tasks),
        "limit": limit,
        "host": f"{platform.node()}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}, "
        f"load avg {', '.join(f'{x:.1f}' for x in os.getloadavg())} at start",
        "variants": {},
    }
    for v in variants:
        tv = time.perf_counter()
        model, tok, _ = pool.get(v.quant)
        lm = make_lm(model, tok, batch_size=batch_size)
        results = evaluate_tasks(lm, model, v.mode, tasks, limit, bootstrap_iters, task_manager)
        entry = {
            "mode": v.mode,
            "quant": v.quant,
            "quantization": pool.quant_info.get(v.quant) if v.quant else None,
            "tasks": {t: {**r, "metrics": _clean(r["metrics"])} for t, r in results.items()},
        }
        if fidelity is not None:
            entry["fidelity"] = fidelity.measure(model, v.mode)
            entry["fidelity"]["text"] = fid_path.name
        entry["wall_s"] = round(time.perf_counter() - tv, 1)
        sparsities = {t: round(r["realized_sparsity"], 4) for t, r in results.items()}
        log.info("variant %s done in %.0fs; realized sparsity per task %s", v.name, entry["wall_s"], sparsities)
        doc["variants"][v.name] = entry
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    doc["host"] += f", load avg {', '.join(f'{x:.1f}' for x in os.getloadavg())} at end"
    doc["outputs"] = {k: str(p) for k, p in report.write(doc, out_dir).items()}
    report.write(doc, out_dir)  # again, so results.json lists its own outputs
    return doc
