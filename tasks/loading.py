"""Rebuilding the sparse model a stage needs from the files earlier stages left (no math here)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from spon.model import load_model
from spon.sparse import set_protocol, set_thresholds, sparsify

from tasks.types import ModelRef, StageRef
from tasks.workdir import read_json

CALIBRATION_FILE = "calibration.safetensors"
THRESHOLDS_FILE = "thresholds.json"
ALPHA_FILE = "alpha.safetensors"
DISTILL_FILE = "distill.json"


def sparse_model(model: ModelRef, targets: list[str], device: str, dtype: str, thresholds: StageRef | None = None, protocol: str = "all"):
    m, tok = load_model(model.path, device, dtype)
    sparsify(m, targets)
    set_protocol(m, protocol)
    if thresholds is not None:
        set_thresholds(m, read_json(Path(thresholds.dir) / THRESHOLDS_FILE)["thresholds"])
    return m, tok


def calibration_blocks(calib: StageRef) -> torch.Tensor:
    return load_file(str(Path(calib.dir) / CALIBRATION_FILE))["blocks"]
