"""Helpers for hardening tests that drive the real `spon` CLI in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline_helpers import REPO

# Small enough for seconds per stage, big enough to exercise every stage.
TINY = {"calibration": {"num_blocks": 8, "block_len": 32, "heldout_blocks": 2},
        "distill": {"steps": 2, "batch_size": 4, "checkpoint_every": 1}, "eval": {"window": 128, "stride": 128}}
# What a developer's shell or the test session may have set that would redirect a subprocess run.
REDIRECTS = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_LOCAL_STORAGE_PATH", "SPON_STORE", "PREFECT_TASKS_REFRESH_CACHE")


def cli_env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    for k in REDIRECTS:
        if k not in extra:
            env.pop(k, None)
    return env


def spon(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spon.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def error_lines(p: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in p.stderr.splitlines() if ln.startswith("spon: error:")]


def tree_state(root) -> dict[str, tuple[str, int, int]]:
    """(sha256, size, mtime_ns) of every file under root (or of root itself, a file): equal
    states before and after a command mean it changed nothing there."""
    import hashlib
    from pathlib import Path

    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
    return {str(f.relative_to(root) if f != root else f.name): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_size,
                                                                f.stat().st_mtime_ns) for f in files}
