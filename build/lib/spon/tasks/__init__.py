"""Prefect tasks, one per pipeline stage, each a thin typed wrapper over a `spon` function.

Stages hand each other JSON references to files in a work dir (spon.runtime.refs); the store,
MLflow tracking, settings, work dir and cache keys they share are libraries in spon.runtime.
"""

from spon.tasks.bench import benchmark_kernels
from spon.tasks.calibrate import build_calibration
from spon.tasks.distill import distill_spon
from spon.tasks.evaluate import evaluate
from spon.tasks.fetch import fetch_model
from spon.tasks.fuse import fuse, fused_model
from spon.tasks.publish import publish
from spon.tasks.thresholds import compute_thresholds
from spon.tasks.track import track_run

__all__ = ["fetch_model", "build_calibration", "compute_thresholds", "distill_spon", "fuse", "fused_model",
           "evaluate", "benchmark_kernels", "track_run", "publish"]
