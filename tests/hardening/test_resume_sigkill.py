"""SIGKILL a real `spon run` once distillation checkpoints exist, rerun the same command: the
finished stages come from the cache, distillation resumes from the last alpha checkpoint, one
registry version and one stored copy exist, and alpha equals an uninterrupted run's (same seed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cli_helpers import cli_env

import pytest

pytestmark = pytest.mark.slow  # services / subprocesses: not in the fast tier

ARGS = ["--steps", "40", "--checkpoint-every", "10", "--calib-blocks", "48", "--calib-len", "64", "--batch-size", "8",
        "--window", "128", "--stride", "128"]


def command(root: Path, sample_txt: Path) -> list[str]:
    return [sys.executable, "-m", "spon.cli", "-q", "run", *ARGS, "--eval-text", str(sample_txt), "--out", str(root / "out"),
            "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--store", str(root / "store")]


def start(root: Path, sample_txt: Path) -> subprocess.Popen:
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / f"log-{time.time_ns()}.txt", "w")
    return subprocess.Popen(command(root, sample_txt), env=cli_env(), cwd=root, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def alpha(root: Path):
    from safetensors.torch import load_file

    (d,) = (root / "out" / "work" / "distill").iterdir()
    return load_file(str(d / "alpha.safetensors")), json.loads((d / "distill.json").read_text())


def test_sigkill_during_distillation_then_resume(tmp_path, sample_txt):
    import torch
    from mlflow import MlflowClient

    killed, clean = tmp_path / "killed", tmp_path / "clean"
    ref = start(clean, sample_txt)  # the uninterrupted run, concurrently
    proc = start(killed, sample_txt)
    ckpts = killed / "out" / "work" / "checkpoints"
    deadline = time.time() + 480
    while time.time() < deadline and proc.poll() is None and not list(ckpts.glob("*/alpha_step*.pt")):
        time.sleep(0.2)
    assert proc.poll() is None, "run finished before a checkpoint was seen"
    assert list(ckpts.glob("*/alpha_step*.pt")), "no checkpoint in time"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    steps_at_kill = sorted(p.name for p in ckpts.glob("*/alpha_step*.pt"))
    assert not (killed / "out" / "summary.json").exists()
    work = killed / "out" / "work"
    finished = {st: [(f, f.stat().st_ino, f.stat().st_mtime_ns) for f in sorted((work / st).rglob("*.*"))]
                for st in ("calibrate", "thresholds") if (work / st).is_dir()}
    assert finished, sorted(p.name for p in work.iterdir())

    r = subprocess.run(command(killed, sample_txt), env=cli_env(), cwd=killed, capture_output=True, text=True, timeout=600)
    logs = r.stdout + r.stderr
    assert r.returncode == 0, logs[-3000:]
    assert ref.wait(600) == 0, "uninterrupted run failed"
    for st, files in finished.items():  # served from cache: the stage's files were not rewritten
        assert files and all(f.stat().st_ino == ino and f.stat().st_mtime_ns == mt for f, ino, mt in files), st

    a, info = alpha(killed)
    b, info_ref = alpha(clean)
    assert info["resumed_from"] > 0, (info, steps_at_kill)
    assert info_ref["resumed_from"] == 0
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k

    summary = json.loads((killed / "out" / "summary.json").read_text())
    c = MlflowClient(f"sqlite:///{killed / 'mlflow.db'}", f"sqlite:///{killed / 'mlflow.db'}")
    assert [str(v.version) for v in c.search_model_versions(f"name='{summary['registered_model']}'")] == ["1"]
    assert len(list((killed / "store").rglob("manifest.json"))) == 1
