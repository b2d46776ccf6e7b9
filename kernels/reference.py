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
* int4 weights are symmetric and group-wise along the input: ``Wᵀ[k, n] ≈ q[k, n] *
  scales[k // group, n]`` with ``q`` in -8..7, stored as unsigned nibbles ``q + 8``, two per
  byte, ``[in, out / 2]`` uint8: 32 output columns per 16-byte block, byte ``i`` of a block
  holding column ``i`` in its low nibble and column ``i + 16`` in its high one (so one 16-byte
  load widens to two 16-lane vectors).  ``out`` (and every fused segment) is a multiple of 32.
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
        b = None if bias is None else bias[start : start + n]
        if weight_t.dtype == torch.uint8:  # packed int4: 32-column blocks, segments a multiple of 32
            wt = weight_t[:, start // 2 : (start + n) // 2]
            outs.append(sparse_linear_int4_reference(x, wt, scales[:, start : start + n], b, tau))
            start += n
            continue
        wt = weight_t[:, start : start + n]
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


INT4_BLOCK = 32  # output columns per 16-byte block of packed int4
INT4_GROUP = 64  # default input rows per scale


def int4_out_features(qweight_t: Tensor) -> int:
    """Output columns of a packed int4 Wᵀ ``[in, out / 2]``."""
    return 2 * qweight_t.shape[1]


def pack_int4(q: Tensor) -> Tensor:
    """int values in -8..7, ``[K, N]`` (N a multiple of 32) -> packed uint8 ``[K, N / 2]``."""
    K, N = q.shape
    if N % INT4_BLOCK:
        raise ValueError(f"int4 needs out_features a multiple of {INT4_BLOCK}, got {N}")
    u = (q.to(torch.int16) + 8).to(torch.uint8).view(K, N // INT4_BLOCK, 2, 16)
    return (u[:, :, 0, :] | (u[:, :, 1, :] << 4)).reshape(K, N // 2).contiguous()


def unpack_int4(qweight_t: Tensor) -> Tensor:
    """Packed uint8 ``[K, N / 2]`` -> int8 values in -8..7, ``[K, N]``."""
    K, half = qweight_t.shape
    b = qweight_t.view(K, half // 16, 16)
    u = torch.stack([b & 15, b >> 4], dim=2)  # [K, blocks, 2, 16]
    return (u.to(torch.int8) - 8).reshape(K, 2 * half)


def quantize_weight_int4(weight: Tensor, group_size: int = INT4_GROUP) -> tuple[Tensor, Tensor]:
    """Symmetric group-wise int4 of an nn.Linear weight ``[out, in]``: returns (qweight_t uint8
    ``[in, out / 2]`` packed, scales fp32 ``[in / group_size, out]``).

    Each group of ``group_size`` consecutive inputs has one scale per output column,
    ``max |W| / 7`` over the group; ``q = round(W / scale)`` in -7..7."""
    w = weight.detach().float().t()  # [K, N]
    K, N = w.shape
    if K % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide in_features {K}")
    g = w.reshape(K // group_size, group_size, N)
    scales = g.abs().amax(dim=1).clamp_min(1e-12) / 7.0  # [K / G, N]
    q = torch.round(g / scales[:, None, :]).clamp_(-8, 7).reshape(K, N)
    return pack_int4(q), scales.contiguous()


def dequantize_weight_int4_t(qweight_t: Tensor, scales: Tensor) -> Tensor:
    """Wᵀ in fp32 ``[in, out]`` from the packed int4 layout."""
    q = unpack_int4(qweight_t).float()
    group = q.shape[0] // scales.shape[0]
    return q * scales.float().repeat_interleave(group, dim=0)


def sparse_linear_int4_reference(
    x: Tensor, qweight_t: Tensor, scales: Tensor, bias: Tensor | None, threshold: float | Tensor
) -> Tensor:
    """fp32 math on the dequantized int4 weight, cast back to x's dtype."""
    y = threshold_activations(x, threshold).float() @ dequantize_weight_int4_t(qweight_t, scales)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
