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

from spon.evaluation import paired, report
from spon.evaluation.fidelity import Fidelity
from spon.evaluation.harness import evaluate_tasks, make_lm
from spon.evaluation.registry import DEFAULT_TASKS, build_tasks, discover
from spon.evaluation.variants import ModelPool, Variant
from spon.assets import assets_root
from spon.errors import SponError
from spon.format import SIDECAR, is_spon_checkpoint

log = logging.getLogger(__name__)
FIDELITY_TEXT = assets_root() / "data" / "tinystories" / "sample.txt"


def _clean(metrics: dict) -> dict:
    """JSON-safe metrics: plain floats, non-finite values (e.g. an undefined stderr) as None."""
    return {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}


# Work is split into units, one (variant, task) pair or one variant's fidelity measurement, so
# that --jobs workers stay busy to the end (with whole variants as units, 5 variants on 2 workers
# leave one core idle for the last one) and a stopped suite loses at most the units in flight.
FIDELITY = "_fidelity"
_POOLS: dict[tuple, ModelPool] = {}  # per process: each worker loads/quantizes a scheme once
_TASK_MANAGERS: dict[bool, object] = {}


def _checkpoint(out_dir, variant: Variant, unit: str) -> Path:
    return Path(out_dir) / "variants" / variant.name / f"{unit}.json"


def _pool(model_dir: str, device: str, group_size: int, dtype: str) -> ModelPool:
    key = (str(model_dir), device, group_size, dtype)
    if key not in _POOLS:
        _POOLS[key] = ModelPool(model_dir, device, group_size, dtype)
    return _POOLS[key]


def _task_manager(builtin: bool):
    from lm_eval.tasks import TaskManager

    # simple_evaluate builds a TaskManager per call when given none, indexing ~14k built-in YAMLs
    # (~30 s each time here). Build one per process: empty when every task is a registry Task.
    if builtin not in _TASK_MANAGERS:
        _TASK_MANAGERS[builtin] = TaskManager(include_defaults=builtin)
    return _TASK_MANAGERS[builtin]


def evaluate_unit(model_dir: str, variant: Variant, unit: str, task_dirs: list[str], limit, batch_size: int,
                  device: str, bootstrap_iters: int, group_size: int, fid_path: Path, out_dir: str | Path,
                  key: str, threads: int | None = None, dtype: str = "fp32") -> dict:
    """One task (or the fidelity measurement) for one variant, self-contained so it can run in a
    worker process. The result is also written to OUT/variants/VARIANT/UNIT.json as soon as it
    is done (`--resume` reuses it)."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    pool = _pool(model_dir, device, group_size, dtype)
    model, tok, _ = pool.get(variant.quant)
    if unit == FIDELITY:
        # The reference is the dense model in the suite's dtype, also for quantized variants.
        ref = model if not variant.quant else pool.get(None)[0]
        result = {**Fidelity(ref, tok, fid_path).measure(model, variant.mode), "text": fid_path.name}
    else:
        tasks = build_tasks([unit], task_dirs)
        lm = make_lm(model, tok, batch_size=batch_size)
        result = {t: {**r, "metrics": _clean(r["metrics"])} for t, r in evaluate_tasks(
            lm, model, variant.mode, tasks, limit, bootstrap_iters,
            _task_manager(any(isinstance(t, str) for t in tasks.values()))).items()}
    done = {"result": result, "quantization": pool.quant_info.get(variant.quant) if variant.quant else None,
            "wall_s": round(time.perf_counter() - t0, 2)}
    log.info("%s / %s done in %.0fs", variant.name, unit, done["wall_s"])
    path = _checkpoint(out_dir, variant, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, **done}, indent=2, default=float))
    tmp.replace(path)
    return done


def _data_digest(task) -> str | None:
    """What a task reads, by content (its data files and its config); the name of a built-in."""
    from spon.digest import sha256_file

    if isinstance(task, str):
        return task
    config = getattr(task, "config", None)
    return json.dumps({"data": [sha256_file(p) for p in _data_files(task)],
                       "config": str(config.to_dict() if hasattr(config, "to_dict") else config)}, sort_keys=True)


def _resumed(out_dir, variant: Variant, unit: str, key: str) -> dict | None:
    path = _checkpoint(out_dir, variant, unit)
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("key") != key:
        log.info("not resuming %s/%s: %s was made with %s", variant.name, unit, path, saved.get("key"))
        return None
    log.info("resuming %s/%s from %s", variant.name, unit, path)
    return saved


def _init_worker():
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s[%(process)d]: %(message)s")
    for name in ("lm_eval", "httpx", "datasets", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _data_files(task) -> list[Path]:
    """A built task's local data files (none for lm-eval built-ins, given by name)."""
    files = (getattr(getattr(task, "config", None), "dataset_kwargs", None) or {}).get("data_files") or {}
    paths = [p for f in (files.values() if isinstance(files, dict) else [files]) for p in ([f] if isinstance(f, str) else f)]
    return [Path(p) for p in paths if Path(p).is_file()]


def _data_bytes(task) -> int:
    """Size of a built task's data files: the proxy for its cost used to start the big units first."""
    return sum(p.stat().st_size for p in _data_files(task))


def _variant_entry(variant: Variant, units: dict[str, dict]) -> dict:
    entry = {"mode": variant.mode, "quant": variant.quant, "quantization": None, "tasks": {}}
    for unit, done in units.items():
        entry["quantization"] = entry["quantization"] or done.get("quantization")
        if unit == FIDELITY:
            entry["fidelity"] = done["result"]
        else:
            entry["tasks"].update(done["result"])
    entry["wall_s"] = round(sum(d["wall_s"] for d in units.values()), 1)  # summed over units (CPU-ish time)
    sparsities = {t: round(r["realized_sparsity"], 4) for t, r in entry["tasks"].items()}
    log.info("variant %s: %.0fs of unit time; realized sparsity per task %s", variant.name, entry["wall_s"], sparsities)
    return entry


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
    dtype: str = "fp32",
) -> dict:
    """Evaluate every variant on every task, unit by unit (in `jobs` worker processes when > 1:
    units are independent, and one single-threaded process per core beats intra-op threads for
    a model this small). `dtype` bf16 is ~3x faster on a CPU with AMX (a 262,144-entry LM head
    dominates the scoring of a Gemma-3 continuation) and scores every variant in the same dtype."""
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    from spon.checks import check_dtype

    check_dtype(dtype, "--dtype")
    if not is_spon_checkpoint(model_dir):
        raise SponError(f"{model_dir} is not a fused spon model directory (no {SIDECAR}); make one with `spon run`")
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
    units = [(v, u) for v in variants for u in [*task_names, *([FIDELITY] if fid_path.is_file() else [])]]
    # A unit's checkpoint is reused only for the same model content and every option that changes
    # its numbers: re-fusing into the same directory, another group size or task data recomputes.
    from spon.digest import content_key, digest_dir, digest_path

    # per_item: checkpoints made before units logged per-item scores lack them (no paired table).
    common = {"model_digest": digest_dir(model_dir), "limit": limit, "per_item": 1, "batch_size": batch_size, "device": device,
              **({"dtype": dtype} if dtype != "fp32" else {}),  # fp32 units made before the option still resume
              "bootstrap_iters": bootstrap_iters, "group_size": group_size,
              "task_dirs": [digest_path(d) for d in task_dirs if Path(d).exists()],
              "tasks_data": {u: _data_digest(t) for u, t in tasks.items()},
              "fidelity_text": digest_path(fid_path) if fid_path.is_file() else None}
    keys = {(v.name, u): content_key({**common, "variant": v.name, "unit": u}) for v, u in units}
    done = {(v.name, u): d for v, u in units if resume and (d := _resumed(out_dir, v, u, keys[v.name, u])) is not None}
    # Biggest tasks first (data size as the proxy), so the last units to finish are short ones.
    size = {u: _data_bytes(t) for u, t in tasks.items()}
    todo = sorted((vu for vu in units if (vu[0].name, vu[1]) not in done), key=lambda vu: -size.get(vu[1], 0))
    args = [(str(model_dir), v, u, list(task_dirs), limit, batch_size, device, bootstrap_iters, group_size, fid_path,
             out_dir, keys[v.name, u]) for v, u in todo]
    kwargs = {"dtype": dtype}
    if jobs > 1 and len(todo) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=mp.get_context("spawn"), initializer=_init_worker) as ex:
            futures = [ex.submit(evaluate_unit, *a, threads=torch.get_num_threads(), **kwargs) for a in args]
            done.update({(v.name, u): f.result() for (v, u), f in zip(todo, futures)})
    else:
        try:
            done.update({(v.name, u): evaluate_unit(*a, **kwargs) for (v, u), a in zip(todo, args)})
        finally:
            _POOLS.clear()  # models are per call: the same path may hold another model next time
    entries = {v.name: _variant_entry(v, {u: done[v.name, u] for w, u in units if w == v}) for v in variants}

    doc: dict = {
        "model_dir": str(model_dir),
        "meta": {"sparsity": meta.get("sparsity"), "protocol": meta.get("protocol"), "targets": meta.get("targets")},
        "tasks": list(tasks),
        "limit": limit,
        "dtype": dtype,
        "variants": entries,
        "resumed": [f"{v.name}/{u}" for v, u in units if (v, u) not in todo],
        # SPON - TEAL, TEAL - dense (and quantized vs fp32) item by item, with bootstrap intervals.
        "paired": paired.compare(entries, {t: s.headline_metric for t, s in discover(task_dirs).items()
                                           if s.headline_metric}),
        "wall_s": round(time.perf_counter() - t0, 1),
        "host": f"{platform.node()}, {os.cpu_count()} cpus, {jobs} job(s) x {torch.get_num_threads()} torch thread(s), "
        f"load avg (1/5/15 min) {', '.join(f'{x:.1f}' for x in load_start)} at start, "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at end",
    }
    doc["outputs"] = {k: str(p) for k, p in report.write(doc, out_dir).items()}
    report.write(doc, out_dir)  # again, so results.json lists its own outputs
    return doc
