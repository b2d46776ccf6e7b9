"""Caching, persistence and retry options shared by the stage tasks, and the body they share.

A compute stage is cached on its one key (spon.runtime.cache.stage_key: stage name, code digest,
inputs), which also names its directory in the work dir. Results are persisted as JSON refs to
files, never pickles. Only I/O stages (fetch, publish, tracking) retry, with exponential
backoff: a retried computation would just fail the same way again.

A cache record is only a pointer to a stage directory; the directory can be deleted under it
(`rm -rf <out>/work`, or one stage's subdirectory) while the record survives wherever Prefect
keeps its results. `StageCache` therefore refuses a record whose directory is gone: the stage
runs again and, its directory being named by the same key, rewrites exactly the path the old
record points to, so that record is valid again from then on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.context import TaskRunContext
from prefect.logging import get_logger
from prefect.tasks import exponential_backoff

from spon.runtime.cache import stage_key
from spon.runtime.refs import StageRef
from spon.runtime.workdir import atomic_dir, stage_dir

RESULTS_SUBDIR = "prefect-results"  # cache records beside the stage outputs (flows.cli sets it)


def _stage_dir_missing(record_result: Any) -> str | None:
    """The directory a cached StageRef points to, if it no longer holds a finished stage."""
    if isinstance(record_result, StageRef):
        d = Path(record_result.dir)
        if not d.is_dir() or not any(d.iterdir()):
            return record_result.dir
    return None


@dataclass
class StageCache(CachePolicy):
    """The stage key as Prefect's cache key, valid only while the cached stage dir exists."""

    stage: str = ""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        key = stage_key(self.stage, inputs)
        store = task_ctx.result_store if task_ctx else None
        if store is None or not store.exists(key):
            return key
        try:
            missing = _stage_dir_missing(store.read(key).result)
        except Exception as e:  # an unreadable record is no cache hit either
            missing = f"unreadable cache record ({type(e).__name__})"
        if missing is None:
            return key
        # No key: this run recomputes without consulting (or overwriting) the stale record; the
        # recomputed stage dir lands where that record points, which makes it valid again.
        get_logger("spon.cache").warning("cached result of %s points to %s, which is gone: recomputing",
                                         self.stage, missing)
        return None


def stage(name: str) -> dict:
    """@task options of a compute stage."""
    return dict(name=name, cache_policy=StageCache(stage=name), persist_result=True, result_serializer="json")


def run_stage(name: str, inputs: dict, body: Callable[[Path, str], None]) -> StageRef:
    """Run body(tmp_dir, key) into the stage's directory (renamed into place only when complete)."""
    t0 = time.perf_counter()
    key = stage_key(name, inputs)
    final = stage_dir(inputs["work_dir"], name, key)
    with atomic_dir(final) as tmp:
        body(tmp, key)
    return StageRef(stage=name, key=key, dir=str(final), wall_s=round(time.perf_counter() - t0, 3))


UNCACHED = dict(cache_policy=NO_CACHE, persist_result=False)
IO_RETRIES = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5)
