"""Triton activation-sparse GEMV: y = S(x) @ Wᵀ + b with the threshold fused.

Torch reference: ``kernels/reference.py`` (``sparse_linear_reference`` and friends).

Design (see kernels/README.md for the long version):

* Layout.  Wᵀ ``[K=in, N=out]`` is stored contiguous (TEAL's column-major W).
  Input feature k owns row k of Wᵀ; a program loads a ``[BLOCK_K, BLOCK_N]``
  tile with a per-row mask, so the rows of dropped features are masked out of
  the load and never leave HBM.  Each surviving row chunk is BLOCK_N
  contiguous elements (128 B for fp16 at BLOCK_N=64), so loads stay coalesced.
* Threshold fused.  x is loaded raw, ``|x| > tau`` is computed in-register,
  no sparsified copy of x is ever written.
* Batch 1..8.  A weight row is skipped only when *every* batch row drops that
  feature (``max`` over the batch axis of the keep mask).  Batch 1 uses a
  broadcast-multiply + sum (pure GEMV); batch > 1 pads the batch to 16 and
  uses ``tl.dot`` (tensor cores; padding rows are masked loads, free).
* bf16.  TEAL is fp16-only because it splits K across programs and combines
  with ``atomic_add`` on the fp16 output (no bf16 atomics on older GPUs).  We
  never atomically add into the output: with split-K each program writes its
  fp32 partial sums to a ``[SPLIT_K, M, N]`` workspace and a second tiny
  kernel sums the splits, adds the bias and casts.  That works for any
  dtype, is deterministic, and is safe to re-run under autotuning.  When the
  output tiles alone fill the GPU (SPLIT_K == 1) the first kernel writes the
  final result directly and the second launch is skipped.
* Fused shared-input projections (q/k/v, gate/up).  Wᵀ of the projections is
  concatenated along N and described by segments (start, length, threshold).
  Grid axis 2 is the segment; a tile never straddles segments, so each
  projection keeps its own threshold (and its own skipped rows).
* Per-channel thresholds (the weighted criterion |x_k| * ||W[:, k]|| > tau,
  i.e. tau_k = tau / ||W[:, k]||): thresholds ``[NSEG, K]`` instead of
  ``[NSEG]``; with PER_CHANNEL the K loop loads the segment's ``BLOCK_K``
  thresholds next to the x chunk (K floats per segment, against K rows of Wᵀ).
* int4 weight-only (group-wise).  Wᵀ is packed uint8 ``[K, N/2]`` (32 columns per 16-byte
  block: byte i holds column i in its low nibble, column i + 16 in its high one; nibble = q + 8)
  with fp32 scales ``[K / GROUP, N]``; a tile loads the byte of each (row, column), shifts out
  its nibble and dequantizes in registers (``(u - 8) * scale[k // GROUP, n]``), so a dropped row
  moves no bytes, as for the other formats.
* int8 weight-only.  Wᵀ is int8 with per-output-channel fp32 scales; the tile
  is converted to the activation dtype in registers (exact for |q| <= 127 in
  fp16 and bf16) and the scale is applied once per output after the reduction.
  Sparse and quantized multiply: int8 halves the bytes per surviving row.
"""
from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

try:  # kernels/ must import on machines without triton
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on bare machines
    triton = None
    tl = None
    HAS_TRITON = False

MAX_BATCH = 8


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if HAS_TRITON:

    def _configs():
        # The interpreter runs every config of an autotuner (and cannot time
        # them); use one fixed config there.  On GPU tune tile shapes only:
        # SPLIT_K is picked on the host because it sizes the workspace.
        if _interpreting():
            return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
        if os.environ.get("SPON_KERNELS_AUTOTUNE", "1") == "0":  # fast compile for test runs
            return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2)]
        return [
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in [
                (64, 64, 4, 2),
                (128, 64, 4, 2),
                (64, 128, 4, 3),
                (256, 32, 4, 2),
            ]
        ]

    @triton.autotune(configs=_configs(), key=["M_PAD", "K", "N", "K_PER_SPLIT", "DIRECT", "PER_CHANNEL", "IS_INT4"])
    # Sizes are not specialised (one binary serves every odd shape / batch);
    # stride_wk is, so aligned Wᵀ rows still get vectorised loads.
    @triton.jit(do_not_specialize=["M", "K", "N", "stride_xm", "K_PER_SPLIT", "GROUP"])
    def _sparse_gemv_kernel(
        x_ptr,  # [M, K] activations (fp32/fp16/bf16), row stride stride_xm, unit col stride
        wt_ptr,  # [K, N_total] Wᵀ (same dtype as x, or int8; int4: uint8 [K, N_total / 2]), row stride stride_wk
        scale_ptr,  # int8: [N_total] fp32 per-output-channel scales; int4: [K / GROUP, N_total]
        bias_ptr,  # [N_total] bias (only read when DIRECT and HAS_BIAS)
        tau_ptr,  # fp32 thresholds: [NSEG], one per segment, or [NSEG, K] with PER_CHANNEL
        seg_start_ptr,  # [NSEG] int32 first output column of each segment
        seg_len_ptr,  # [NSEG] int32 width of each segment
        out_ptr,  # DIRECT: [M, N_total] result; else [SPLIT_K, M, N_total] fp32 partials
        M,
        K,
        N,  # N_total (row length of the output / partials)
        stride_xm,
        stride_wk,
        K_PER_SPLIT,
        GROUP,  # int4: input rows per scale
        M_PAD: tl.constexpr,  # 1 for batch 1 (GEMV), 16 for tl.dot otherwise
        IS_INT8: tl.constexpr,
        IS_INT4: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DIRECT: tl.constexpr,  # SPLIT_K == 1: write final output
        UPCAST_DOT: tl.constexpr,  # interpreter only: its tl.dot mishandles bf16
        IS_FP32: tl.constexpr,  # fp32 activations: exact (ieee) dot, no tf32
        PER_CHANNEL: tl.constexpr,  # tau_ptr is [NSEG, K]: one threshold per input channel
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        seg = tl.program_id(2)
        seg_start = tl.load(seg_start_ptr + seg)
        seg_len = tl.load(seg_len_ptr + seg)
        if pid_n * BLOCK_N >= seg_len:
            return  # grid axis 0 is sized for the widest segment
        if not PER_CHANNEL:
            tau = tl.load(tau_ptr + seg)

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seg_len
        cols = (seg_start + offs_n).to(tl.int64)
        offs_m = tl.arange(0, M_PAD)
        m_mask = offs_m < M

        k_begin = pid_k * K_PER_SPLIT
        k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
        acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_end
            x_mask = m_mask[:, None] & k_mask[None, :]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
            # `& x_mask`: padding must never keep a row (tau may be negative).
            if PER_CHANNEL:
                tau_k = tl.load(tau_ptr + seg * K + offs_k, mask=k_mask, other=float("inf"))
                keep = (tl.abs(x.to(tl.float32)) > tau_k[None, :]) & x_mask
            else:
                keep = (tl.abs(x.to(tl.float32)) > tau) & x_mask
            x = tl.where(keep, x, tl.zeros_like(x))
            # A row of Wᵀ is needed if any batch row keeps its feature.
            row_keep = tl.max(keep.to(tl.int32), axis=0) > 0
            w_mask = row_keep[:, None] & n_mask[None, :]
            if IS_INT4:
                # byte (k, n): block n // 32 of 16 bytes, byte n % 16, nibble (n % 32) // 16
                byte = (cols // 32) * 16 + (cols % 16)
                shift = ((cols % 32) // 16) * 4
                raw = tl.load(wt_ptr + offs_k.to(tl.int64)[:, None] * stride_wk + byte[None, :], mask=w_mask, other=8)
                u = (raw.to(tl.int32) >> shift[None, :]) & 15
                sc = tl.load(
                    scale_ptr + (offs_k // GROUP).to(tl.int64)[:, None] * N + cols[None, :], mask=w_mask, other=0.0
                )
                w = (u - 8).to(tl.float32) * sc
            else:
                w = tl.load(
                    wt_ptr + offs_k.to(tl.int64)[:, None] * stride_wk + cols[None, :],
                    mask=w_mask,
                    other=0.0,
                )
            if M_PAD == 1:
                # GEMV: fp32 multiply-add, int8 converts straight to fp32.
                xv = tl.sum(x.to(tl.float32), axis=0)  # [BLOCK_K]; only one real row
                acc += tl.sum(xv[:, None] * w.to(tl.float32), axis=0)[None, :]
            elif UPCAST_DOT or IS_INT4:  # int4: dequantized fp32 tile, exact fp32 dot
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                if IS_INT8:
                    w = w.to(x.dtype)  # |q| <= 127 is exact in fp16/bf16/fp32
                if IS_FP32:
                    acc += tl.dot(x, w, input_precision="ieee")
                else:
                    acc += tl.dot(x, w)  # fp16/bf16 tensor cores, fp32 accumulate

        if IS_INT8:
            s = tl.load(scale_ptr + cols, mask=n_mask, other=0.0)
            acc = acc * s[None, :]
        out_mask = m_mask[:, None] & n_mask[None, :]
        if DIRECT:
            if HAS_BIAS:
                b = tl.load(bias_ptr + cols, mask=n_mask, other=0.0)
                acc += b.to(tl.float32)[None, :]
            tl.store(
                out_ptr + offs_m[:, None] * N + cols[None, :],
                acc.to(out_ptr.dtype.element_ty),
                mask=out_mask,
            )
        else:
            base = out_ptr + pid_k.to(tl.int64) * M * N
            tl.store(base + offs_m[:, None] * N + cols[None, :], acc, mask=out_mask)

    @triton.jit
    def _splitk_reduce_kernel(
        part_ptr,  # [SPLIT_K, M*N] fp32
        bias_ptr,
        out_ptr,  # [M*N] output dtype
        MN,
        N,
        SPLIT_K,
        HAS_BIAS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, SPLIT_K):
            acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=16)
def _num_sms(device_index: int) -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    return 1


def _pick_split_k(K: int, n_tiles: int, device: torch.device) -> int:
    # Enough programs to cover every SM a few times; each split keeps at
    # least 256 features so the loop amortises its x loads.
    if device.type != "cuda":
        return 1
    target = 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    want = -(-target // max(n_tiles, 1))
    return max(1, min(want, -(-K // 256)))


@functools.lru_cache(maxsize=256)
def _segment_tensors(seg_sizes: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    # Cached: building them per call would be a host->device copy (a sync on
    # CUDA) on every decode step, and would break CUDA-graph capture.
    starts = [0]
    for n in seg_sizes[:-1]:
        starts.append(starts[-1] + n)
    seg_start = torch.tensor(starts, dtype=torch.int32, device=device)
    seg_len = torch.tensor(list(seg_sizes), dtype=torch.int32, device=device)
    return seg_start, seg_len


def triton_sparse_gemv(
    x: Tensor,
    weight_t: Tensor,
    bias: Tensor | None,
    thresholds: Tensor,
    seg_sizes: list[int] | None = None,
    scales: Tensor | None = None,
    split_k: int | None = None,
) -> Tensor:
    """Launch the Triton kernel(s).  x: [M, K] with M <= 8; returns [M, N].

    ``thresholds``: fp32 tensor with one entry per segment (or one entry), or
    ``[nseg, K]`` (or ``[1, K]``, shared): one per segment and input channel.
    ``seg_sizes``: widths of the concatenated projections (default: one segment).
    ``split_k``: override the host heuristic (tests use it to cover both
    the direct-store and the two-stage reduction paths).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    assert x.dim() == 2 and weight_t.dim() == 2
    M, K = x.shape
    K2, N = weight_t.shape
    assert K == K2, f"x has {K} features, weight_t has {K2} rows"
    assert 1 <= M <= MAX_BATCH, f"batch {M} not in 1..{MAX_BATCH}"
    assert weight_t.stride(1) == 1, "weight_t must be row-contiguous (use prepare_weight)"
    is_int8 = weight_t.dtype == torch.int8
    is_int4 = weight_t.dtype == torch.uint8
    group = 1
    if is_int4:
        N = 2 * N
        assert scales is not None and scales.dim() == 2 and scales.shape[1] == N and K % scales.shape[0] == 0
        group = K // scales.shape[0]
        scales = scales.to(device=x.device, dtype=torch.float32).contiguous()
    elif is_int8:
        assert scales is not None and scales.numel() == N
        scales = scales.to(device=x.device, dtype=torch.float32).contiguous()
    else:
        assert weight_t.dtype == x.dtype, f"dtype mismatch {x.dtype} vs {weight_t.dtype}"
    if x.stride(1) != 1:
        x = x.contiguous()
    if seg_sizes is None:
        seg_sizes = [N]
    assert sum(seg_sizes) == N, f"segments {seg_sizes} do not sum to {N}"
    assert not is_int4 or all(n % 32 == 0 for n in seg_sizes), "int4 segments must be multiples of 32 columns"
    nseg = len(seg_sizes)
    per_channel = thresholds.dim() == 2
    thresholds = thresholds.to(device=x.device, dtype=torch.float32)
    if per_channel:
        assert thresholds.shape[1] == K and thresholds.shape[0] in (1, nseg), (
            f"per-channel thresholds {tuple(thresholds.shape)}, expected [{nseg}, {K}]"
        )
        thresholds = thresholds.expand(nseg, K)
    else:
        thresholds = thresholds.reshape(-1)
        if thresholds.numel() == 1 and nseg > 1:
            thresholds = thresholds.expand(nseg)
        assert thresholds.numel() == nseg
    thresholds = thresholds.contiguous()
    seg_start, seg_len = _segment_tensors(tuple(seg_sizes), x.device)
    if bias is not None:
        bias = bias.contiguous()
        assert bias.numel() == N

    m_pad = 1 if M == 1 else 16
    max_seg = max(seg_sizes)
    if split_k is None:
        split_k = _pick_split_k(K, nseg * -(-max_seg // 64), x.device)
    k_per_split = -(-K // split_k)
    k_per_split = -(-k_per_split // 128) * 128  # keep splits aligned to every BLOCK_K
    split_k = max(1, -(-K // k_per_split))
    direct = split_k == 1

    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    target = out if direct else torch.empty((split_k, M, N), device=x.device, dtype=torch.float32)
    dummy = thresholds  # any tensor on the right device; never read when unused
    grid = lambda meta: (triton.cdiv(max_seg, meta["BLOCK_N"]), split_k, nseg)  # noqa: E731
    _sparse_gemv_kernel[grid](
        x,
        weight_t,
        scales if (is_int8 or is_int4) else dummy,
        bias if bias is not None else dummy,
        thresholds,
        seg_start,
        seg_len,
        target,
        M,
        K,
        N,
        x.stride(0),
        weight_t.stride(0),
        k_per_split,
        group,
        M_PAD=m_pad,
        IS_INT8=is_int8,
        IS_INT4=is_int4,
        HAS_BIAS=bias is not None,
        DIRECT=direct,
        UPCAST_DOT=_interpreting() and x.dtype == torch.bfloat16,
        IS_FP32=x.dtype == torch.float32,
        PER_CHANNEL=per_channel,
    )
    if not direct:
        MN = M * N
        BLOCK = 1024
        _splitk_reduce_kernel[(triton.cdiv(MN, BLOCK),)](
            target,
            bias if bias is not None else dummy,
            out,
            MN,
            N,
            split_k,
            HAS_BIAS=bias is not None,
            BLOCK=BLOCK,
        )
    return out
