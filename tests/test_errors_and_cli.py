"""Bad input fails with one clear line and exit 2; `spon run` end to end on the real model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from spon.calibration import blocks_from_stream, sample_blocks, text_blocks
from spon.config import DistillConfig, SparsityConfig, load_config
from spon.distill import distill
from spon.errors import SponError
from spon.sources import load_model
from spon.sparse import by_name, wrap_projections
from spon.thresholds import check_sparsity, compute_thresholds


def spon_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "spon.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_sparsity_outside_unit_interval(s):
    with pytest.raises(SponError, match=r"sparsity must be in \[0, 1\)"):
        check_sparsity(s)
    with pytest.raises(SponError, match="sparsity.sparsity"):
        load_config(overrides={"sparsity.sparsity": s})


def test_config_is_strict(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"sparsity": {"sparsity": 0.5, "sparsty_typo": 1}}))
    with pytest.raises(SponError, match="sparsity.sparsty_typo: Extra inputs are not permitted"):
        load_config(p)
    with pytest.raises(SponError, match="distill.steps"):
        load_config(overrides={"distill.steps": "many"})


def test_empty_calibration_data(stories_path, tmp_path):
    _, tok = load_model(str(stories_path))
    empty = tmp_path / "empty.txt"
    empty.write_text("   ")
    with pytest.raises(SponError, match="calibration data is empty or too short"):
        text_blocks(tok, [str(empty)], block_len=64)
    with pytest.raises(SponError, match="calibration data is empty"):
        blocks_from_stream(torch.tensor([1, 2, 3]), 64, None, "x")


def test_nan_loss_stops_distillation(stories_path):
    model, tok = load_model(str(stories_path))
    wrap_projections(model)
    blocks = sample_blocks(model, tok, num_blocks=8, block_len=32, seed=0)
    compute_thresholds(model, blocks, SparsityConfig(sparsity=0.5))
    with torch.no_grad():
        next(iter(by_name(model).values())).linear.weight[0, 0] = float("nan")
    with pytest.raises(SponError, match="distillation diverged: KL is nan at step 0"):
        distill(model, blocks[:6], blocks[6:], DistillConfig(steps=3, init="zeros"), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--sparsity", "1.2"], "sparsity.sparsity"),
        (["run", "--model", "./no/such/model"], "model path does not exist"),
        (["run", "--eval-text", "no_such.txt"], "text file does not exist: no_such.txt"),
        (["run", "--allocation", "random"], "sparsity.allocation"),
        (["run", "--criterion", "wanda"], "sparsity.criterion"),
        (["run", "--targets", "q,nope"], "sparsity.targets"),
    ],
)
def test_cli_bad_input_one_line_exit_2(args, message, tmp_path):
    r = spon_cli("-q", *args, "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("spon: error:") and message in last
    assert not (tmp_path / "o" / "summary.json").exists()


@pytest.mark.slow
def test_spon_run_end_to_end(stories_path, sample_txt, tmp_path):
    out = tmp_path / "run"
    r = spon_cli(
        # 60 %: there these 40 steps beat TEAL by far more than fp32 rounding moves between CPU kinds
        # (18.9 vs 24.2 on an Intel Xeon); at 50 % they land within it (7.46 vs 7.43 on the Xeon, the
        # other way round on an AMD EPYC), and the last assertion below flipped with the machine.
        "-q", "run", "--model", str(stories_path), "--sparsity", "0.6", "--out", str(out),
        "--eval-text", str(sample_txt), "--steps", "40", "--calib-blocks", "64", "--calib-len", "64", "--batch-size", "8",
        # keep the pipeline's embedded MLflow store and model store out of the repo's out/
        "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--store", str(tmp_path / "store"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    for key in ("model", "sparsity", "protocol", "realized_sparsity", "perplexity", "fused_model_dir"):
        assert key in s
    assert s["protocol"] == "all"
    assert abs(s["realized_sparsity"] - 0.6) <= 0.02
    ppl = s["perplexity"]
    assert ppl["dense"] == pytest.approx(3.548, abs=0.005)
    # What the product guarantees: alpha is selected on the held-out calibration blocks, so SPON's
    # held-out KL is never above TEAL's (alpha = 0 when no checkpoint beats TEAL) ...
    assert s["heldout_kl"]["spon"] <= s["heldout_kl"]["teal"]
    assert s["alpha_selection"]["selected_step"] in (None, *map(int, s["heldout_kl_by_step"]))
    # ... and a SPON worse than TEAL on the evaluation text is said and never made champion.
    worse = ppl["spon"] > ppl["teal"]
    assert bool(s["quality_warnings"]) == worse
    assert s["champion"] == (not worse)
    # On this small run at 60 % the selected alpha beats TEAL by a margin no CPU kind erases.
    assert ppl["dense"] < ppl["spon"] <= ppl["teal"]
    assert (out / "fused" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("blocked, argv, extra", [
    ("prefect", ["run", "--out", "{T}/o"], "pipeline"),
    ("mlflow", ["pull", "models:/x@candidate", "--out", "{T}/o"], "pipeline"),
    ("lm_eval", ["eval", "{STORIES}", "--variants", "dense", "--out", "{T}/o"], "eval"),
])
def test_missing_optional_dependency_names_the_extra(blocked, argv, extra, tmp_path, stories_path):
    """No silent fallback: `spon run` without Prefect is an error naming the extra, not an
    in-process run without MLflow and store."""
    argv = [a.replace("{T}", str(tmp_path)).replace("{STORIES}", str(stories_path)) for a in argv]
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            f"from spon.cli import main\nsys.exit(main({argv!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("spon: error:") and f"pip install 'spon[{extra}]'" in lines[-1], lines[-3:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "summary.json").exists()
