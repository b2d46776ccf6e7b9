"""The sparse linear: y = W (S(x) + alpha) + b with S(x) = x * 1{|x| > tau}.

Two criteria decide which activations S drops:
  magnitude  TEAL:  drop x_i when |x_i| <= tau
  weighted   WINA (arXiv 2505.19427): drop x_i when |x_i| * c_i <= tau, c_i = ||W[:, i]||_2, the size
             of the contribution x_i makes to the output; the same test as a per-input-channel
             threshold tau_i = tau / c_i, so kernels and fusion stay as they are.

One module, three modes over the same frozen weights:
  dense  W x + b                  (the teacher; never a second copy of the weights)
  teal   W S(x) + b               (TEAL)
  spon   W (S(x) + alpha) + b     (spontaneous neurons; after fusion W S(x) + b' with b' = b + W alpha)

We wrap the model's nn.Linear modules rather than touching transformers' source.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from spon.errors import SponError
from spon.format import CRITERIA, PROJECTIONS, PROTOCOLS
from spon.kernels.reference import keep_mask
from spon.model import find_projections

MODES = ("dense", "teal", "spon")


def sparsified_positions(module: "SparseLinear", x: torch.Tensor) -> torch.Tensor:
    """The part of a linear's input that its protocol sparsifies: every position ("all"), or the
    second half of each sequence (TEAL's "last_half": the first half of a prefill stays dense).
    Thresholds and the closed-form alpha are statistics of exactly these positions."""
    if module.protocol == "last_half" and x.dim() == 3 and x.shape[1] > 1:
        return x[:, x.shape[1] // 2 :]
    return x


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """c_i = ||W[:, i]||_2 in fp32, summed in float64 so every CPU kind and thread count rounds it
    the same (a one-ulp difference in c would move the mask of a boundary activation)."""
    return weight.detach().double().pow(2).sum(0).sqrt().float()


class SparseLinear(nn.Module):
    def __init__(self, linear: nn.Linear, name: str, kind: str):
        super().__init__()
        self.linear = linear
        self.had_bias = linear.bias is not None  # fusion may give it one where the architecture has none
        self.name = name  # "layer.kind", e.g. "3.down"
        self.kind = kind
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        # TEAL's own tau when SPON's differs (thresholds re-taken with alpha in place, so that SPON
        # realizes the target sparsity): the baseline that teal mode runs. None: one tau for both.
        self.register_buffer("teal_threshold", None, persistent=False)
        # WINA's c_i = ||W[:, i]||_2 (criterion "weighted"); None: TEAL's magnitude criterion.
        self.register_buffer("channel_norm", None, persistent=False)
        # alpha lives in the linear's input space; fp32 even for a bf16 model so small updates survive.
        self.alpha = nn.Parameter(torch.zeros(linear.in_features, dtype=torch.float32, device=linear.weight.device))
        # After fusion linear.bias holds b + W alpha; fused_delta = W alpha lets dense/teal modes undo it.
        self.register_buffer("fused_delta", None)
        self.mode = "dense"
        self.protocol = "all"
        self.count_zeros = False
        self.zeros = 0
        self.seen = 0
        # Inference backend (spon.kernel_backend.use_kernels): the sparse kernels, q/k/v and
        # gate/up fused; None = torch.
        self.kernel = None
        self.kernel_index = 0

    @property
    def fused(self) -> bool:
        return self.fused_delta is not None

    @property
    def criterion(self) -> str:
        return "magnitude" if self.channel_norm is None else "weighted"

    def extra_repr(self) -> str:
        return (f"name={self.name}, mode={self.mode}, criterion={self.criterion}, tau={self.tau().item():.4g}, "
                f"fused={self.fused}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dense":
            return self._dense(x)
        # TEAL's published prefill protocol: the first half of each sequence stays dense.
        if self.protocol == "last_half" and x.dim() == 3 and x.shape[1] > 1:
            h = x.shape[1] // 2
            return torch.cat([self._dense(x[:, :h]), self._sparse(x[:, h:])], dim=1)
        return self._sparse(x)

    def _original_bias(self) -> torch.Tensor | None:
        b = self.linear.bias
        if self.fused:
            return b - self.fused_delta
        return b

    def sparse_bias(self) -> torch.Tensor | None:
        """The bias of the sparse modes: b' = b + W alpha in spon (fused), b in teal."""
        return self.linear.bias if self.mode == "spon" else self._original_bias()

    def _dense(self, x):
        return F.linear(x, self.linear.weight, self._original_bias())

    def _sparse(self, x):
        if self.kernel is not None and not torch.is_grad_enabled() and (self.mode == "teal" or self.fused):
            if self.count_zeros:
                self._count(self.keep(x))
            return self.kernel.forward(self, x)  # reads only the rows of W^T whose input survives
        bias = self.sparse_bias()
        # One mask per call, shared by the sparsifier and the zero counter (an elementwise pass
        # over the activations costs as much as this tiny model's matmuls).
        keep = self.keep(x)
        if self.count_zeros:
            self._count(keep)
        sx = x * keep
        if self.mode == "spon" and not self.fused:
            return F.linear(sx + self.alpha.to(x.dtype), self.linear.weight, self.linear.bias)
        # teal, or spon after fusion (b' = b + W alpha already in the bias: exactly TEAL's cost)
        return F.linear(sx, self.linear.weight, bias)

    def _count(self, keep: torch.Tensor) -> None:
        self.zeros += keep.numel() - int(keep.sum())
        self.seen += keep.numel()

    def tau(self) -> torch.Tensor:
        """The threshold of the current mode: TEAL's own in teal mode, the model's otherwise."""
        return self.teal_threshold if self.mode == "teal" and self.teal_threshold is not None else self.threshold

    def cutoff(self) -> torch.Tensor:
        """What |x| is compared with: tau (magnitude), or tau_i = tau / c_i per input channel
        (weighted; fp32, so every path that reads it compares against the same numbers)."""
        tau = self.tau()
        return tau if self.channel_norm is None else tau / self.channel_norm

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """The criterion's importance of each activation, whose quantile calibrates tau:
        |x| (magnitude) or |x| * c (weighted)."""
        s = x.detach().float().abs()
        return s if self.channel_norm is None else s * self.channel_norm

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """1{|x| > cutoff}: the kernels' own test (compared in fp32, as calibration measured |x|), so
        the torch path, the CPU op and the Triton kernel keep the same elements in bf16/fp16 too."""
        return keep_mask(x, self.cutoff())

    def S(self, x: torch.Tensor) -> torch.Tensor:
        """TEAL's sparsifier: x * 1{|x| > tau}."""
        return x * self.keep(x)


@dataclass
class SparseState:
    """What a sparse model is, as stored: the projections made sparse, their thresholds, the
    criterion (and its channel norms), the protocol and alpha. Every loader builds one (from a
    checkpoint's sidecar, or a stage's files) and hands it to `apply_sparse_state_`; computing the
    thresholds in the first place is the verb `spon.sparsify_` (spon.oneshot).

    thresholds: tau per "layer.kind" (None: leave them as they are).
    teal_thresholds: TEAL's own tau where SPON's were re-taken with alpha in place (what teal mode,
        the baseline, runs); None: TEAL runs `thresholds`.
    alpha: the spontaneous-neuron vectors (None: leave them; zeros for a freshly wrapped model).
    alpha_in_bias: names whose checkpoint bias already holds b + W alpha (a fused checkpoint);
        with fuse=True every other alpha is fused into its bias now (b' = b + W alpha).
    criterion: "magnitude" (TEAL) or "weighted" (WINA: |x_i| * ||W[:, i]||_2 against tau).
    channel_norms: the weighted criterion's c per "layer.kind" as calibrated (a fused checkpoint
        carries them: a quantized copy's W no longer gives the same norms); None: from W now.
    """

    targets: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    thresholds: dict[str, float] | None = None
    teal_thresholds: dict[str, float] | None = None
    criterion: str = "magnitude"
    channel_norms: dict[str, torch.Tensor] | None = None
    protocol: str = "all"
    alpha: dict[str, torch.Tensor] | None = None
    alpha_in_bias: dict[str, bool] = field(default_factory=dict)
    fuse: bool = False
    mode: str = "teal"

    @classmethod
    def from_sidecar(cls, meta: dict, alpha: dict[str, torch.Tensor],
                     channel_norms: dict[str, torch.Tensor] | None = None) -> "SparseState":
        """A fused checkpoint: thresholds and alpha from its sidecar; alpha already in the biases
        where the architecture has a slot, fused at load time elsewhere."""
        return cls(targets=list(meta["targets"]), thresholds=meta["thresholds"], protocol=meta.get("protocol", "all"),
                   teal_thresholds=meta.get("teal_thresholds"),
                   criterion=meta.get("criterion", "magnitude"), channel_norms=channel_norms,
                   alpha=alpha, alpha_in_bias=meta["fused_in_checkpoint"], fuse=True, mode="spon")


def apply_sparse_state_(model, state: SparseState) -> list[SparseLinear]:
    """Make `model` the sparse model `state` describes, in place (wrapping its projections first)."""
    mods = wrap_projections(model, state.targets)
    set_protocol(model, state.protocol)
    set_criterion(model, state.criterion, state.channel_norms)
    if state.thresholds is not None:
        set_thresholds(model, state.thresholds, teal=state.teal_thresholds)
    if state.alpha is not None:
        load_alphas(model, state.alpha)
    if state.alpha_in_bias or state.fuse:
        fuse_alpha(model, already_fused={n for n, v in state.alpha_in_bias.items() if v})
    set_mode(model, state.mode)
    return mods


def wrap_projections(model, kinds=PROJECTIONS) -> list[SparseLinear]:
    """Wrap the chosen projections of every layer in SparseLinear (idempotent; tau = 0 until set)."""
    wrapped = []
    for p in find_projections(model, kinds):
        mod = p.module
        if not isinstance(mod, SparseLinear):
            if not isinstance(mod, nn.Linear):
                raise SponError(f"{p.name}: expected nn.Linear, found {type(mod).__name__}")
            mod = SparseLinear(mod, p.name, p.kind)
            setattr(p.parent, p.attr, mod)
        wrapped.append(mod)
    return wrapped


@torch.no_grad()
def fuse_alpha(model, already_fused: set[str] = frozenset()) -> None:
    """In memory: bias <- b + W alpha for every sparse linear, so spon mode costs what teal costs.
    Names in `already_fused` come from a fused checkpoint whose bias holds b + W alpha already:
    only W alpha is recorded, so dense and teal modes can undo it."""
    for m in sparse_linears(model):
        if m.fused:
            continue
        delta = weight_times_alpha(m)
        if m.name in already_fused:
            m.fused_delta = delta
            continue
        w = m.linear.weight
        if m.linear.bias is None:
            m.linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False)
        m.linear.bias.copy_(fused_bias(m.linear.bias, delta))
        m.fused_delta = delta


def weight_times_alpha(m: SparseLinear) -> torch.Tensor:
    """W alpha in float64, rounded once to the weight dtype (keeps fused == unfused to ~1 ulp)."""
    w = m.linear.weight
    return (w.double() @ m.alpha.double()).to(w.dtype)


def fused_bias(bias: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    """b' = b + W alpha, summed in float64 and rounded once to W alpha's dtype (b = 0 when absent)."""
    if bias is None:
        return delta.clone()
    return (bias.double() + delta.double()).to(delta.dtype)


def provenance(model) -> dict:
    """How the sparse model in memory was made, recorded by the verbs (spon.oneshot) as they run:
    calibration and sparsity configs, per-projection sparsities, realized sparsity on the held-out
    blocks, the distillation config and alpha selection. `spon.save_pretrained` writes it into the
    sidecar; a model sparsified by hand has an empty record."""
    return model.__dict__.setdefault("spon_provenance", {})


def sparse_linears(model) -> list[SparseLinear]:
    return [m for m in model.modules() if isinstance(m, SparseLinear)]


def by_name(model) -> dict[str, SparseLinear]:
    return {m.name: m for m in sparse_linears(model)}


def set_mode(model, mode: str) -> None:
    if mode not in MODES:
        raise SponError(f"unknown mode {mode!r}; choose one of {MODES}")
    for m in sparse_linears(model):
        m.mode = mode


def set_protocol(model, protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise SponError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    for m in sparse_linears(model):
        m.protocol = protocol


@contextmanager
def mode(model, name: str) -> Iterator[None]:
    """Temporarily switch every sparse linear to `name` (e.g. the dense teacher)."""
    before = {m: m.mode for m in sparse_linears(model)}
    set_mode(model, name)
    try:
        yield
    finally:
        for m, old in before.items():
            m.mode = old


@torch.no_grad()
def set_criterion(model, criterion: str, channel_norms: dict[str, torch.Tensor] | None = None) -> None:
    """Which activations S drops: "magnitude" (|x| <= tau) or "weighted" (|x| * c <= tau, with c
    given per projection or computed from W now)."""
    if criterion not in CRITERIA:
        raise SponError(f"unknown criterion {criterion!r}; choose one of {CRITERIA}")
    for m in sparse_linears(model):
        if criterion == "magnitude":
            m.channel_norm = None
            continue
        c = column_norms(m.linear.weight) if channel_norms is None else channel_norms.get(m.name)
        if c is None or c.shape != (m.linear.in_features,):
            raise SponError(f"{m.name}: channel norms must have {m.linear.in_features} entries, "
                            f"got {None if c is None else tuple(c.shape)}")
        m.channel_norm = c.detach().to(device=m.linear.weight.device, dtype=torch.float32).clone()


def channel_norms(model) -> dict[str, torch.Tensor]:
    """The weighted criterion's c of every sparse linear that has one (what a checkpoint stores)."""
    return {m.name: m.channel_norm.detach().cpu().contiguous() for m in sparse_linears(model)
            if m.channel_norm is not None}


def set_thresholds(model, thresholds: dict[str, float], teal: dict[str, float] | None = None) -> None:
    """tau per projection, for TEAL and SPON alike; with `teal`, SPON runs `thresholds` and TEAL
    its own `teal` (thresholds re-taken with alpha in place: spon.thresholds.retake_thresholds_)."""
    mods = by_name(model)
    for what, taus in (("thresholds", thresholds), ("TEAL thresholds", teal or {})):
        missing = set(taus) - set(mods)
        if missing:
            raise SponError(f"{what} name projections the model does not have: {sorted(missing)[:5]}")
    for name, tau in thresholds.items():
        mods[name].threshold.fill_(float(tau))
        mods[name].teal_threshold = None
    for name, tau in (teal or {}).items():
        m = mods[name]
        m.teal_threshold = None if float(tau) == float(m.threshold) else torch.tensor(float(tau), device=m.threshold.device)


def invalid_threshold(taus: dict) -> str | None:
    """The first name in `taus` whose tau is not a finite number >= 0 (None: all are)."""
    return next((n for n, v in taus.items()
                 if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf")), None)


def thresholds_of(model, which: str = "spon") -> dict[str, float]:
    """tau per projection: "spon" (what the model runs in spon mode, and what a checkpoint ships)
    or "teal" (the baseline's own; the same unless SPON's were re-taken)."""
    return {m.name: float(m.teal_threshold if which == "teal" and m.teal_threshold is not None else m.threshold)
            for m in sparse_linears(model)}


def alphas(model) -> dict[str, torch.Tensor]:
    return {m.name: m.alpha.detach().clone() for m in sparse_linears(model)}


def load_alphas(model, state: dict[str, torch.Tensor]) -> None:
    mods = by_name(model)
    for name, a in state.items():
        if name not in mods:
            raise SponError(f"alpha for unknown projection {name!r}")
        mods[name].alpha.data.copy_(a.to(mods[name].alpha.dtype))


@contextmanager
def counting_zeros(model) -> Iterator[dict]:
    """Measure realized sparsity: fraction of sparse-linear inputs that S() zeroes.

    Yields a dict filled on exit with the per-projection fractions and the weight-size-weighted
    overall fraction (what decode speed depends on: skipped weight bytes).
    """
    mods = sparse_linears(model)
    for m in mods:
        m.count_zeros, m.zeros, m.seen = True, 0, 0
    result: dict = {}
    try:
        yield result
    finally:
        for m in mods:
            m.count_zeros = False
        per = {m.name: m.zeros / m.seen for m in mods if m.seen}
        sizes = {m.name: m.linear.weight.numel() for m in mods if m.seen}
        total = sum(sizes.values())
        result["per_projection"] = per
        result["weighted"] = sum(per[n] * sizes[n] for n in per) / total if total else 0.0
        result["mean"] = sum(per.values()) / len(per) if per else 0.0


@torch.no_grad()
def realized_sparsity(model, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Fraction of the sparse linears' inputs that S zeroes on `blocks` (TEAL mode), weighted by
    weight size: what decode speed depends on (the weight bytes skipped)."""
    device = next(model.parameters()).device
    with mode(model, "teal"), counting_zeros(model) as z:
        for i in range(0, len(blocks), batch_size):
            model(blocks[i : i + batch_size].to(device), use_cache=False)
    return z["weighted"]
