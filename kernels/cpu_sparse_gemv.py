"""CPU activation-sparse decode path: y = S(x) @ Wᵀ + b reading only surviving rows.

Torch reference: ``kernels/reference.py`` (``sparse_linear_reference``).

Decode (1-8 rows) runs the native op (``csrc/cpu_sparse_gemv.cpp``, built by
``cpu_native.py``): threshold test, gather-scale-reduce over the rows of Wᵀ
that some batch row keeps (each read once for the batch), int8 scales, bias
and cast in one pass; fp32/fp16/bf16 activations with weights of the same
dtype or int8 (1 byte per weight read).  When it cannot be built, the
embedding_bag path below is used.

Why embedding_bag: with Wᵀ ``[in, out]`` contiguous, every surviving input
feature k contributes ``x[k] * Wᵀ[k, :]`` — a scaled contiguous row.  That is
exactly ``F.embedding_bag(idx, Wᵀ, mode="sum", per_sample_weights=x[idx])``:
a fused gather-scale-reduce that streams each surviving row from memory once
and never materialises the gathered rows.  ``Wᵀ[idx] @ …`` would copy the rows
first (read + write + read again) and loses to dense.  embedding_bag
parallelises over *bags*, so the surviving rows are cut into several bags
(both cores stream different rows) and the per-bag partial outputs — tiny,
``[bags, out]`` — are summed in fp32.  fp32, fp16 and bf16 tables are all
supported by the CPU kernel.

Batch > 1 on this fallback: every batch row gets its own bags over its own
surviving rows, all in one embedding_bag call.  This reads ``sum_b nnz_b``
rows, which beats dense only while that stays below the weight matrix; past
that the dense masked matmul (which reads Wᵀ once for the whole batch) is
used instead.  (The native op's batching rule: ``_native_pays``.)

int8 weights without the native op: embedding_bag has no int8 table, so the
path gathers only the surviving int8 rows (1 byte/weight) and multiplies
after upcasting; a correctness path, not a tuned one.

Thresholds: a float per projection, or a per-input-channel vector (fp32
``[K]``; fused: ``[nseg, K]``), the weighted criterion's
``tau / ||W[:, k]||``.  The native op takes the vectors as they are; on the
embedding_bag path a vector only changes the mask (``keep_mask`` in fp32).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .cpu_native import native_op
from .reference import dequantize_weight_int4_t, keep_mask, unpack_int4

MAX_BATCH = 8
# Rows per bag: enough that per-bag overhead and the final partial sum are
# negligible, small enough that the bags balance across threads.  Tuned on a
# 2-core EPYC with dense and sparse timed interleaved (so neither runs from a
# warm L3): 256 rows / at most 32 bags was within noise of the best fixed bag
# count for each of fp32/bf16 x 4096->14336 / 14336->4096 (kernels/README.md,
# `--bag-rows` in kernels/bench.py).
ROWS_PER_BAG = 256
MAX_BAGS = 32


SERIAL_BYTES = 1 << 20  # below ~1 MiB of rows to read, threading costs more than it saves


def _num_bags(nnz: int, rows_per_bag: int, row_bytes: int = 0) -> int:
    if nnz * row_bytes < SERIAL_BYTES:
        return 1
    threads = torch.get_num_threads()
    nb = min(MAX_BAGS, max(threads, nnz // rows_per_bag))
    return max(1, min(nb, nnz))


@functools.lru_cache(maxsize=4096)
def _native_threshold(threshold: float, dtype: torch.dtype) -> float:
    """floor_d(tau): the largest value of float dtype d that is <= tau, as a
    Python float (exactly representable in d, so ``x > it`` rounds nothing).
    Cached: thresholds are per-layer constants, and on this path every tensor
    op counts (see ``cpu_sparse_gemv``)."""
    t = torch.tensor(threshold, dtype=torch.float32)
    td = t.to(dtype)
    if td.float() > t:  # rounded up: step one ulp down (td > 0 here, so bits - 1)
        bits = td.view(torch.int16)
        td = (bits - 1).view(dtype)
    return float(td)


def _keep_mask_native(x: Tensor, threshold: float | Tensor) -> Tensor:
    """keep_mask(x, tau) without upcasting x: for x in a float dtype d,
    fp32(x) > tau  <=>  x > floor_d(tau), the largest d-value <= tau.  Saves an
    fp32 copy of x per call (tens of microseconds on a 14336-wide input).
    A per-channel vector tau is compared in fp32 as it is (the fallback: correct, not tuned)."""
    if isinstance(threshold, Tensor) or x.dtype == torch.float32 or not (threshold >= 0.0):
        return keep_mask(x, threshold)
    return x.abs() > _native_threshold(threshold, x.dtype)


def _bag_offsets(counts: list[int], nb: int) -> Tensor:
    """nb bags per batch row, splitting each row's surviving indices evenly."""
    offs: list[int] = []
    start = 0
    for c in counts:
        step = -(-c // nb) if c else 0
        offs.extend(start + min(j * step, c) for j in range(nb))
        start += c
    return torch.tensor(offs, dtype=torch.long)


def cpu_sparse_gemv(
    x: Tensor,
    weight_t: Tensor,
    bias: Tensor | None,
    threshold: float | Tensor,
    scales: Tensor | None = None,
    rows_per_bag: int | None = None,
) -> Tensor:
    """x: [M, K] (M <= 8) on CPU, weight_t: [K, N] contiguous.  Returns [M, N] in x.dtype.

    ``threshold``: a float (or one-element tensor), or fp32 ``[K]``, one per input
    channel (anything ``normalize_thresholds`` takes for one segment)."""
    assert x.dim() == 2 and x.shape[0] <= MAX_BATCH
    threshold = normalize_thresholds(threshold, 1, x.shape[1])
    op = native_op() if _native_applies(x, weight_t, scales) else None
    if op is None:
        return _embedding_bag_gemv(x, weight_t, bias, threshold[0], scales, rows_per_bag)
    if isinstance(threshold, Tensor):
        if _native_pays(x, threshold, scales):
            return op(x, weight_t, bias, [0.0], [_out_features(weight_t)], scales, threshold)
        return _dense_masked(x, keep_mask(x, threshold[0]), weight_t, bias)
    if _native_pays(x, threshold, scales):
        return op(x, weight_t, bias, threshold, [_out_features(weight_t)], scales)
    return _dense_masked(x, _keep_mask_native(x, threshold[0]), weight_t, bias)


def normalize_thresholds(thresholds, nseg: int, K: int, device=None) -> list[float] | Tensor:
    """One float per segment (a list), or the per-channel form: contiguous fp32
    [nseg, K] on ``device`` (default CPU; what the native op's ``channel_thresholds`` takes).

    Accepts a float, a one-element tensor, a [nseg] tensor, a [K] vector (one
    segment), an [nseg, K] (or shared [1, K]) tensor, or a list of floats / [K]
    vectors (a float item stands for that value on every channel).  A tensor already in the
    target form is returned as it is: this runs on every decode call, where
    each tensor op costs ~1 us against a GEMV of 10-50 us at width 576."""
    if isinstance(thresholds, Tensor):
        n = thresholds.numel()
        if n == 1 or (n == nseg and thresholds.dim() == 1):
            vals = [float(v) for v in thresholds.reshape(-1).tolist()]
            return vals * nseg if len(vals) == 1 else vals
        t = thresholds.detach() if thresholds.requires_grad else thresholds
        if t.dtype != torch.float32 or (not t.is_cpu if device is None else t.device != device):
            t = t.to(device=device or "cpu", dtype=torch.float32)
        if t.dim() == 1 and nseg == 1:
            t = t.view(1, -1)
        elif t.dim() == 2 and t.shape[0] == 1 and nseg > 1:
            t = t.expand(nseg, -1)  # one vector shared by every segment
        if t.shape != (nseg, K):
            raise ValueError(f"thresholds of shape {tuple(thresholds.shape)}: expected [{nseg}] or [{nseg}, {K}]")
        return t if t.is_contiguous() else t.contiguous()
    if not isinstance(thresholds, (list, tuple)):
        return [float(thresholds)] * nseg
    if len(thresholds) == 1:
        thresholds = list(thresholds) * nseg  # one shared
    if len(thresholds) != nseg:
        raise ValueError(f"{len(thresholds)} thresholds for {nseg} segments")
    if not any(isinstance(t, Tensor) and t.numel() > 1 for t in thresholds):
        return [float(t) for t in thresholds]
    rows = []
    for t in thresholds:
        if isinstance(t, Tensor) and t.numel() > 1:
            if t.numel() != K:
                raise ValueError(f"a per-channel threshold has {t.numel()} entries, the input {K}")
            rows.append(t.detach().to(device=device or "cpu", dtype=torch.float32).reshape(K))
        else:
            rows.append(torch.full((K,), float(t), dtype=torch.float32, device=device or "cpu"))
    return torch.stack(rows)


def _dense_masked(x: Tensor, keep: Tensor, weight_t: Tensor, bias: Tensor | None) -> Tensor:
    """Reads all of Wᵀ once for the whole batch."""
    return _add_bias((x * keep) @ weight_t, bias, x.dtype)


def _embedding_bag_gemv(
    x: Tensor, weight_t: Tensor, bias: Tensor | None, threshold: float | Tensor, scales: Tensor | None, rows_per_bag: int | None
) -> Tensor:
    M, K = x.shape
    N = weight_t.shape[1]
    keep = _keep_mask_native(x, threshold)
    if scales is not None:
        return _cpu_int8(x, keep, weight_t, scales, bias)
    assert weight_t.is_contiguous(), "weight_t must be contiguous (use prepare_weight)"

    if M == 1:
        return _gemv_one_row(x, keep, weight_t, bias, rows_per_bag)

    counts = keep.sum(1).tolist()
    if sum(counts) >= K:
        # Per-row bags would read more than all of Wᵀ: dense is cheaper.
        return _dense_masked(x, keep, weight_t, bias)
    rows, idx = keep.nonzero(as_tuple=True)
    vals = x[rows, idx]
    if rows.numel() == 0:
        y = x.new_zeros((M, N))
        return _add_bias(y, bias, x.dtype)
    nb = _num_bags(max(counts), rows_per_bag or ROWS_PER_BAG, N * weight_t.element_size())
    offsets = _bag_offsets(counts, nb)
    part = F.embedding_bag(idx, weight_t, offsets, mode="sum", per_sample_weights=vals)
    # Partials summed with fp32 accumulation (CPU sum accumulates reduced
    # precision in fp32) so many bags do not add bf16 rounding steps.
    y = part.view(M, nb, N).sum(1) if nb > 1 else part.view(M, N)
    return _add_bias(y, bias, x.dtype)


def _gemv_one_row(x: Tensor, keep: Tensor, weight_t: Tensor, bias: Tensor | None, rows_per_bag: int | None) -> Tensor:
    """Batch-1 decode on the fallback.  Every tensor op here runs right after a
    weight stream that evicted the interpreter's and allocator's working set
    from the caches, so each costs 10-80 us instead of 2-5 us (measured on the
    2-core EPYC: 0.5-0.7 ms per call with the general path, against 2.9 ms of
    weight streaming for a bf16 4096x14336 at 50%; why the native op exists).
    Hence: cached threshold, no dtype round trips, one reduction, no copies."""
    N = weight_t.shape[1]
    idx = keep.view(-1).nonzero().view(-1)
    nnz = idx.numel()
    if nnz == 0:
        y = x.new_zeros((1, N))
        return _add_bias(y, bias, x.dtype)
    vals = x.reshape(-1).index_select(0, idx)
    nb = _num_bags(nnz, rows_per_bag or ROWS_PER_BAG, N * weight_t.element_size())
    if nb == 1:
        y = F.embedding_bag(idx.view(1, -1), weight_t, mode="sum", per_sample_weights=vals.view(1, -1))
    else:
        offsets = torch.arange(0, nnz, -(-nnz // nb))
        y = F.embedding_bag(idx, weight_t, offsets, mode="sum", per_sample_weights=vals).sum(0, keepdim=True)
    return _add_bias(y, bias, x.dtype)


# The batching rule on CPU.  The native op reads each weight row that some
# batch row keeps once, but spends one FMA per batch row on it (rows padded to
# 1, 2, 4 or 8), so at 8 rows arithmetic rather than bytes sets its pace; the
# alternative here is the dense masked matmul on Wᵀ (W itself is not kept).
# Measured on the 2-core EPYC at 8 rows, union of kept rows ~100%, native /
# dense-on-Wᵀ ms (4096x14336, 14336x4096): fp32 15.1 / 30.3, 14.9 / 26.0;
# fp16 11.8 / 3098 (no fast fp16 GEMM on CPU); bf16 12.4 / 10.8, 18.1 / 11.7.
# Up to 4 rows the native op wins in every dtype.  So only bf16 at 5-8 rows
# switches to the dense matmul, once the union of kept rows passes ~3/4 of Wᵀ.
NATIVE_MAX_UNION_DENSITY_BF16_8_ROWS = 0.75


def _native_pays(x: Tensor, thresholds: list[float] | Tensor, scales: Tensor | None) -> bool:
    """thresholds: one float per segment, or [nseg, K] per channel."""
    if x.shape[0] <= 4 or x.dtype != torch.bfloat16 or scales is not None:
        return True  # (int8: the dense alternative would dequantize all of Wᵀ)
    if isinstance(thresholds, Tensor):
        # Per channel: the lowest threshold of any segment on each channel
        # (fmin: a NaN entry drops everything, so it does not count).
        tau = functools.reduce(torch.fmin, thresholds.unbind(0))
    else:
        taus = [float(t) for t in thresholds if float(t) == float(t)]  # NaN drops everything
        if not taus:
            return True
        tau = min(taus)
    density = keep_mask(x, tau).any(0).float().mean().item()
    return density < NATIVE_MAX_UNION_DENSITY_BF16_8_ROWS


def _out_features(weight_t: Tensor) -> int:
    return 2 * weight_t.shape[1] if weight_t.dtype == torch.uint8 else weight_t.shape[1]  # packed int4


def _native_applies(x: Tensor, weight_t: Tensor, scales: Tensor | None) -> bool:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not weight_t.is_contiguous():
        return False
    if scales is None:
        return weight_t.dtype == x.dtype
    return weight_t.dtype in (torch.int8, torch.uint8)


def _add_bias(y: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    if bias is not None:
        y = y + bias
    return y if y.dtype == dtype else y.to(dtype)


def _cpu_int8(x: Tensor, keep: Tensor, qweight_t: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """int8 (scales [N]) or packed int4 (uint8, scales [K/group, N]): gather the surviving rows, then
    dequantize only those (a correctness path for when the native op cannot be built)."""
    idx = keep.any(0).nonzero().squeeze(1)
    xs = (x * keep).index_select(1, idx).float()
    if qweight_t.dtype == torch.uint8:
        group = qweight_t.shape[0] // scales.shape[0]
        w = unpack_int4(qweight_t.index_select(0, idx)).float() * scales.float().index_select(0, idx // group)
        y = xs @ w
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)
    y = (xs @ qweight_t.index_select(0, idx).float()) * scales.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def cpu_sparse_gemv_fused(
    x: Tensor,
    weight_t: Tensor,
    bias: Tensor | None,
    thresholds: list[float | Tensor] | Tensor,
    seg_sizes: list[int],
    scales: Tensor | None = None,
) -> Tensor:
    """Concatenated shared-input projections on CPU.

    ``thresholds``: one per segment (floats, [K] vectors, or both), or a
    tensor [nseg] / [nseg, K].  With one shared threshold the concatenated
    rows are one table and a single call reads each surviving row once for all
    projections.  With different thresholds the native op sums each segment's
    columns over its own surviving rows, still one pass; without it the
    segments are column slices of Wᵀ, which embedding_bag would copy
    (non-contiguous table), so each segment uses the dense masked matmul on
    its slice — correct, but without the sparse saving.
    """
    nseg = len(seg_sizes)
    thresholds = normalize_thresholds(thresholds, nseg, x.shape[1])
    if isinstance(thresholds, Tensor):
        shared = bool((thresholds == thresholds[:1]).all())  # NaN rows never count as shared: still correct
    else:
        shared = len(set(thresholds)) == 1
    if shared:
        return cpu_sparse_gemv(x, weight_t, bias, thresholds[0], scales)
    if _native_applies(x, weight_t, scales):
        op = native_op()
        if op is not None and _native_pays(x, thresholds, scales):
            # per-segment thresholds, still one pass over the surviving rows
            if isinstance(thresholds, Tensor):
                return op(x, weight_t, bias, [0.0] * nseg, list(seg_sizes), scales, thresholds)
            return op(x, weight_t, bias, thresholds, list(seg_sizes), scales)
    outs = []
    start = 0
    for n, tau in zip(seg_sizes, thresholds):
        sl = slice(start, start + n)
        xs = x * keep_mask(x, tau)
        if weight_t.dtype == torch.uint8:  # packed int4
            y = xs.float() @ dequantize_weight_int4_t(weight_t[:, start // 2 : (start + n) // 2], scales[:, sl])
        elif scales is None:
            y = xs @ weight_t[:, sl]
        else:
            y = (xs.float() @ weight_t[:, sl].float()) * scales[sl].float()
        if bias is not None:
            y = y + bias[sl]
        outs.append(y.to(x.dtype))
        start += n
    return torch.cat(outs, dim=1)
