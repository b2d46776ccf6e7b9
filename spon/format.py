"""The one definition of what spon writes: checkpoint and stage file names, format versions,
criteria, protocols and projection names. Standard library only, so every layer (and the tests)
can read it; the checkpoint's own modeling code (spon/remote_code/modeling_spon.py) carries a
vendored copy of the checkpoint part, checked equal to this one by one test.

A fused checkpoint is a vanilla transformers directory plus:
    spon.json                        the sidecar: format, criterion, thresholds, targets, protocol, ...
    spon_alpha.safetensors           alpha per "layer.kind" (fp32)
    spon_channel_norms.safetensors   the weighted criterion's ||W[:, i]||_2 (format spon/2 only)
    modeling_spon.py                 the sparse model for transformers' trust_remote_code
    README.md                        the model card
"""

from __future__ import annotations

# ----------------------------------------------------------------------------- the checkpoint
SIDECAR = "spon.json"
ALPHA_FILE = "spon_alpha.safetensors"
CHANNEL_NORMS_FILE = "spon_channel_norms.safetensors"
MODELING_FILE = "modeling_spon.py"
CARD_FILE = "README.md"

# Sidecar format by criterion. spon/1: TEAL's magnitude criterion. spon/2 adds `criterion` (and,
# for "weighted", the channel norms file): a reader that knows only spon/1 must refuse it rather
# than apply tau to |x|.
FORMAT_BY_CRITERION = {"magnitude": "spon/1", "weighted": "spon/2"}
FORMATS = tuple(FORMAT_BY_CRITERION.values())
CRITERIA = tuple(FORMAT_BY_CRITERION)
PROTOCOLS = ("all", "last_half")
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")

# ----------------------------------------------------------------------------- stage outputs
CALIBRATION_FILE = "calibration.safetensors"
THRESHOLDS_FILE = "thresholds.json"
ALPHA_STAGE_FILE = "alpha.safetensors"
DISTILL_FILE = "distill.json"
EVAL_FILE = "eval.json"
QUANT_FILE = "quantize.json"
SUMMARY_FILE = "summary.json"
MANIFEST_FILE = "manifest.json"  # a model-store copy


def format_for(criterion: str) -> str:
    """The sidecar format a checkpoint of `criterion` is written in."""
    if criterion not in FORMAT_BY_CRITERION:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {CRITERIA}")
    return FORMAT_BY_CRITERION[criterion]


def is_spon_checkpoint(path) -> bool:
    """A directory holding a spon sidecar (fused checkpoint or a pulled copy of one)."""
    from pathlib import Path

    return (Path(path) / SIDECAR).is_file()
