"""Caching, persistence and retry options shared by the stage tasks.

Compute stages are cached on (task source, every input but the progress flag): the inputs carry
the model's revision/content hash, upstream stage keys, the stage's own config and the content
hash of any text file read, and the work dir (cached refs point into it). Results are persisted
as JSON refs to files, never pickles. Only I/O stages (fetch, publish, tracking) retry, with
exponential backoff: a retried computation would just fail the same way again.

A cache record is only a pointer to a stage directory; the directory can be deleted under it
(`rm -rf <out>/work`, or one stage's subdirectory) while the record survives wherever Prefect
keeps its results. `StageCache` therefore refuses a record whose directory is gone: the stage
runs again and, its directory being named by the same stage key, rewrites exactly the path the
old record points to, so that record is valid again from then on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.logging import get_logger
from prefect.tasks import exponential_backoff

from tasks.types import StageRef

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
    """TASK_SOURCE + INPUTS (minus `progress`), valid only while the cached stage dir exists."""

    policy: CachePolicy = field(default_factory=lambda: (TASK_SOURCE + INPUTS) - "progress")

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        key = self.policy.compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        store = task_ctx.result_store if task_ctx else None
        if key is None or store is None or not store.exists(key):
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
                                         task_ctx.task.name, missing)
        return None


STAGE = dict(cache_policy=StageCache(), persist_result=True, result_serializer="json")
UNCACHED = dict(cache_policy=NO_CACHE, persist_result=False)
IO_RETRIES = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5)
