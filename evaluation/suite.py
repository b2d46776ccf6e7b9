"""One evaluation call: every requested variant on every requested task, then the report."""

from __future__ import annotations

import json
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


def _checkpoint(out_dir, variant: Variant) -> Path:
    return Path(out_dir) / "variants" / f"{variant.name}.json"


def evaluate_variant(model_dir: str, variant: Variant, task_names: list[str], task_dirs: list[str], limit,
                     batch_size: int, device: str, bootstrap_iters: int, group_size: int, fid_path: Path,
                     out_dir: str | Path, threads: int | None = None) -> dict:
    """Everything for one variant, self-contained so it can run in a worker process. The entry is
    also written to OUT/variants/NAME.json as soon as it is done, so a long suite that is stopped
    keeps its finished variants (`--resume` reuses them)."""
    from lm_eval.tasks import TaskManager

    if threads:
        torch.set_num_threads(threads)
    tv = time.perf_counter()
    tasks = build_tasks(list(task_names), task_dirs)
    # simple_evaluate builds a TaskManager per call when given none, indexing ~14k built-in YAMLs
    # (~30 s each time here). Build one: empty when every task is a registry Task object.
    task_manager = TaskManager(include_defaults=any(isinstance(t, str) for t in tasks.values()))
    pool = ModelPool(model_dir, device, group_size)
    model, tok, _ = pool.get(variant.quant)
    lm = make_lm(model, tok, batch_size=batch_size)
    results = evaluate_tasks(lm, model, variant.mode, tasks, limit, bootstrap_iters, task_manager)
    entry = {
        "mode": variant.mode,
        "quant": variant.quant,
        "quantization": pool.quant_info.get(variant.quant) if variant.quant else None,
        "tasks": {t: {**r, "metrics": _clean(r["metrics"])} for t, r in results.items()},
    }
    if fid_path.is_file():
        # The reference is always the fp32 dense model, also for quantized variants.
        ref = model if not variant.quant else pool.get(None)[0]
        entry["fidelity"] = {**Fidelity(ref, tok, fid_path).measure(model, variant.mode), "text": fid_path.name}
    entry["wall_s"] = round(time.perf_counter() - tv, 1)
    sparsities = {t: round(r["realized_sparsity"], 4) for t, r in results.items()}
    log.info("variant %s done in %.0fs; realized sparsity per task %s", variant.name, entry["wall_s"], sparsities)
    path = _checkpoint(out_dir, variant)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = {"model_dir": str(model_dir), "tasks": list(task_names), "limit": limit}
    path.write_text(json.dumps({"key": key, "entry": entry}, indent=2, default=float))
    return entry


def _resumed(out_dir, variant: Variant, key: dict) -> dict | None:
    path = _checkpoint(out_dir, variant)
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("key") != key:
        log.info("not resuming %s: %s was made with %s", variant.name, path, saved.get("key"))
        return None
    log.info("resuming %s from %s", variant.name, path)
    return saved["entry"]


def _init_worker():
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s[%(process)d]: %(message)s")
    for name in ("lm_eval", "httpx", "datasets", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)


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
    jobs: int = 1,
    resume: bool = False,
) -> dict:
    """Evaluate every variant (in `jobs` worker processes when > 1: variants are independent, and
    one single-threaded process per core beats intra-op threads for a model this small)."""
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    if not (Path(model_dir) / "spon.json").is_file():
        raise SponError(f"{model_dir} is not a fused spon model directory (no spon.json); make one with `spon run`")
    tasks = build_tasks(list(task_names), task_dirs)  # validate names and data up front, in this process
    builtin = [t for t in tasks.values() if isinstance(t, str)]
    if builtin:
        from lm_eval.tasks import TaskManager

        unknown = [t for t in builtin if t not in TaskManager().all_tasks]
        if unknown:
            raise SponError(f"unknown task(s) {unknown}: not in the registry ({', '.join(DEFAULT_TASKS)}, ...) nor lm-eval")
    from spon.fuse import read_sidecar

    meta = read_sidecar(model_dir)
    fid_path = Path(fidelity_text or FIDELITY_TEXT)
    key = {"model_dir": str(model_dir), "tasks": list(task_names), "limit": limit}
    done = {v.name: e for v in variants if resume and (e := _resumed(out_dir, v, key)) is not None}
    todo = [v for v in variants if v.name not in done]
    args = [(str(model_dir), v, list(task_names), list(task_dirs), limit, batch_size, device, bootstrap_iters,
             group_size, fid_path, out_dir) for v in todo]
    if jobs > 1 and len(todo) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=mp.get_context("spawn"), initializer=_init_worker) as ex:
            futures = [ex.submit(evaluate_variant, *a, threads=torch.get_num_threads()) for a in args]
            done.update({v.name: f.result() for v, f in zip(todo, futures)})
    else:
        done.update({v.name: evaluate_variant(*a) for v, a in zip(todo, args)})

    doc: dict = {
        "model_dir": str(model_dir),
        "meta": {"sparsity": meta.get("sparsity"), "protocol": meta.get("protocol"), "targets": meta.get("targets")},
        "tasks": list(tasks),
        "limit": limit,
        "variants": {v.name: done[v.name] for v in variants},
        "resumed": [v.name for v in variants if v not in todo],
        "wall_s": round(time.perf_counter() - t0, 1),
        "host": f"{platform.node()}, {os.cpu_count()} cpus, {jobs} job(s) x {torch.get_num_threads()} torch thread(s), "
        f"load avg (1/5/15 min) {', '.join(f'{x:.1f}' for x in load_start)} at start, "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at end",
    }
    doc["outputs"] = {k: str(p) for k, p in report.write(doc, out_dir).items()}
    report.write(doc, out_dir)  # again, so results.json lists its own outputs
    return doc
