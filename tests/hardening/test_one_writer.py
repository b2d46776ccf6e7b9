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
    print(f"second refused in {took:.1f} s (python + torch import included)")
    assert took < 60
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
