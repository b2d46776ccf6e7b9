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

# ----------------------------------------------------------------------------- base models (transformers' own)
# The weight files of a model directory (model.safetensors, its shards, pytorch_model.bin): what a
# stage file's provenance fingerprints besides the config and tokenizer (spon.sources.weights_digest).
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def format_for(criterion: str) -> str:
    """The sidecar format a checkpoint of `criterion` is written in."""
    if criterion not in FORMAT_BY_CRITERION:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {CRITERIA}")
    return FORMAT_BY_CRITERION[criterion]


def is_spon_checkpoint(path) -> bool:
    """A directory holding a spon sidecar (fused checkpoint or a pulled copy of one)."""
    from pathlib import Path

    return (Path(path) / SIDECAR).is_file()


# ----------------------------------------------------------------------------- validation
# What every reader of a fused checkpoint checks before it applies anything (spon.fuse's loader,
# spon.checks.check_fused_dir and the checkpoint's own modeling code). The functions below are
# vendored verbatim into spon/remote_code/modeling_spon.py (which cannot import spon); a test
# checks the sources equal, so both loaders accept and refuse exactly the same checkpoints.
# Each failure is a ValueError of one line; spon turns it into a SponError.
DIGEST_KEY = "digest"  # the sidecar's record of the thresholds and alpha it was written with
ALPHA_DTYPES = ("F32", "torch.float32")  # alpha and channel norms: fp32 (header name, torch name)


def sidecar_digest(meta, alpha_sha256, norms_sha256=None):
    """sha256 over what decides the sparse model's output: thresholds, targets, criterion, protocol,
    where alpha is fused, and the sha256 of the alpha (and channel norms) file."""
    import hashlib
    import json

    covered = {k: meta.get(k) for k in ("thresholds", "targets", "criterion", "protocol", "fused_in_checkpoint")}
    covered["alpha_sha256"] = alpha_sha256
    covered["channel_norms_sha256"] = norms_sha256
    return hashlib.sha256(json.dumps(covered, sort_keys=True).encode("utf-8")).hexdigest()


def validate_sidecar(meta, num_layers=None, projections=None, alpha=None, channel_norms=None,
                     alpha_sha256=None, norms_sha256=None):
    """Refuse (ValueError, one line) a sidecar that is not what save_pretrained writes.

    meta: the parsed sidecar. num_layers: the model's layer count (config num_hidden_layers).
    projections: {"layer.kind": (in_features, has_bias)} of the loaded model. alpha / channel_norms:
    {"layer.kind": (shape tuple, dtype name, all finite or None)} of the files. alpha_sha256 /
    norms_sha256: the files' sha256, checked against the sidecar's digest when it has one."""
    import math

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not isinstance(meta, dict):
        raise ValueError(f"the sidecar must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") not in FORMATS:
        raise ValueError(f"unknown format {meta.get('format')!r}, expected one of {', '.join(FORMATS)}")
    criterion = meta.get("criterion", "magnitude")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}, expected one of {', '.join(CRITERIA)}")
    if FORMAT_BY_CRITERION[criterion] != meta["format"]:
        raise ValueError(f"format {meta['format']!r} does not fit criterion {criterion!r} "
                         f"(written as {FORMAT_BY_CRITERION[criterion]!r})")
    if meta.get("protocol", "all") not in PROTOCOLS:
        raise ValueError(f"unknown protocol {meta.get('protocol')!r}, expected one of {', '.join(PROTOCOLS)}")
    for key in ("thresholds", "targets", "fused_in_checkpoint"):
        if key not in meta:
            raise ValueError(f"it has no {key!r}")
    targets = meta["targets"]
    if not isinstance(targets, list) or not targets or any(t not in PROJECTIONS for t in targets):
        raise ValueError(f"targets must be a non-empty list of {', '.join(PROJECTIONS)}; got {targets!r}")
    if len(set(targets)) != len(targets):
        raise ValueError(f"targets {targets!r} name a projection twice")
    thresholds, fused = meta["thresholds"], meta["fused_in_checkpoint"]
    for key, value in (("thresholds", thresholds), ("fused_in_checkpoint", fused)):
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be an object mapping \"layer.kind\" to a value, got {type(value).__name__}")
    for name, tau in thresholds.items():
        if not number(tau):
            raise ValueError(f"threshold {name} is {tau!r}, not a number")
        if not math.isfinite(tau) or tau < 0:
            raise ValueError(f"threshold {name} is {tau!r}: a threshold is a finite number >= 0")
    for name, v in fused.items():
        if not isinstance(v, bool):
            raise ValueError(f"fused_in_checkpoint {name} is {v!r}, not true or false")
    if num_layers is None and projections is not None:
        num_layers = 1 + max((int(n.split(".")[0]) for n in projections), default=-1)
    if num_layers is not None:
        names = [f"{i}.{k}" for i in range(num_layers) for k in targets]
    else:  # no model to compare with: every layer named in either map has all the targets
        layers = sorted({n.split(".")[0] for n in [*thresholds, *fused] if n.split(".")[0].isdigit()}, key=int)
        names = [f"{i}.{k}" for i in layers for k in targets]
    expected, layer_count = set(names), len(names) // len(targets)
    for key, value in (("thresholds", thresholds), ("fused_in_checkpoint", fused)):
        missing = [n for n in names if n not in value]
        extra = sorted(set(value) - expected)
        if missing:
            raise ValueError(f"{key} has no entry for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                             f"({len(missing)} of the {len(names)} that targets {','.join(targets)} name)")
        if extra:
            raise ValueError(f"{key} has entries outside targets {','.join(targets)} x {layer_count} "
                             f"layers: {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
    for what, tensors in (("alpha", alpha), ("channel norms", channel_norms)):
        if tensors is None:
            continue
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"the {what} file has no tensor {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                             f"({len(missing)} of {len(names)})")
        for n in names:
            shape, dtype, finite = tensors[n]
            want = projections[n][0] if projections is not None and n in projections else None
            if len(shape) != 1 or (want is not None and shape[0] != want):
                raise ValueError(f"{what} {n} has shape {list(shape)}, expected "
                                 f"[{want if want is not None else 'in_features'}]")
            if str(dtype) not in ALPHA_DTYPES:
                raise ValueError(f"{what} {n} is {dtype}, expected float32")
            if finite is False:
                raise ValueError(f"{what} {n} holds NaN or inf")
    if criterion == "weighted" and channel_norms is None and projections is not None:
        raise ValueError("criterion 'weighted' needs the channel norms file")
    if projections is not None:
        for n in names:
            has_bias = projections[n][1]
            if fused[n] and not has_bias:
                raise ValueError(f"fused_in_checkpoint says {n}'s alpha is in its bias, but the model's projection "
                                 f"has no bias (config.json attention_bias/mlp_bias turned off?)")
            if not fused[n] and has_bias:
                raise ValueError(f"fused_in_checkpoint says {n}'s alpha is not in its bias, but the checkpoint "
                                 f"gives it one (alpha would be added twice)")
    record = meta.get(DIGEST_KEY)
    if record is not None and alpha_sha256 is not None:
        if not isinstance(record, str):
            raise ValueError(f"{DIGEST_KEY} must be a sha256 hex string, got {record!r}")
        if criterion != "weighted" or norms_sha256 is not None:
            actual = sidecar_digest(meta, alpha_sha256, norms_sha256 if criterion == "weighted" else None)
            if actual != record:
                raise ValueError(f"its thresholds or alpha changed after fusion ({DIGEST_KEY} {record[:12]}..., "
                                 f"the files give {actual[:12]}...)")


# ----------------------------------------------------------------------------- one writer per output
LOCK_SUFFIX = ".spon-lock"  # beside an output directory D: D's parent/.<D's name>.spon-lock (spon.lock)
