"""Issue #22, item 6: Ctrl-C (SIGINT) ends a command with one line saying what was kept and how to
resume, exit 130, no traceback; a corrupt alpha checkpoint is set aside (renamed, never deleted)
and the rerun resumes from the last good one instead of dying on it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import cli_env
from pipeline_helpers import REPO

pytestmark = pytest.mark.slow  # subprocesses calibrating and distilling stories260K

ENV = cli_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")


def spon(*argv):
    return [sys.executable, "-m", "spon.cli", "-q", *argv]


def test_ctrl_c_exits_130_in_one_line_and_a_corrupt_checkpoint_is_set_aside(tmp_path):
    cal = tmp_path / "cal"
    r = subprocess.run(spon("calibrate", "--calib-blocks", "16", "--calib-len", "32", "--out", str(cal)), env=ENV,
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "alpha"
    distill = spon("distill", "--calib", str(cal), "--out", str(out), "--steps", "400", "--checkpoint-every", "2",
                   "--batch-size", "4")
    # SIGINT as a terminal's Ctrl-C delivers it: a test run started in the background (`cmd &` in a
    # script) inherits SIGINT ignored, and a child whose SIGINT is ignored never sees it.
    p = subprocess.Popen(distill, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpts = out / "alpha_checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and len(list(ckpts.glob("alpha_step*.pt"))) < 2:
        time.sleep(0.1)
    assert p.poll() is None, "distillation ended before two checkpoints were seen"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and len([ln for ln in lines if ln.startswith("spon:")]) == 1, err[-2000:]
    assert f"what was written under {out} is kept" in lines[-1] and "run the same command again" in lines[-1], lines[-1]
    found = sorted(ckpts.glob("alpha_step*.pt"))
    assert len(found) >= 2 and not (out / "alpha.safetensors").exists()

    # the newest checkpoint cut short (a full disk): set aside, the rerun resumes from the one before
    newest, before = found[-1], found[-2]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    r = subprocess.run(distill, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"alpha checkpoint {newest} cannot be read" in r.stderr and "set aside as" in r.stderr, r.stderr[-2000:]
    assert (ckpts / (newest.name + ".corrupt")).is_file()
    record = json.loads((out / "distill.json").read_text())
    assert record["resumed_from"] == int(before.stem.removeprefix("alpha_step")), record["resumed_from"]
