"""torch.library registration of the sparse GEMV as one custom op.

``spon_kernels::sparse_gemv`` is opaque to torch.compile (captured as a single
node, with a fake/meta implementation for shape propagation), and its schema
is derived from the Python type annotations by ``torch.library.custom_op`` —
no sys.path tricks, no monkeypatching.  (No ``from __future__ import
annotations`` here: schema inference reads the real annotation objects.)

Device dispatch happens inside the op, so compiled graphs keep one node:
  * CUDA (triton importable, <= 8 rows)   -> Triton kernel
  * CPU, <= 8 rows                        -> CPU decode path (native op)
  * anything else                         -> torch reference (dense masked)
"""
from typing import Optional

import torch
from torch import Tensor

from . import cpu_sparse_gemv as _cpu
from . import reference as _ref
from .triton_sparse_gemv import HAS_TRITON, MAX_BATCH, triton_sparse_gemv


def _reference(x, weight_t, bias, taus, seg_sizes, scales):
    if len(seg_sizes) == 1:
        if weight_t.dtype == torch.uint8:
            return _ref.sparse_linear_int4_reference(x, weight_t, scales, bias, taus[0])
        if scales is None:
            return _ref.sparse_linear_reference(x, weight_t, bias, taus[0])
        return _ref.sparse_linear_int8_reference(x, weight_t, scales, bias, taus[0])
    return _ref.sparse_linear_fused_reference(x, weight_t, seg_sizes, bias, taus, scales)


def thresholds_tensor(threshold, n: int, device, K: int | None = None) -> Tensor:
    """float | sequence | tensor -> fp32 tensor on device (what the kernel reads):
    [n], one per segment, or [n, K], one per segment and input channel.

    Per channel: a [K] tensor for one segment, an [n, K] tensor, or a list
    whose items are floats or [K] tensors.  Tensors are reshaped, never read
    on the host, so torch.compile traces through."""
    if isinstance(threshold, (list, tuple)) and any(isinstance(t, Tensor) and t.numel() > 1 for t in threshold):
        t = torch.stack([
            t.detach().to(device=device, dtype=torch.float32).reshape(K)
            if isinstance(t, Tensor) and t.numel() > 1
            else torch.full((K,), float(t), dtype=torch.float32, device=device)
            for t in threshold
        ])
        return t.expand(n, -1).contiguous() if t.shape[0] == 1 else t  # one vector shared
    if isinstance(threshold, Tensor):
        t = threshold.detach().to(device=device, dtype=torch.float32)
        if t.dim() == 2 or (t.dim() == 1 and n == 1 and t.numel() > 1):
            return t.reshape(-1, t.shape[-1]).expand(n, -1).contiguous()  # per channel ([1, K]: shared)
        t = t.reshape(-1)
        return t.expand(n).contiguous() if t.numel() == 1 and n > 1 else t
    if isinstance(threshold, (list, tuple)):
        return torch.tensor([float(v) for v in threshold], dtype=torch.float32, device=device)
    return torch.full((n,), float(threshold), dtype=torch.float32, device=device)


def dispatch(x, weight_t, bias, threshold, seg_sizes, scales):
    """The op's implementation; eager callers use it directly.

    ``torch.ops`` dispatch of a Python custom op costs ~0.1 ms per call on
    CPU, comparable to a whole small GEMV, so the public API only goes
    through the registered op while torch.compile is tracing.
    """
    M, K = x.shape
    if M == 0:
        return x.new_empty((0, sum(seg_sizes)))
    if x.is_cuda and HAS_TRITON and M <= MAX_BATCH:
        taus = thresholds_tensor(threshold, len(seg_sizes), x.device, K)
        return triton_sparse_gemv(x, weight_t, bias, taus, list(seg_sizes), scales)
    # floats, one per segment, or [nseg, K] per channel
    taus = _cpu.normalize_thresholds(threshold, len(seg_sizes), K, x.device)
    if x.device.type == "cpu" and M <= _cpu.MAX_BATCH:
        if len(seg_sizes) == 1:
            return _cpu.cpu_sparse_gemv(x, weight_t, bias, taus, scales)  # [tau] or [1, K]: as normalized
        return _cpu.cpu_sparse_gemv_fused(x, weight_t, bias, taus, list(seg_sizes), scales)
    return _reference(x, weight_t, bias, taus, list(seg_sizes), scales)


@torch.library.custom_op("spon_kernels::sparse_gemv", mutates_args=())
def sparse_gemv(
    x: Tensor,
    weight_t: Tensor,
    bias: Optional[Tensor],
    thresholds: Tensor,
    seg_sizes: list[int],
    scales: Optional[Tensor],
) -> Tensor:
    """y[M, N] = concat_s( S_{tau_s}(x) @ Wᵀ[:, seg_s] ) (* scales) + bias.

    x: [M, K]; weight_t: [K, N] (x.dtype, or int8 with ``scales`` [N] fp32, or packed int4
    uint8 [K, N/2] with ``scales`` [K/group, N] fp32);
    thresholds: fp32 [len(seg_sizes)] (or [1]), or [len(seg_sizes), K] (one
    per segment and input channel); seg_sizes sum to N.
    """
    return dispatch(x, weight_t, bias, thresholds, seg_sizes, scales)


@sparse_gemv.register_fake
def _sparse_gemv_fake(x, weight_t, bias, thresholds, seg_sizes, scales):
    torch._check(x.shape[1] == weight_t.shape[0])
    n = weight_t.shape[1] * 2 if weight_t.dtype == torch.uint8 else weight_t.shape[1]
    return x.new_empty((x.shape[0], n))
