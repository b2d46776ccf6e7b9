"""The method as verbs on a model in memory, each taking one config:

    cal = spon.calibrate(model, tokenizer, CalibrationConfig(...))    # token blocks: train + held-out
    spon.sparsify_(model, SparsityConfig(sparsity=0.5), cal)         # S(x) = x * 1{|x| > tau}, tau calibrated
    spon.distill_(model, cal, DistillConfig())                        # alpha = argmin KL(dense || sparse)
    spon.save_pretrained(model, tokenizer, "out/fused")               # b' = b + W alpha, self-contained checkpoint

or all of it at once: `spon.oneshot(model, tokenizer, Recipe(...), output_dir="out/fused")`.
The stages, the command line and the Prefect tasks are adapters over these verbs (spon.stages).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from spon.calibration import blocks_from_stream, build_calibration, split_heldout, token_stream
from spon.config import CalibrationConfig, DistillConfig, Recipe, SparsityConfig
from spon.distill import DistillResult, distill
from spon.errors import SponError
from spon.fuse import save_pretrained
from spon.sparse import counting_zeros, fuse_alpha, mode, provenance, set_mode, sparse_linears, wrap_projections
from spon.thresholds import compute_thresholds


@dataclass
class Calibration:
    """Token blocks [N, L] the method calibrates on, split once into training and held-out blocks
    (thresholds and alpha train on `train`; `heldout` selects alpha and measures realized sparsity).
    `source`: "samples" (the model's own), "text" or "dataset"; `config`: what made them."""

    train: torch.Tensor
    heldout: torch.Tensor
    source: str
    config: dict = field(default_factory=dict)


def calibrate(model, tokenizer, data: CalibrationConfig | Sequence[str] | object | None = None) -> Calibration:
    """Calibration blocks from a CalibrationConfig (the model's own samples, text files or a
    `datasets` dataset by name), from documents in memory (a list of strings), or from a
    `datasets.Dataset` object (its "text" column). The model is used dense and left unchanged."""
    if data is None:
        data = CalibrationConfig()
    if isinstance(data, CalibrationConfig):
        cfg = data
        ctx = _in_float64(model) if cfg.source == "samples" and cfg.sample_precision == "fp64" else _unchanged()
        # float64 while sampling: a one-ulp logit difference between CPU kinds cannot flip a token
        with ctx, mode(model, "dense"):
            train, heldout = build_calibration(model, tokenizer, cfg)
        return Calibration(train, heldout, cfg.source, cfg.model_dump(mode="json"))
    cfg = CalibrationConfig(source="text")
    if hasattr(data, "column_names"):  # a datasets.Dataset
        if cfg.text_field not in data.column_names:
            raise SponError(f"dataset has no field {cfg.text_field!r}; fields: {data.column_names}")
        docs, what = [t for t in data[cfg.text_field] if t and t.strip()], "the dataset"
    elif isinstance(data, (list, tuple)) and all(isinstance(d, str) for d in data):
        docs, what = [d for d in data if d.strip()], f"{len(data)} documents"
    else:
        raise SponError(f"calibration data must be a CalibrationConfig, a list of strings or a datasets.Dataset, "
                        f"got {type(data).__name__}")
    blocks = blocks_from_stream(token_stream(tokenizer, docs), cfg.block_len, cfg.num_blocks, what)
    train, heldout = split_heldout(blocks, cfg.heldout_blocks)
    return Calibration(train, heldout, "text", {**cfg.model_dump(mode="json"), "files": [f"<{what} in memory>"]})


@dataclass
class SparsityReport:
    """What sparsify_ set: tau and the target sparsity per "layer.kind", and the weight-size-weighted
    sparsity the thresholds realize on the held-out blocks (None without held-out blocks)."""

    thresholds: dict[str, float]
    sparsities: dict[str, float]
    realized_heldout: float | None


def sparsify_(model, config: SparsityConfig, calibration: Calibration) -> SparsityReport:
    """TEAL in place: wrap config.targets of every layer, take each tau on the training blocks
    (uniform or greedy allocation, magnitude or weighted criterion, over the positions the protocol
    sparsifies) and leave the model in TEAL mode. Idempotent: a second call recalibrates."""
    wrap_projections(model, config.targets)
    taus, sparsities = compute_thresholds(model, calibration.train, config)
    realized = realized_sparsity(model, calibration.heldout) if len(calibration.heldout) else None
    set_mode(model, "teal")
    provenance(model).update({"calibration": calibration.config, "sparsity": config.model_dump(mode="json"),
                              "per_projection_sparsity": sparsities, "realized_sparsity_heldout": realized})
    return SparsityReport(taus, sparsities, realized)


def distill_(model, calibration: Calibration, config: DistillConfig | None = None, *,
             checkpoint_dir: str | Path | None = None, checkpoint_key: str | None = None, progress: bool = False,
             on_step: Callable[[int, float], None] | None = None) -> DistillResult:
    """Spontaneous neurons in place: train alpha to minimise KL(dense || sparse) on the training
    blocks with the model frozen, keep the checkpoint best on the held-out blocks (never worse than
    TEAL: alpha = 0 otherwise) and leave the model in SPON mode with that alpha. On text
    calibration a checkpoint must also not raise the held-out next-token NLL above TEAL's; on the
    model's own samples the NLL is their entropy plus the KL, so selection stays on KL."""
    config = config or DistillConfig()
    if not sparse_linears(model):
        raise SponError("the model is not sparse: call spon.sparsify_(model, SparsityConfig(...), calibration) first")
    model.requires_grad_(False)  # only alpha trains
    result = distill(model, calibration.train, calibration.heldout, config, checkpoint_dir=checkpoint_dir,
                     checkpoint_key=checkpoint_key, progress=progress, on_step=on_step,
                     nll_guard=calibration.source != "samples")
    set_mode(model, "spon")
    record_distillation(model, config, result)
    return result


def record_distillation(model, config: DistillConfig, result: DistillResult) -> None:
    """The distillation config and alpha selection, for the sidecar save_pretrained writes."""
    provenance(model).update({
        "distill": config.model_dump(mode="json"),
        "heldout_kl": {"teal": result.heldout_kl_before, "spon": result.heldout_kl_after},
        "alpha_selection": {"selected_step": result.selected_step, "selection": result.selection}})


def fuse_(model) -> None:
    """b' = b + W alpha into the biases in memory: SPON then costs exactly what TEAL costs, and the
    model computes what its saved checkpoint computes, bit for bit."""
    fuse_alpha(model)
    set_mode(model, "spon")


def oneshot(model, tokenizer, recipe: Recipe | None = None, calibration=None,
            output_dir: str | Path | None = None, progress: bool = False) -> DistillResult:
    """calibrate -> sparsify_ -> distill_ (-> save_pretrained when output_dir is given), in place.
    `calibration`: data for `calibrate` (default: recipe.calibration)."""
    recipe = recipe or Recipe()
    cal = calibrate(model, tokenizer, recipe.calibration if calibration is None else calibration)
    sparsify_(model, recipe.sparsity, cal)
    result = distill_(model, cal, recipe.distill, progress=progress)
    if output_dir is not None:
        save_pretrained(model, tokenizer, output_dir)
    return result


@torch.no_grad()
def realized_sparsity(model, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Fraction of the sparse linears' inputs that S zeroes on `blocks` (TEAL mode), weighted by
    weight size: what decode speed depends on (the weight bytes skipped)."""
    device = next(model.parameters()).device
    with mode(model, "teal"), counting_zeros(model) as z:
        for i in range(0, len(blocks), batch_size):
            model(blocks[i : i + batch_size].to(device), use_cache=False)
    return z["weighted"]


@contextmanager
def _in_float64(model) -> Iterator[None]:
    """The model in float64 for the duration, then every parameter and buffer back in its own
    dtype (fp32/bf16 -> fp64 -> back is exact). Buffers are replaced, not converted in place, by
    Module.double(), so they are restored by name."""
    params = {n: p.dtype for n, p in model.named_parameters()}
    buffers = {n: b.dtype for n, b in model.named_buffers()}
    model.double()
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.data = p.data.to(params[n])
        for n, b in list(model.named_buffers()):
            owner, _, attr = n.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = b.to(buffers[n])


@contextmanager
def _unchanged() -> Iterator[None]:
    yield
