"""Issue #22, item 3: every stage file records the model that made it (calibration, thresholds,
alpha, distill.json: source, fingerprint of config and tokenizer); a stage given another model's
files refuses them in one line, exit 2, and writes nothing."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from spon.cli import main
from spon.format import ALPHA_STAGE_FILE, CALIBRATION_FILE, DISTILL_FILE, THRESHOLDS_FILE
from spon.stages import _metadata

pytestmark = pytest.mark.slow  # calibrations and distillations of two models (~1 min)

SMALL = ["--calib-blocks", "8", "--calib-len", "32", "--steps", "1", "--batch-size", "4", "-q"]


def _run(capsys, *argv) -> tuple[int, list[str]]:
    capsys.readouterr()
    quiet = [a for a in argv if a != "-q"]
    rc = main(["-q", *quiet])
    return rc, [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("spon: error:")]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny_models):
    return tmp_path_factory.mktemp("prov"), tiny_models["llama"]


def test_stage_files_record_their_model_and_another_models_files_are_refused(two_models, capsys, stories_path):
    root, tiny = two_models
    small = [a for a in SMALL if a != "-q"]
    assert main(["-q", "calibrate", "--model", str(tiny), *small[:4], "--out", str(root / "cal-tiny")]) == 0
    assert main(["-q", "distill", "--model", str(tiny), *small, "--calib", str(root / "cal-tiny"),
                 "--out", str(root / "alpha-tiny")]) == 0
    cal_rec = json.loads(_metadata(root / "cal-tiny" / CALIBRATION_FILE)["model"])
    assert cal_rec["source"] == str(tiny) and cal_rec["config"]["num_hidden_layers"] == 2
    assert json.loads((root / "cal-tiny" / THRESHOLDS_FILE).read_text())["model"]["fingerprint"] == cal_rec["fingerprint"]
    assert json.loads((root / "alpha-tiny" / DISTILL_FILE).read_text())["model"]["fingerprint"] == cal_rec["fingerprint"]
    assert json.loads(_metadata(root / "alpha-tiny" / ALPHA_STAGE_FILE)["model"])["fingerprint"] == cal_rec["fingerprint"]

    # distill --calib <another model's calibration> without --model: the default model refuses it
    rc, errors = _run(capsys, "distill", *small, "--calib", str(root / "cal-tiny"), "--out", str(root / "refused1"))
    assert rc == 2 and len(errors) == 1 and f"was made with model {tiny}, not" in errors[0], errors
    assert "num_hidden_layers 2 vs 5" in errors[0] and f"pass --model {tiny}" in errors[0], errors[0]
    assert not (root / "refused1").exists()

    # fuse with the default model's calibration and the tiny model's alpha
    assert main(["-q", "calibrate", *small[:4], "--out", str(root / "cal-stories")]) == 0
    rc, errors = _run(capsys, "fuse", "--calib", str(root / "cal-stories"), "--alpha",
                      str(root / "alpha-tiny" / ALPHA_STAGE_FILE), "--out", str(root / "refused2"))
    assert rc == 2 and len(errors) == 1 and "was made with model" in errors[0], errors
    assert not (root / "refused2").exists()

    # ... and the same alpha with its record removed (a file from before provenance): its shapes refuse it
    old = root / "alpha-old"
    old.mkdir()
    save_file(load_file(str(root / "alpha-tiny" / ALPHA_STAGE_FILE)), str(old / ALPHA_STAGE_FILE))
    d = json.loads((root / "alpha-tiny" / DISTILL_FILE).read_text())
    d.pop("model")
    (old / DISTILL_FILE).write_text(json.dumps(d))
    rc, errors = _run(capsys, "fuse", "--calib", str(root / "cal-stories"), "--alpha", str(old / ALPHA_STAGE_FILE),
                      "--out", str(root / "refused3"))
    assert rc == 2 and len(errors) == 1 and "does not fit the thresholds" in errors[0], errors
    assert not (root / "refused3").exists()


def test_a_model_with_the_same_config_and_other_weights_is_refused(tmp_path, capsys, stories_path):
    """The record fingerprints the weight files too: stories260K with one weight changed (config and
    tokenizer the same) refuses stories260K's calibration in one line; an identical copy elsewhere
    (other path, same files) accepts it."""
    import shutil

    import torch

    same, other = tmp_path / "same", tmp_path / "other"
    for d in (same, other):
        shutil.copytree(stories_path, d)
        for f in d.iterdir():
            f.chmod(0o644)  # the assets are read-only
    weights = load_file(str(other / "model.safetensors"))
    name = sorted(weights)[0]
    flat = weights[name].view(-1)
    flat[0] = flat[0] + 1.0
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    assert not torch.equal(load_file(str(stories_path / "model.safetensors"))[name], weights[name])

    small = [a for a in SMALL if a != "-q"]
    assert main(["-q", "calibrate", "--model", str(stories_path), *small[:4], "--out", str(tmp_path / "cal")]) == 0
    rec = json.loads(_metadata(tmp_path / "cal" / CALIBRATION_FILE)["model"])
    assert isinstance(rec["weights"], str) and len(rec["weights"]) == 16
    assert json.loads((tmp_path / "cal" / THRESHOLDS_FILE).read_text())["model"]["weights"] == rec["weights"]

    rc, errors = _run(capsys, "distill", "--model", str(other), *small, "--calib", str(tmp_path / "cal"),
                      "--out", str(tmp_path / "refused"))
    assert rc == 2 and len(errors) == 1, errors
    assert f"was made with other weights than {other} (the same config and tokenizer" in errors[0], errors[0]
    assert rec["weights"] in errors[0] and f"--model {stories_path}" in errors[0], errors[0]
    assert not (tmp_path / "refused").exists()

    assert main(["-q", "distill", "--model", str(same), *small, "--calib", str(tmp_path / "cal"),
                 "--out", str(tmp_path / "alpha")]) == 0
    assert json.loads((tmp_path / "alpha" / DISTILL_FILE).read_text())["model"]["weights"] == rec["weights"]
