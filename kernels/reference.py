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
  only drops exact zeros and ``tau = inf`` drops everything.  ``tau`` may be
  one value or a vector ``[in_features]`` (one threshold per input channel,
  e.g. WINA's ``tau / ||W[:, k]||``), broadcast over the leading dims of x.
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
        threshold = threshold.to(device=x.device, dtype=torch.float32)
    return x.abs().float() > threshold


def threshold_activations(x: Tensor, threshold: float | Tensor) -> Tensor:
    """S(x) = x * 1{|x| > tau}, in x's dtype."""
    return x * keep_mask(x, threshold)


def sparse_linear_reference(
    x: Tensor, weight_t: Tensor, bias: Tensor | None, threshold: float | Tensor
) -> Tensor:
    """y = S(x) @ Wᵀ + b, i.e. ``F.linear(x * (|x| > tau), W, b)``."""
    return F.linear(threshold_activations(x, threshold), weight_t.t(), bias)


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
    y = threshold_activations(x, threshold).float() @ dequantize_weight_t(qweight_t, scales)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def sparse_linear_fused_reference(
    x: Tensor,
    weight_t: Tensor,
    out_features: Sequence[int],
    bias: Tensor | None,
    thresholds: float | Sequence[float | Tensor] | Tensor,
    scales: Tensor | None = None,
) -> Tensor:
    """Concatenated projections sharing one input; segment i uses thresholds[i].

    ``thresholds``: one value for all segments, one per segment (floats, or
    ``[in_features]`` vectors, mixed freely), or a tensor ``[nseg]`` or
    ``[nseg, in_features]``.  Returns the concatenated output ``[..., sum(out_features)]``.
    """
    out_features = list(out_features)
    thresholds = _per_segment(thresholds, len(out_features))
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


def _per_segment(thresholds, nseg: int) -> list:
    """One threshold (float, 0-d tensor or [K] vector) per segment."""
    if isinstance(thresholds, Tensor):
        if thresholds.numel() == 1:
            return [thresholds.reshape(())] * nseg
        if thresholds.dim() == 1 and nseg == 1:
            return [thresholds]  # one segment's [K] vector, not K segments
        thresholds = list(thresholds)  # [nseg] -> 0-d items, [nseg, K] -> [K] rows
    elif not isinstance(thresholds, (list, tuple)):
        return [thresholds] * nseg
    if len(thresholds) == 1:
        return list(thresholds) * nseg  # one shared
    if len(thresholds) != nseg:
        raise ValueError(f"{len(thresholds)} thresholds for {nseg} segments")
    return list(thresholds)
