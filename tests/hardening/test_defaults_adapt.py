"""Issue #22, item 7/9: a default that the model cannot hold adapts to it, said in one line; a
value the user typed is refused in one line. A Llama with max_position_embeddings 64: the default
calibration block length (128) and perplexity window (512) become 64."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from spon.cli import main
from spon.format import CALIBRATION_FILE


@pytest.fixture(scope="module")
def short_model(tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("short") / "llama64"
    shutil.copytree(tiny_models["llama"], d)
    c = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**c, "max_position_embeddings": 64}))
    return d


def _err(capsys):
    return capsys.readouterr().err


@pytest.mark.slow  # a calibration and perplexities of a tiny model
def test_defaults_adapt_to_a_short_context_and_typed_values_are_refused(short_model, tmp_path, capsys, sample_txt):
    assert main(["-q", "calibrate", "--model", str(short_model), "--calib-blocks", "4", "--out", str(tmp_path / "cal")]) == 0
    err = _err(capsys)
    assert "calibration.block_len: the default 128 exceeds the model's max_position_embeddings 64" in err and "using 64" in err
    assert load_file(str(tmp_path / "cal" / CALIBRATION_FILE))["train"].shape[1] == 64

    assert main(["-q", "calibrate", "--model", str(short_model), "--calib-len", "100", "--out", str(tmp_path / "no")]) == 2
    assert "--calib-len (calibration.block_len) 100 exceeds the model's max_position_embeddings 64" in _err(capsys)
    assert not (tmp_path / "no").exists()

    assert main(["-q", "ppl", str(short_model), "--eval-text", str(sample_txt)]) == 0
    assert "--window: the default 512 exceeds the model's max_position_embeddings 64" in _err(capsys)
    assert main(["-q", "ppl", str(short_model), "--eval-text", str(sample_txt), "--window", "128"]) == 2
    assert "--window 128 exceeds the model's max_position_embeddings 64" in _err(capsys)


def test_run_checks_adapt_the_default_window_and_refuse_a_typed_one(short_model, sample_txt, tmp_path, capsys):
    from spon.cli_args import check_run, config_from_args
    from spon.cli import build_parser
    from spon.errors import SponError

    def cfg_of(*extra):
        args = build_parser().parse_args(["run", "--in-process", "--model", str(short_model), "--eval-text",
                                          str(sample_txt), "--out", str(tmp_path / "o"), *extra])
        return config_from_args(args)

    cfg = cfg_of()
    check_run(cfg)
    assert (cfg.eval.window, cfg.eval.stride, cfg.calibration.block_len) == (64, 32, 64)
    assert "eval.window: the default 512 exceeds the model's max_position_embeddings 64" in _err(capsys)
    with pytest.raises(SponError, match=r"--window \(eval.window\) 256 exceeds the model's max_position_embeddings 64"):
        check_run(cfg_of("--window", "256"))
