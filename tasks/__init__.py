"""Prefect tasks, one per pipeline stage, each a thin typed wrapper over a `spon` function.

Stages hand each other JSON references to files in a work dir (tasks.types); the store, the
tracking helpers and the settings they share live beside them.
"""

from tasks.bench import benchmark_kernels
from tasks.calibrate import build_calibration
from tasks.distill import distill_spon
from tasks.evaluate import evaluate
from tasks.fetch import fetch_model
from tasks.fuse import fuse, fused_model
from tasks.publish import publish
from tasks.thresholds import compute_thresholds
from tasks.track import track_run

__all__ = ["fetch_model", "build_calibration", "compute_thresholds", "distill_spon", "fuse", "fused_model",
           "evaluate", "benchmark_kernels", "track_run", "publish"]
