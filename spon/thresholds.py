"""TEAL thresholds: streamed magnitude histograms per (layer, projection), then tau for a target.

What is histogrammed is the criterion's score of each activation (SparseLinear.score): |x| for
TEAL's magnitude criterion, |x| * ||W[:, i]||_2 for WINA's weighted one; tau is its quantile either
way, so the allocation (uniform, greedy) and the sparse-upstream calibration serve both.

Memory is bounded: each projection keeps a fixed histogram of log10(score) (not the activations),
fine enough (1e-3 decades per bin) that interpolated thresholds land within a hair of the
exact quantile.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

from spon.config import SparsityConfig
from spon.errors import SponError
from spon.sparse import (SparseLinear, by_name, mode, provenance, realized_sparsity, set_criterion, set_mode,
                         set_protocol, set_thresholds, sparse_linears, sparsified_positions, thresholds_of,
                         wrap_projections)

if TYPE_CHECKING:
    from spon.calibration import Calibration

LOG_MIN, LOG_MAX, BINS = -10.0, 6.0, 16_000


def check_sparsity(s: float) -> float:
    if not (isinstance(s, (int, float)) and math.isfinite(s) and 0.0 <= s < 1.0):
        raise SponError(f"sparsity must be in [0, 1), got {s!r}")
    return float(s)


def magnitude_histogram(x: torch.Tensor) -> torch.Tensor:
    """Counts of log10|x| in the fixed bins every threshold is read from (float64, on the CPU);
    x is an activation or a criterion's score of one."""
    logx = torch.log10(x.detach().float().abs().flatten().clamp_min(10**LOG_MIN))
    return torch.histc(logx, bins=BINS, min=LOG_MIN, max=LOG_MAX).cpu().double()


@contextmanager
def pre_hooks(modules, hook, with_kwargs: bool = False) -> Iterator[None]:
    """`hook` as a forward pre-hook on every module for the duration of the block."""
    handles = [m.register_forward_pre_hook(hook, with_kwargs=with_kwargs) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Histograms:
    """Streams |x| at the input of every SparseLinear into a fixed log-spaced histogram."""

    def __init__(self, model):
        self.model = model
        self.counts: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self):
        for m in sparse_linears(self.model):
            self.counts[m.name] = torch.zeros(BINS, dtype=torch.float64)
            self._handles.append(m.register_forward_pre_hook(self._hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, module: SparseLinear, args):
        self.counts[module.name] += magnitude_histogram(module.score(sparsified_positions(module, args[0])))


@torch.no_grad()
def collect_histograms(model, blocks: torch.Tensor, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Histograms of the dense model's linear inputs over the calibration blocks (at the positions
    each projection's protocol sparsifies)."""
    device = next(model.parameters()).device
    with mode(model, "dense"), Histograms(model) as hist:
        for i in range(0, len(blocks), batch_size):
            model(blocks[i : i + batch_size].to(device))
    return hist.counts


def threshold_from_histogram(counts: torch.Tensor, sparsity: float) -> float:
    """tau such that a fraction `sparsity` of magnitudes is <= tau (log-linear interpolation)."""
    sparsity = check_sparsity(sparsity)
    if sparsity == 0.0:
        return 0.0
    total = counts.sum().item()
    if total == 0:
        raise SponError("empty histogram: no activations were recorded")
    cum = torch.cumsum(counts, 0) / total
    i = int(torch.searchsorted(cum, torch.tensor(sparsity, dtype=cum.dtype)).clamp(max=BINS - 1))
    below = cum[i - 1].item() if i > 0 else 0.0
    frac = (sparsity - below) / max(cum[i].item() - below, 1e-12)
    width = (LOG_MAX - LOG_MIN) / BINS
    return 10 ** (LOG_MIN + (i + min(max(frac, 0.0), 1.0)) * width)


def weighted_sparsity(sparsities: dict[str, float], sizes: dict[str, int]) -> float:
    total = sum(sizes[n] for n in sparsities)
    return sum(sparsities[n] * sizes[n] for n in sparsities) / total


@torch.no_grad()
def greedy_sparsities(
    model,
    hists: dict[str, torch.Tensor],
    blocks: torch.Tensor,
    target: float,
    step: float = 0.05,
    max_sparsity: float = 0.99,
) -> dict[str, float]:
    """TEAL's block-wise greedy allocation.

    For each decoder layer, start every projection at sparsity 0; repeatedly raise by `step` the
    projection whose increase adds the least block-output error per weight element skipped, until
    the size-weighted sparsity of the block reaches `target`. Errors are measured by replaying the
    block on its dense inputs (captured once), so layers do not interact.
    """
    from spon.model import decoder_layers

    target = check_sparsity(target)
    mods = by_name(model)
    layers = decoder_layers(model)
    inputs = _capture_layer_inputs(model, layers, blocks)
    result: dict[str, float] = {}
    for li, layer in enumerate(layers):
        names = [n for n, m in mods.items() if n.split(".")[0] == str(li)]
        if not names:
            continue
        sizes = {n: mods[n].linear.weight.numel() for n in names}
        sp = {n: 0.0 for n in names}
        args, kwargs = inputs[li]
        with mode(model, "dense"):
            ref = _block_out(layer, args, kwargs)
        ref_norm = ref.float().pow(2).sum()

        def error(trial: dict[str, float]) -> float:
            set_thresholds(model, {n: threshold_from_histogram(hists[n], s) for n, s in trial.items()})
            with mode(model, "teal"):
                out = _block_out(layer, args, kwargs)
            return ((out.float() - ref.float()).pow(2).sum() / ref_norm).item()

        current = 0.0
        while target > 0 and weighted_sparsity(sp, sizes) < target - 1e-9:
            best = None
            for n in names:
                if sp[n] + step > max_sparsity + 1e-9:
                    continue
                trial = {**sp, n: sp[n] + step}
                score = (error(trial) - current) / sizes[n]
                if best is None or score < best[0]:
                    best = (score, n)
            if best is None:
                raise SponError(f"layer {li}: cannot reach sparsity {target} below max {max_sparsity}")
            sp[best[1]] = round(sp[best[1]] + step, 10)
            current = error(sp)
        result.update(sp)
    return result


def _block_out(layer, args, kwargs):
    out = layer(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _capture_layer_inputs(model, layers, blocks: torch.Tensor):
    """Positional and keyword inputs of every decoder layer for one dense forward pass."""
    captured: dict[int, tuple] = {}
    index = {id(layer): i for i, layer in enumerate(layers)}

    def hook(layer, args, kwargs):
        captured[index[id(layer)]] = (args, dict(kwargs))

    device = next(model.parameters()).device
    with pre_hooks(layers, hook, with_kwargs=True), mode(model, "dense"):
        model(blocks.to(device), use_cache=False)
    return captured


@torch.no_grad()
def sparse_upstream_thresholds(model, blocks: torch.Tensor, sparsities: dict[str, float],
                               run_mode: str = "teal") -> dict[str, float]:
    """tau per projection as the quantile of its input *with every projection before it already
    sparse*, in one forward pass over all the blocks.

    Thresholds taken on the dense model's activations do not give the sparsity they were set
    for: each sparsified projection shrinks what flows downstream, so later inputs have more
    mass below their tau (SmolLM2-135M at a 60 % target realizes 65 %). Here a pre-hook on each
    sparse linear computes its tau (a quantile of its criterion's score) from the input it actually
    receives in the sparse model and
    sets it before the module runs, so the realized sparsity on the calibration text is the
    target. The whole calibration set goes through as one batch (one call per module); memory
    is that of one forward over len(blocks) x block_len tokens, without the LM head.
    """
    mods = by_name(model)
    taus: dict[str, float] = {}

    def hook(module: SparseLinear, args):
        x = sparsified_positions(module, args[0])  # only the positions this protocol sparsifies
        taus[module.name] = threshold_from_histogram(magnitude_histogram(module.score(x)), sparsities[module.name])
        module.threshold.fill_(taus[module.name])

    device = next(model.parameters()).device
    base = getattr(model, "model", model)  # the decoder without the LM head: no [tokens, vocab] logits
    with pre_hooks([mods[n] for n in sparsities], hook), mode(model, run_mode):
        base(blocks.to(device), use_cache=False)
    missing = set(sparsities) - set(taus)
    if missing:
        raise SponError(f"the calibration pass never reached projection(s) {sorted(missing)[:5]}")
    return taus


@torch.no_grad()
def realized_by_projection(model, blocks: torch.Tensor, run_mode: str = "teal") -> dict[str, float]:
    """Fraction of each projection's input (at the positions its protocol sparsifies) that S zeroes
    on `blocks` in `run_mode`, in one pass without the LM head."""
    counts: dict[str, list[int]] = {}

    def hook(module: SparseLinear, args):
        x = sparsified_positions(module, args[0])
        dropped = x.numel() - int(module.keep(x).sum())
        c = counts.setdefault(module.name, [0, 0])
        c[0], c[1] = c[0] + dropped, c[1] + x.numel()

    device = next(model.parameters()).device
    base = getattr(model, "model", model)
    with pre_hooks(sparse_linears(model), hook), mode(model, run_mode):
        base(blocks.to(device), use_cache=False)
    return {n: d / max(t, 1) for n, (d, t) in counts.items()}


@torch.no_grad()
def retake_thresholds_(model, blocks: torch.Tensor, sparsities: dict[str, float] | None = None) -> dict[str, float]:
    """SPON's tau: each projection's quantile taken again with alpha in place (spon mode), so SPON
    realizes on `blocks` what TEAL realizes there (`sparsities`: TEAL's per projection, measured
    when not given); TEAL keeps its own tau as the baseline.

    Why: alpha moves what flows downstream back toward the dense model, so with TEAL's tau fewer
    inputs fall below it (SmolLM2-135M at 50 %: TEAL realizes 0.497 on wikitext-2 test, SPON with
    the same tau 0.469), and SPON would be compared with TEAL at 3 points less sparsity. Each
    projection's own alpha is added after S, so its input is upstream alpha's doing only: one
    sparse-upstream pass sets every tau."""
    teal = thresholds_of(model, "teal")
    if all(not bool(m.alpha.any()) for m in sparse_linears(model)):  # alpha = 0 is TEAL: TEAL's own tau, exactly
        set_thresholds(model, teal)
        return teal
    if sparsities is None:
        sparsities = realized_by_projection(model, blocks, "teal")
    full = [n for n, v in sparsities.items() if not 0 <= v < 1]
    if full:
        raise SponError(f"cannot re-take SPON's thresholds: TEAL drops every input of {full[0]} on the training "
                        "blocks (non-finite activations? a NaN is never above tau)")
    taus = sparse_upstream_thresholds(model, blocks, sparsities, run_mode="spon")
    set_thresholds(model, taus, teal=teal)
    return taus


def compute_thresholds(model, blocks: torch.Tensor, cfg: SparsityConfig) -> tuple[dict[str, float], dict[str, float]]:
    """Thresholds for every sparse linear, set on the model. Returns (thresholds, per-projection
    sparsities). cfg.calibrate_on: 'sparse' (default) takes each tau with everything upstream
    sparse, so the realized sparsity is the target; 'dense' is TEAL's original (quantiles of the
    dense model's activations). Under cfg.protocol 'last_half' every quantile is taken over the
    positions that protocol sparsifies (the second half of each block), never the dense half."""
    sparsity = check_sparsity(cfg.sparsity)
    if len(blocks) == 0:
        raise SponError("calibration data is empty: no blocks")
    names = list(by_name(model))
    set_protocol(model, cfg.protocol)
    set_criterion(model, cfg.criterion)
    hists = None
    if cfg.allocation == "uniform":
        sp = {n: sparsity for n in names}
    else:
        hists = collect_histograms(model, blocks)
        sp = greedy_sparsities(model, hists, blocks[: cfg.greedy_blocks], sparsity, step=cfg.greedy_step)
    if cfg.calibrate_on == "sparse":
        taus = sparse_upstream_thresholds(model, blocks, sp)
    else:
        hists = hists if hists is not None else collect_histograms(model, blocks)
        taus = {n: threshold_from_histogram(hists[n], s) for n, s in sp.items()}
    set_thresholds(model, taus)
    return taus, sp


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
