// Activation-sparse GEMV for decode on CPU (1-8 rows), one native op:
//
//     y = S(x) @ Wt (* scales) + b,   S(x) = x * 1{|x| > tau}   (tau compared in fp32)
//
// reading only the rows of Wt = W^T [in, out] whose activation some batch row
// keeps, each such row once for the whole batch.  Wt may be the column
// concatenation of projections that share x (q/k/v, gate/up), each segment
// with its own threshold: one value, or one per input channel (tau[g][k],
// the weighted criterion |x_k| * ||W[:, k]|| > tau as a vector tau / ||W[:, k]||).
// Torch reference: kernels/reference.py; built and loaded by kernels/cpu_native.py.
//
// Why native: embedding_bag does the same gather-scale-reduce for one row,
// but needs seven tensor ops around it (mask, nonzero, index_select, offsets,
// partial sums, bias, cast).  Each of those runs right after a weight stream
// has evicted the interpreter's working set from the caches and costs 10-80
// us instead of 2-5 us: 0.5-0.6 ms of a 3.4 ms bf16 4096x14336 call at 50%
// sparsity on a 2-core EPYC.  Here the threshold test, the gather-scale-
// reduce, the scales, the bias and the cast are one pass.
//
// Work split: each thread owns a contiguous range of output columns and walks
// every kept row over that range, so no partial sums are reduced across
// threads and the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

inline float as_float(float v) { return v; }
inline float as_float(int8_t v) { return static_cast<float>(v); }
inline float as_float(c10::Half v) { return static_cast<float>(v); }
inline float as_float(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;  // bf16 is the top half of an fp32
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Loads of kVec weights widened to fp32, written out with intrinsics: left to
// the auto-vectorizer, GCC 12 vectorized the bf16 loop in one build and not in
// the next (4-5x slower), so the hot loop does not depend on its mood.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define SPON_SIMD 1
constexpr int64_t kVec = 16;
using vfloat = __m512;
inline vfloat vload(const float* p) { return _mm512_loadu_ps(p); }
inline vfloat vload(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline vfloat vload(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline vfloat vload(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline vfloat vset1(float v) { return _mm512_set1_ps(v); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
inline void vstore(float* p, vfloat v) { _mm512_storeu_ps(p, v); }
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define SPON_SIMD 1
constexpr int64_t kVec = 8;
using vfloat = __m256;
inline vfloat vload(const float* p) { return _mm256_loadu_ps(p); }
inline vfloat vload(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline vfloat vload(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline vfloat vload(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vfloat vset1(float v) { return _mm256_set1_ps(v); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
inline void vstore(float* p, vfloat v) { _mm256_storeu_ps(p, v); }
#else
constexpr int64_t kVec = 1;  // no SIMD path: the scalar loops below do everything
#endif

// For each batch row m < MB:
//     acc[m][0:n] += sum_r val[r][m] * Wt[idx[r], col0 : col0+n]
// over the rows idx[] that some batch row keeps (val is 0 where a batch row
// drops that input: its product adds nothing, and the weight row is read once
// for the whole batch).  Four rows per pass: one load and store of each
// accumulator per four rows (a chain of four FMAs), and four weight streams in
// flight per core (a single stream stalls on DRAM latency at every row start).
// Vector lanes and the scalar tail round identically (the same FMA chain), so
// a column's value does not depend on where a thread's range starts.
template <int MB, typename W>
void accumulate_rows(float* __restrict acc, int64_t acc_ld, const W* __restrict wt, int64_t ld, int64_t col0,
                     int64_t n, const int64_t* idx, const float* val, int64_t nnz) {
#ifdef SPON_SIMD
  const int64_t nv = n - n % kVec;
#else
  const int64_t nv = 0;
#endif
  int64_t r = 0;
  for (; r + 4 <= nnz; r += 4) {
    const W* __restrict w0 = wt + idx[r] * ld + col0;
    const W* __restrict w1 = wt + idx[r + 1] * ld + col0;
    const W* __restrict w2 = wt + idx[r + 2] * ld + col0;
    const W* __restrict w3 = wt + idx[r + 3] * ld + col0;
    const float* v = val + r * MB;  // v[i * MB + m]: row r + i, batch row m
#ifdef SPON_SIMD
    for (int64_t j = 0; j < nv; j += kVec) {
      const vfloat x0 = vload(w0 + j), x1 = vload(w1 + j), x2 = vload(w2 + j), x3 = vload(w3 + j);
      for (int m = 0; m < MB; ++m) {
        float* a = acc + m * acc_ld + j;
        vfloat t = vfma(vset1(v[m]), x0, vload(a));
        t = vfma(vset1(v[MB + m]), x1, t);
        t = vfma(vset1(v[2 * MB + m]), x2, t);
        vstore(a, vfma(vset1(v[3 * MB + m]), x3, t));
      }
    }
#endif
    for (int64_t j = nv; j < n; ++j) {
      const float x0 = as_float(w0[j]), x1 = as_float(w1[j]), x2 = as_float(w2[j]), x3 = as_float(w3[j]);
      for (int m = 0; m < MB; ++m) {
        float t = std::fma(v[m], x0, acc[m * acc_ld + j]);
        t = std::fma(v[MB + m], x1, t);
        t = std::fma(v[2 * MB + m], x2, t);
        acc[m * acc_ld + j] = std::fma(v[3 * MB + m], x3, t);
      }
    }
  }
  for (; r < nnz; ++r) {
    const W* __restrict w0 = wt + idx[r] * ld + col0;
    const float* v = val + r * MB;
#ifdef SPON_SIMD
    for (int64_t j = 0; j < nv; j += kVec) {
      const vfloat x0 = vload(w0 + j);
      for (int m = 0; m < MB; ++m) {
        float* a = acc + m * acc_ld + j;
        vstore(a, vfma(vset1(v[m]), x0, vload(a)));
      }
    }
#endif
    for (int64_t j = nv; j < n; ++j) {
      const float x0 = as_float(w0[j]);
      for (int m = 0; m < MB; ++m) acc[m * acc_ld + j] = std::fma(v[m], x0, acc[m * acc_ld + j]);
    }
  }
}

constexpr int64_t kBlock = 16;             // columns per work unit: one 64-byte line of fp32 acc
constexpr int64_t kSerialBytes = 1 << 20;  // below ~1 MiB of rows, one thread beats waking the others
constexpr int64_t kMaxBatch = 8;

// The inputs of one segment (a projection of a fused q/k/v or gate/up matrix,
// with its own threshold) that at least one batch row keeps: indices, and
// MB values per index (fp32; 0 for a batch row that drops it, and for the
// padding rows M..MB-1).
struct Survivors {
  std::vector<int64_t> idx;
  std::vector<float> val;
};

// tau(k) is input k's threshold: a constant, or a read of the segment's row of
// per-channel thresholds (one template, so both tests are the same code).
template <typename X, typename Tau>
Survivors survivors(const X* x, int64_t M, int64_t MB, int64_t K, Tau tau) {
  Survivors s;
  s.idx.reserve(K);
  s.val.reserve(K * MB);
  for (int64_t k = 0; k < K; ++k) {
    const float t = tau(k);
    bool any = false;
    for (int64_t m = 0; m < M; ++m) any |= std::fabs(as_float(x[m * K + k])) > t;  // strict, fp32
    if (!any) continue;
    s.idx.push_back(k);
    for (int64_t m = 0; m < MB; ++m) {
      const float v = m < M ? as_float(x[m * K + k]) : 0.0f;
      s.val.push_back(std::fabs(v) > t ? v : 0.0f);
    }
  }
  return s;
}

// chan_taus: nullptr (taus[g] is segment g's threshold) or [nseg][K] fp32, one
// threshold per segment and input channel (taus is then ignored).
template <int MB, typename X, typename W>
void sparse_gemv_impl(const X* x, int64_t M, int64_t K, const W* wt, int64_t N, const std::vector<double>& taus,
                      const float* chan_taus, const std::vector<int64_t>& seg_sizes, const float* bias,
                      const float* scales, X* out) {
  const size_t nseg = seg_sizes.size();
  std::vector<Survivors> segs(nseg);
  std::vector<int64_t> seg_start(nseg + 1, 0);
  int64_t bytes = 0;
  for (size_t g = 0; g < nseg; ++g) {
    // Segments with equal thresholds share one scan of x.  Rows of per-channel
    // thresholds are compared bitwise: NaN rows never match by value.
    size_t same = g;
    for (size_t h = 0; h < g && same == g; ++h) {
      if (chan_taus ? std::memcmp(chan_taus + h * K, chan_taus + g * K, K * sizeof(float)) == 0 : taus[h] == taus[g])
        same = h;
    }
    if (same < g) {
      segs[g] = segs[same];
    } else if (chan_taus) {
      const float* row = chan_taus + g * K;
      segs[g] = survivors(x, M, MB, K, [row](int64_t k) { return row[k]; });
    } else {
      const float t = static_cast<float>(taus[g]);
      segs[g] = survivors(x, M, MB, K, [t](int64_t) { return t; });
    }
    seg_start[g + 1] = seg_start[g] + seg_sizes[g];
    bytes += static_cast<int64_t>(segs[g].idx.size()) * seg_sizes[g] * static_cast<int64_t>(sizeof(W));
  }
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  // Grain = blocks / threads: at::parallel_for then gives each thread one contiguous column range.
  const int64_t threads = at::get_num_threads();
  const int64_t grain = bytes < kSerialBytes ? blocks : std::max<int64_t>(1, (blocks + threads - 1) / threads);
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t c0 = b0 * kBlock, c1 = std::min(N, b1 * kBlock), n = c1 - c0;
    std::vector<float> acc(MB * n, 0.0f);  // [MB][n]
    for (size_t g = 0; g < nseg; ++g) {  // the segments this column range overlaps
      const int64_t lo = std::max(c0, seg_start[g]), hi = std::min(c1, seg_start[g + 1]);
      if (lo < hi) {
        const Survivors& sv = segs[g];
        accumulate_rows<MB>(acc.data() + (lo - c0), n, wt, N, lo, hi - lo, sv.idx.data(), sv.val.data(),
                            static_cast<int64_t>(sv.idx.size()));
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t j = c0; j < c1; ++j) {
        float y = acc[m * n + (j - c0)];
        if (scales) y *= scales[j];
        if (bias) y += bias[j];
        out[m * N + j] = static_cast<X>(y);
      }
    }
  });
}

template <typename X, typename W>
void dispatch_batch(const X* x, int64_t M, int64_t K, const W* wt, int64_t N, const std::vector<double>& taus,
                    const float* ct, const std::vector<int64_t>& sizes, const float* bias, const float* scales,
                    X* out) {
  // Batch rows padded to 1, 2, 4 or 8 so the per-row loop unrolls at compile time.
  if (M == 1) sparse_gemv_impl<1>(x, M, K, wt, N, taus, ct, sizes, bias, scales, out);
  else if (M == 2) sparse_gemv_impl<2>(x, M, K, wt, N, taus, ct, sizes, bias, scales, out);
  else if (M <= 4) sparse_gemv_impl<4>(x, M, K, wt, N, taus, ct, sizes, bias, scales, out);
  else sparse_gemv_impl<8>(x, M, K, wt, N, taus, ct, sizes, bias, scales, out);
}

template <typename X>
void run(const at::Tensor& x, const at::Tensor& weight_t, bool int8, int64_t M, int64_t K, int64_t N,
         const std::vector<double>& taus, const float* ct, const std::vector<int64_t>& sizes, const float* bias,
         const float* scales, at::Tensor& out) {
  if (int8) {
    dispatch_batch<X, int8_t>(x.data_ptr<X>(), M, K, weight_t.data_ptr<int8_t>(), N, taus, ct, sizes, bias, scales,
                              out.data_ptr<X>());
  } else {
    dispatch_batch<X, X>(x.data_ptr<X>(), M, K, weight_t.data_ptr<X>(), N, taus, ct, sizes, bias, scales,
                         out.data_ptr<X>());
  }
}

at::Tensor sparse_gemv(const at::Tensor& x, const at::Tensor& weight_t, const c10::optional<at::Tensor>& bias,
                       at::ArrayRef<double> thresholds, at::IntArrayRef seg_sizes,
                       const c10::optional<at::Tensor>& scales,
                       const c10::optional<at::Tensor>& channel_thresholds) {
  TORCH_CHECK(x.device().is_cpu() && weight_t.device().is_cpu(), "sparse_gemv: CPU tensors only");
  TORCH_CHECK(weight_t.dim() == 2 && weight_t.is_contiguous(), "sparse_gemv: weight_t must be a contiguous [in, out] matrix");
  const int64_t K = weight_t.size(0), N = weight_t.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "sparse_gemv: x must be [M, ", K, "] for weight_t with ", K,
              " rows, got ", x.sizes());
  const int64_t M = x.size(0);
  TORCH_CHECK(M >= 1 && M <= kMaxBatch, "sparse_gemv: 1 to ", kMaxBatch, " rows, got ", M);
  TORCH_CHECK(!seg_sizes.empty() && thresholds.size() == seg_sizes.size(), "sparse_gemv: one threshold per segment");
  int64_t total = 0;
  for (int64_t n : seg_sizes) {
    TORCH_CHECK(n >= 0, "sparse_gemv: negative segment size");
    total += n;
  }
  TORCH_CHECK(total == N, "sparse_gemv: segment sizes sum to ", total, ", weight_t has ", N, " columns");
  const bool int8 = weight_t.scalar_type() == at::kChar;
  TORCH_CHECK(int8 == scales.has_value(), "sparse_gemv: scales go with int8 weights and only with them");
  TORCH_CHECK(int8 || weight_t.scalar_type() == x.scalar_type(), "sparse_gemv: weight dtype must match x");
  const at::Tensor xc = x.contiguous();
  at::Tensor b, s;
  if (bias) {
    TORCH_CHECK(bias->numel() == N, "sparse_gemv: bias must have ", N, " elements");
    b = bias->to(at::kFloat).contiguous();
  }
  if (scales) {
    TORCH_CHECK(scales->numel() == N, "sparse_gemv: scales must have ", N, " elements");
    s = scales->to(at::kFloat).contiguous();
  }
  at::Tensor ct;
  if (channel_thresholds) {
    const int64_t nseg = static_cast<int64_t>(seg_sizes.size());
    TORCH_CHECK(channel_thresholds->device().is_cpu() && channel_thresholds->scalar_type() == at::kFloat,
                "sparse_gemv: channel_thresholds must be a CPU fp32 tensor");
    TORCH_CHECK(channel_thresholds->dim() == 2 && channel_thresholds->size(0) == nseg &&
                    channel_thresholds->size(1) == K,
                "sparse_gemv: channel_thresholds must be [", nseg, ", ", K, "] (segments, inputs), got ",
                channel_thresholds->sizes());
    ct = channel_thresholds->contiguous();
  }
  at::Tensor out = at::empty({M, N}, x.options());
  const std::vector<double> taus(thresholds.begin(), thresholds.end());
  const std::vector<int64_t> sizes(seg_sizes.begin(), seg_sizes.end());
  const float* bp = bias ? b.data_ptr<float>() : nullptr;
  const float* sp = scales ? s.data_ptr<float>() : nullptr;
  const float* cp = channel_thresholds ? ct.data_ptr<float>() : nullptr;
  AT_DISPATCH_SWITCH(x.scalar_type(), "sparse_gemv",
      AT_DISPATCH_CASE(at::kFloat, [&] { run<scalar_t>(xc, weight_t, int8, M, K, N, taus, cp, sizes, bp, sp, out); })
      AT_DISPATCH_CASE(at::kHalf, [&] { run<scalar_t>(xc, weight_t, int8, M, K, N, taus, cp, sizes, bp, sp, out); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { run<scalar_t>(xc, weight_t, int8, M, K, N, taus, cp, sizes, bp, sp, out); }));
  return out;
}

}  // namespace

TORCH_LIBRARY(spon_cpu, m) {
  m.def(
      "sparse_gemv(Tensor x, Tensor weight_t, Tensor? bias, float[] thresholds, int[] seg_sizes, Tensor? scales, "
      "Tensor? channel_thresholds=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(spon_cpu, CPU, m) { m.impl("sparse_gemv", &sparse_gemv); }
