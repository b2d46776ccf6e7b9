"""Issue #22, item 1: one writer per output directory. Two commands on one --out no longer mix
their results: the second is refused in one line naming the first (pid and command), and the
first's results stay its own; a lock left by a killed command is taken over, with a message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import TINY, cli_env, error_lines
from pipeline_helpers import REPO
from spon.errors import SponError
from spon.format import SIDECAR, SUMMARY_FILE
from spon.lock import lock_path, writer_lock

ENV = cli_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
SLACK = float(os.environ.get("SPON_TEST_TIME_SLACK", "2"))  # wall-time bounds on a loaded machine
HOLD = ("import sys, time; from spon.lock import writer_lock\n"
        "with writer_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n")


def _holder(out: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "o" / "x"
    holder = _holder(out)
    try:
        with pytest.raises(SponError, match=rf"--out {out} is being written by another spon command: pid {holder.pid} "):
            with writer_lock(out):
                pass
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, naming a dead pid
        holder.wait()
    assert lock_path(out).is_file()
    with writer_lock(out):
        assert f"left by pid {holder.pid}" in capsys.readouterr().err
    assert not lock_path(out).exists()  # released: nothing left beside the out dir


def test_the_lock_is_reentrant_in_one_process(tmp_path):
    with writer_lock(tmp_path / "x"), writer_lock(tmp_path / "x"):
        pass
    assert not lock_path(tmp_path / "x").exists()


@pytest.mark.slow  # two real `spon run --in-process` on stories260K
def test_two_runs_on_one_out_do_not_mix(tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({**TINY, "distill": {**TINY["distill"], "steps": 40}}))
    out = tmp_path / "o" / "x"
    argv = [sys.executable, "-m", "spon.cli", "-q", "run", "--in-process", "--config", str(cfg), "--out", str(out)]
    first = subprocess.Popen(argv + ["--sparsity", "0.3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=ENV, cwd=REPO)
    deadline = time.time() + 240
    while not lock_path(out).exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert lock_path(out).exists(), first.communicate()
    # Paused (SIGSTOP), the first run is mid-chain for as long as the second takes to start on a
    # loaded machine; it holds its lock all the while, and resumes afterwards.
    os.kill(first.pid, signal.SIGSTOP)
    try:
        t0 = time.time()
        second = subprocess.run(argv + ["--sparsity", "0.6", "--steps", "2"], capture_output=True, text=True, env=ENV,
                                cwd=REPO, timeout=240)
        took = time.time() - t0
    finally:
        os.kill(first.pid, signal.SIGCONT)
    errors = error_lines(second)
    assert second.returncode == 2 and len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert f"is being written by another spon command: pid {first.pid}" in errors[0], errors[0]
    assert "--sparsity 0.3" in errors[0], errors[0]  # the holder's command line
    # The lock is taken before torch, transformers and Prefect are imported (about 0.3 s on an idle
    # box); the bound is 5 s, with slack here for a loaded 2-core machine.
    print(f"second refused in {took:.2f} s (python start and imports included)")
    assert took < 5 * SLACK, took
    stdout, stderr = first.communicate(timeout=900)
    assert first.returncode == 0, stderr[-2000:]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    sidecar = json.loads((out / "fused" / SIDECAR).read_text())
    assert summary["sparsity"] == 0.3 and sidecar["sparsity"] == 0.3  # the first's results, not mixed
    assert not lock_path(out).exists()


def test_pipeline_commands_lock_their_out_and_work_dirs(tmp_path):
    from types import SimpleNamespace

    from spon.flows.cli import writers
    from spon.runtime.settings import PipelineSettings

    cfg = SimpleNamespace(out=str(tmp_path / "o"))
    settings = PipelineSettings(work_dir=str(tmp_path / "w"))
    with writers(cfg, settings):
        for d in ("o", "w"):
            assert json.loads(lock_path(tmp_path / d).read_text())["pid"] == os.getpid()
        holder = subprocess.run([sys.executable, "-c", "import sys; from spon.lock import writer_lock\n"
                                 "with writer_lock(sys.argv[1], '--work-dir'): pass", str(tmp_path / "w")],
                                capture_output=True, text=True, env=ENV, cwd=REPO)
        assert holder.returncode != 0 and f"--work-dir {tmp_path / 'w'} is being written by another spon command: " \
            f"pid {os.getpid()}" in holder.stderr, holder.stderr[-1000:]
    assert not lock_path(tmp_path / "o").exists() and not lock_path(tmp_path / "w").exists()


def _timed_refusal(argv: list[str], out: Path) -> float:
    """Wall time of a real `spon` command refused by the lock a live holder keeps on `out`."""
    holder = _holder(out)
    try:
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "spon.cli", "-q", *argv], capture_output=True, text=True, env=ENV,
                           cwd=REPO, timeout=240)
        took = time.time() - t0
    finally:
        holder.kill()
        holder.wait()
    errors = error_lines(r)
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
    assert f"--out {out} is being written by another spon command: pid {holder.pid}" in errors[0], errors[0]
    assert not out.exists()  # the holder's lock sits beside it; nothing of the refused command's
    return took


@pytest.mark.parametrize("mode", ["--in-process", "pipeline"])
def test_a_second_spon_run_is_refused_before_its_heavy_imports(tmp_path, mode):
    """`spon run` takes its --out lock before its input checks import torch and transformers (and
    the pipeline before Prefect and MLflow): the refusal takes python's start and little else."""
    out = tmp_path / "o" / "x"
    extra = ["--in-process"] if mode == "--in-process" else ["--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                                                            "--store", str(tmp_path / "store")]
    took = _timed_refusal(["run", *extra, "--out", str(out)], out)
    print(f"spon run {mode} refused in {took:.2f} s")
    assert took < 5 * SLACK, took
    assert not (tmp_path / "store").exists() and not (tmp_path / "m.db").exists()


def test_spon_eval_takes_the_out_lock(tmp_path, fused_dir):
    """`spon eval --out` is a writer like the others: refused while another command holds its --out."""
    out = tmp_path / "eval"
    _timed_refusal(["eval", str(fused_dir), "--variants", "dense", "--tasks", "copa", "--limit", "2", "--out", str(out)], out)
