"""Torch references for every kernel in this package.

These are the ground truth the Triton kernels (``triton_sparse_gemv.py``) and
the CPU decode path (``cpu_sparse_gemv.py``) are tested against, and the
fallback used when neither fast path applies (autograd, large batches).

Conventions shared by all kernels:

* ``weight_t`` is Wᵀ, shape ``[in_features, out_features]``, contiguous.  Row
  ``k`` of Wᵀ holds every weight that multiplies input feature ``k``, so a
  dropped activation means one contiguous row that is never read.
* The sparsifier is ``S(x) = x * 1{|x| > tau}`` (strict ``>``, compared in
  fp32), so ``tau = 0``
  only drops exact zeros and ``tau = inf`` drops everything.
* int8 weights are symmetric per-output-channel: ``W ≈ q * scales[:, None]``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def keep_mask(x: Tensor, threshold: float | Tensor) -> Tensor:
    """1{|x| > tau}, compared in fp32 on every path.

    ``bf16_tensor > python_float`` would round tau to bf16 first; the Triton
    kernel compares in fp32, so all paths do, to agree on boundary elements.
    """
    if isinstance(threshold, Tensor):
        threshold = threshold.float()
    return x.abs().float() > threshold


def sparsify(x: Tensor, threshold: float | Tensor) -> Tensor:
    """S(x) = x * 1{|x| > tau}, in x's dtype."""
    return x * keep_mask(x, threshold)


def sparse_linear_reference(
    x: Tensor, weight_t: Tensor, bias: Tensor | None, threshold: float | Tensor
) -> Tensor:
    """y = S(x) @ Wᵀ + b, i.e. ``F.linear(x * (|x| > tau), W, b)``."""
    return F.linear(sparsify(x, threshold), weight_t.t(), bias)


def quantize_weight_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: returns (qweight_t [in, out] int8, scales [out] fp32).

    W[n, k] ≈ qweight_t[k, n] * scales[n].  The scale multiplies whole output
    columns, so it commutes with the sum over k and kernels apply it once per
    output element, after the (sparse) reduction.
    """
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.t().contiguous(), scales.contiguous()


def dequantize_weight_t(qweight_t: Tensor, scales: Tensor) -> Tensor:
    """Wᵀ in fp32 from the int8 layout."""
    return qweight_t.float() * scales.float()[None, :]


def sparse_linear_int8_reference(
    x: Tensor, qweight_t: Tensor, scales: Tensor, bias: Tensor | None, threshold: float | Tensor
) -> Tensor:
    """fp32 math on the dequantized weight, cast back to x's dtype."""
    y = sparsify(x, threshold).float() @ dequantize_weight_t(qweight_t, scales)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def sparse_linear_fused_reference(
    x: Tensor,
    weight_t: Tensor,
    out_features: Sequence[int],
    bias: Tensor | None,
    thresholds: Sequence[float],
    scales: Tensor | None = None,
) -> Tensor:
    """Concatenated projections sharing one input; segment i uses thresholds[i].

    Returns the concatenated output ``[..., sum(out_features)]``.
    """
    outs = []
    start = 0
    for n, tau in zip(out_features, thresholds):
        wt = weight_t[:, start : start + n]
        b = None if bias is None else bias[start : start + n]
        if scales is None:
            outs.append(sparse_linear_reference(x, wt, b, tau))
        else:
            outs.append(sparse_linear_int8_reference(x, wt, scales[start : start + n], b, tau))
        start += n
    return torch.cat(outs, dim=-1)
