"""One chain: `spon run --in-process`, the stage commands chained by hand and the Prefect flow
are adapters over spon.stages, so they produce the same thresholds, alpha and perplexities."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spon.cli import main
from spon.format import SIDECAR

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--sparsity", "0.5", "--steps", "12", "--calib-blocks", "32", "--calib-len", "48", "--batch-size", "8",
         "--checkpoint-every", "4"]


@pytest.fixture(scope="module")
def chains(tmp_path_factory, stories_path, sample_txt):
    root = tmp_path_factory.mktemp("chains")
    common = ["--model", str(stories_path), *SMALL]
    assert main(["-q", "run", "--in-process", *common, "--out", str(root / "run"), "--eval-text", str(sample_txt)]) == 0
    assert main(["-q", "calibrate", *common, "--out", str(root / "cal")]) == 0
    assert main(["-q", "distill", *common, "--calib", str(root / "cal"), "--out", str(root / "alpha")]) == 0
    assert main(["-q", "fuse", *common, "--calib", str(root / "cal"), "--alpha", str(root / "alpha" / "alpha.safetensors"),
                 "--out", str(root / "fused")]) == 0
    return root


@pytest.mark.slow
def test_stage_commands_equal_run(chains, sample_txt, capsys):
    run, root = chains / "run", chains
    assert json.loads((run / "thresholds" / "thresholds.json").read_text())["thresholds"] == \
        json.loads((root / "cal" / "thresholds.json").read_text())["thresholds"]
    a, b = load_file(str(run / "distill" / "alpha.safetensors")), load_file(str(root / "alpha" / "alpha.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    side_run = json.loads((run / "fused" / SIDECAR).read_text())
    side_cli = json.loads((root / "fused" / SIDECAR).read_text())
    assert side_run == side_cli  # the same sidecar: thresholds, selection, provenance, realized sparsity, smoke text
    capsys.readouterr()
    assert main(["ppl", str(root / "fused"), "--eval-text", str(sample_txt)]) == 0
    ppl_cli = json.loads(capsys.readouterr().out)["perplexity"][str(sample_txt)]
    summary = json.loads((run / "summary.json").read_text())
    assert {m: ppl_cli[m]["perplexity"] for m in ("dense", "teal", "spon")} == summary["perplexity"]


@pytest.mark.slow
def test_calibration_split_is_made_once(chains):
    """Thresholds use the training blocks only; the held-out blocks judge alpha (every entry point)."""
    t = load_file(str(chains / "cal" / "calibration.safetensors"))
    # the default 32 held-out blocks of 32: capped at half, so at least half of the blocks train
    assert t["train"].shape == (16, 48) and t["heldout"].shape == (16, 48)
