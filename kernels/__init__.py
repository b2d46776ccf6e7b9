"""Activation-sparse linear kernels (TEAL-style) for spon.

Stable API (all take ``weight_t`` = Wᵀ ``[in, out]`` from ``prepare_weight``):

    prepare_weight(weight[out, in]) -> weight_t[in, out]
    sparse_linear(x[..., in], weight_t, bias=None, threshold=0.0) -> y[..., out]
    sparse_linear_reference(x, weight_t, bias, threshold) -> y
    quantize_weight_int8(weight[out, in]) -> (qweight_t[in, out] int8, scales[out] fp32)
    sparse_linear_int8(x, qweight_t, scales, bias=None, threshold=0.0) -> y
    quantize_weight_int4(weight[out, in], group_size=64) -> (qweight_t[in, out/2] uint8, scales[in/group, out] fp32)
    sparse_linear_int4(x, qweight_t, scales, bias=None, threshold=0.0) -> y
    prepare_weight_fused([W_q, W_k, W_v]) -> weight_t_cat[in, sum(out_i)]
    sparse_linear_fused(x, weight_t_cat, out_features, biases=None, thresholds=0.0,
                        scales=None) -> tuple of y_i
    SparseGemvLinear  (nn.Module wrapper, SparseGemvLinear.from_linear(linear, threshold);
                       not spon.sparse.SparseLinear, the method's module)

``threshold`` is a float, a 0-d/1-element tensor, or an fp32 ``[in]`` vector (one
threshold per input channel, e.g. the weighted criterion's tau / ||W[:, k]||);
S(x) = x * 1{|x| > threshold}, compared in fp32.  ``sparse_linear_fused`` takes one
per projection (floats and/or ``[in]`` vectors), or a tensor ``[nseg]`` / ``[nseg, in]``.
Dispatch: CUDA -> Triton; CPU with <= 8 rows -> native op (embedding_bag if it cannot be built);
otherwise (or when autograd needs gradients) -> torch reference.

Importing this package imports torch only: the custom op (``ops.py``, which
registers ``torch.ops.spon_kernels.sparse_gemv``) and triton are imported on the
first call that needs them, or on first access to ``ops`` / ``HAS_TRITON``
(``import spon`` imports ``spon.kernels.reference`` and must stay cheap).
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

import torch
from torch import Tensor, nn

from .reference import (
    dequantize_weight_int4_t,
    dequantize_weight_t,
    int4_out_features,
    quantize_weight_int4,
    quantize_weight_int8,
    sparse_linear_fused_reference,
    sparse_linear_int4_reference,
    sparse_linear_int8_reference,
    sparse_linear_reference,
    threshold_activations,
)

MAX_BATCH = 8  # rows a decode kernel takes (Triton and the native CPU op); more: the torch reference

__all__ = [
    "HAS_TRITON",
    "MAX_BATCH",
    "SparseGemvLinear",
    "dequantize_weight_int4_t",
    "dequantize_weight_t",
    "prepare_weight",
    "prepare_weight_fused",
    "quantize_weight_int4",
    "quantize_weight_int8",
    "sparse_linear",
    "sparse_linear_fused",
    "sparse_linear_fused_reference",
    "sparse_linear_int4",
    "sparse_linear_int4_reference",
    "sparse_linear_int8",
    "sparse_linear_int8_reference",
    "sparse_linear_reference",
    "threshold_activations",
]


def __getattr__(name: str):
    """``ops`` (the registered custom op) and ``HAS_TRITON`` (probes triton) on first access."""
    if name == "ops":
        return importlib.import_module(f"{__name__}.ops")
    if name == "HAS_TRITON":
        from .triton_sparse_gemv import HAS_TRITON

        return HAS_TRITON
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def prepare_weight(weight: Tensor) -> Tensor:
    """nn.Linear weight [out, in] -> Wᵀ [in, out] contiguous (the kernels' layout)."""
    return weight.detach().t().contiguous()


def prepare_weight_fused(weights: Sequence[Tensor]) -> Tensor:
    """Projections sharing one input ([out_i, in] each) -> concatenated Wᵀ [in, sum(out_i)]."""
    return torch.cat([w.detach() for w in weights], dim=0).t().contiguous()


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in ts)


def _ops_module():
    m = sys.modules.get(f"{__name__}.ops")
    return m if m is not None else importlib.import_module(f"{__name__}.ops")


def _cpu_module():
    m = sys.modules.get(f"{__name__}.cpu_sparse_gemv")
    return m if m is not None else importlib.import_module(f"{__name__}.cpu_sparse_gemv")


def _scalar_taus(threshold, nseg: int) -> list[float] | None:
    """One float per segment when every threshold is a scalar (float, 1-element tensor, or a list
    of those); None for per-channel vectors (the general path normalizes those)."""
    if isinstance(threshold, (float, int)):
        return [float(threshold)] * nseg
    if isinstance(threshold, Tensor):
        return [float(threshold)] * nseg if threshold.numel() == 1 else None
    if isinstance(threshold, (list, tuple)) and len(threshold) in (1, nseg):
        if all(isinstance(t, (float, int)) or (isinstance(t, Tensor) and t.numel() == 1) for t in threshold):
            taus = [float(t) for t in threshold]
            return taus * nseg if len(taus) == 1 else taus
    return None


def _call(x, weight_t, bias, threshold, seg_sizes, scales):
    K = weight_t.shape[0]
    N = sum(seg_sizes)
    flat = x.dim() == 2
    lead = x.shape[:-1]
    x2 = x if flat else x.reshape(-1, K)
    if x2.device.type == "cpu" and 1 <= x2.shape[0] <= 4 and not torch.compiler.is_compiling():
        # Decode on CPU with scalar thresholds: straight to the native op.  The general dispatch
        # below (argument normalisation, batching rule) costs ~10 us of Python a call, as much as
        # a 576-wide GEMV; up to 4 rows the native op is always the path it would pick.
        cpu = _cpu_module()
        taus = _scalar_taus(threshold, len(seg_sizes))
        if taus is not None and cpu._native_applies(x2, weight_t, scales):
            op = cpu.native_op()
            if op is not None:
                y = op(x2, weight_t, bias, taus, seg_sizes, scales)
                return y if flat else y.reshape(*lead, N)
    _ops = _ops_module()  # registers torch.ops.spon_kernels.sparse_gemv on first use
    if torch.compiler.is_compiling():
        # One opaque node in the graph (schema + fake impl registered in ops.py).
        taus = _ops.thresholds_tensor(threshold, len(seg_sizes), x.device, K)
        y = torch.ops.spon_kernels.sparse_gemv(x2, weight_t, bias, taus, list(seg_sizes), scales)
    else:
        y = _ops.dispatch(x2, weight_t, bias, threshold, list(seg_sizes), scales)
    return y.reshape(*lead, N)


def sparse_linear(
    x: Tensor, weight_t: Tensor, bias: Tensor | None = None, threshold: float | Tensor = 0.0
) -> Tensor:
    """y = (x * 1{|x| > threshold}) @ weight_t + bias, reading only needed rows of weight_t."""
    if _needs_grad(x, weight_t, bias):
        return sparse_linear_reference(x, weight_t, bias, threshold)
    return _call(x, weight_t, bias, threshold, [weight_t.shape[1]], None)


def sparse_linear_int8(
    x: Tensor,
    qweight_t: Tensor,
    scales: Tensor,
    bias: Tensor | None = None,
    threshold: float | Tensor = 0.0,
) -> Tensor:
    """Sparse x times int8 Wᵀ with per-output-channel scales (from quantize_weight_int8)."""
    if _needs_grad(x, bias):
        return sparse_linear_int8_reference(x, qweight_t, scales, bias, threshold)
    return _call(x, qweight_t, bias, threshold, [qweight_t.shape[1]], scales)


def sparse_linear_int4(
    x: Tensor,
    qweight_t: Tensor,
    scales: Tensor,
    bias: Tensor | None = None,
    threshold: float | Tensor = 0.0,
) -> Tensor:
    """Sparse x times group-wise int4 Wᵀ (packed, from quantize_weight_int4; scales [in/group, out])."""
    if _needs_grad(x, bias):
        return sparse_linear_int4_reference(x, qweight_t, scales, bias, threshold)
    return _call(x, qweight_t, bias, threshold, [int4_out_features(qweight_t)], scales)


def sparse_linear_fused(
    x: Tensor,
    weight_t: Tensor,
    out_features: Sequence[int],
    biases: Tensor | Sequence[Tensor | None] | None = None,
    thresholds: float | Sequence[float | Tensor] | Tensor = 0.0,
    scales: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """Projections sharing input x (q/k/v, gate/up) in one launch.

    weight_t: from ``prepare_weight_fused`` (or the int8 quantization of the
    concatenated weight, with ``scales``).  thresholds: one shared, or one per
    projection, each a float or an fp32 ``[in]`` vector (per input channel);
    or a tensor ``[nseg]`` / ``[nseg, in]``.  biases: concatenated bias,
    per-projection list (None entries allowed), or None.  Returns one output
    per projection (views).
    """
    out_features = [int(n) for n in out_features]
    bias = _concat_bias(biases, out_features, weight_t, x)
    if _needs_grad(x, weight_t, bias):
        y = sparse_linear_fused_reference(x, weight_t, out_features, bias, thresholds, scales)
    else:
        y = _call(x, weight_t, bias, thresholds, out_features, scales)
    return tuple(torch.split(y, out_features, dim=-1))


def _concat_bias(biases, out_features, weight_t, x):
    if biases is None or isinstance(biases, Tensor):
        return biases
    if all(b is None for b in biases):
        return None
    dtype = x.dtype
    return torch.cat(
        [b if b is not None else torch.zeros(n, dtype=dtype, device=x.device) for b, n in zip(biases, out_features)]
    )


class SparseGemvLinear(nn.Module):
    """Drop-in for nn.Linear at inference: y = sparse_linear(x, Wᵀ, b, threshold).

    Named apart from ``spon.sparse.SparseLinear`` (the method's module, which wraps an
    nn.Linear and is routed to these kernels by ``spon.kernel_backend.use_kernels``).

    ``threshold``: a float, or an fp32 ``[in_features]`` vector (kept as a buffer)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, threshold: float | Tensor = 0.0):
        super().__init__()
        self.register_buffer("weight_t", prepare_weight(weight))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        if isinstance(threshold, Tensor) and threshold.numel() > 1:
            self.register_buffer("threshold", threshold.detach().float().reshape(-1).clone())
        else:
            self.threshold = float(threshold)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float | Tensor = 0.0) -> "SparseGemvLinear":
        return cls(linear.weight, linear.bias, threshold)

    @property
    def in_features(self) -> int:
        return self.weight_t.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight_t.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        return sparse_linear(x, self.weight_t, self.bias, self.threshold)

    def extra_repr(self) -> str:
        t = self.threshold
        t = f"per-channel [{t.numel()}]" if isinstance(t, Tensor) else t
        return f"in_features={self.in_features}, out_features={self.out_features}, threshold={t}"
