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
// Work split: column chunks (each walks every kept row over its range of
// output columns, no partial sums), or for tall matrices blocks of kept rows
// read whole, whose partial sums are added in block order (row_split).  Which,
// and where the cuts fall, depends on the shape and the kept rows only: the
// result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <pthread.h>
#include <thread>
#include <type_traits>
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
inline vfloat vsub(vfloat a, vfloat b) { return _mm512_sub_ps(a, b); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
inline void vstore(float* p, vfloat v) { _mm512_storeu_ps(p, v); }
// int4 block of 32 columns = 16 bytes: byte i holds column i (low nibble) and i + 16 (high).
// Vector h (0 or 1) of the block: columns 16h .. 16h + 15, the nibble u read as the float
// 1 + u/16 (exact): shifted into the top four mantissa bits of 1.0f and merged with its exponent
// by one ternary-logic op. No shuffle but the byte widening, one per 32 columns (a table lookup,
// vpermps, cost a second shuffle per 16 columns; the two measured side by side: kernels/README.md).
// The group's epilogue turns sum(v * (1 + u/16)) back into sum(v * (u - 8)): see kQ4Base.
constexpr float kQ4Base = 1.0f, kQ4Step = 1.0f / 16;
inline vfloat vload_q4(const uint8_t* blk, int h) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
  const __m512i s = h ? _mm512_slli_epi32(b, 15) : _mm512_slli_epi32(b, 19);  // the nibble at bits 19..22
  // (s & 0x00780000) | 0x3F800000: truth table of (A & B) | C is 0xEA
  return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(s, _mm512_set1_epi32(0x00780000), _mm512_set1_epi32(0x3F800000), 0xEA));
}
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
inline vfloat vsub(vfloat a, vfloat b) { return _mm256_sub_ps(a, b); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
inline void vstore(float* p, vfloat v) { _mm256_storeu_ps(p, v); }
// int4, 8 lanes: vector h (0..3) of a 32-column block = columns 8h .. 8h + 7, the nibble as its value.
constexpr float kQ4Base = 0.0f, kQ4Step = 1.0f;
inline vfloat vload_q4(const uint8_t* blk, int h) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 8 * (h & 1))));
  const __m256i q = (h >> 1) ? _mm256_srli_epi32(b, 4) : _mm256_and_si256(b, _mm256_set1_epi32(15));
  return _mm256_cvtepi32_ps(q);
}
#else
constexpr int64_t kVec = 1;  // no SIMD path: the scalar loops below do everything
constexpr float kQ4Base = 0.0f, kQ4Step = 1.0f;  // nibble(): the nibble as its value
#endif

// For each batch row m < MB:
//     acc[m][0:n] += sum_r val[r][m] * Wt[idx[r], col0 : col0+n]
// over the rows idx[] that some batch row keeps (val is 0 where a batch row
// drops that input: its product adds nothing, and the weight row is read once
// for the whole batch).  Eight rows per pass: one load and store of each
// accumulator per eight rows (a chain of eight FMAs), and eight weight streams
// in flight per core (a single stream stalls on DRAM latency at every row
// start; four streams left the 2-thread L2-resident case at ~14 B/cycle).
// Vector lanes and the scalar tail round identically (the same FMA chain), so
// a column's value does not depend on where a thread's range starts.
constexpr int kRows = 8;

template <int MB, typename W, int kUnroll = (MB >= 4 ? 1 : 4 / MB)>
void accumulate_rows(float* __restrict acc, int64_t acc_ld, const W* __restrict wt, int64_t ld, int64_t col0,
                     int64_t n, const int64_t* idx, const float* val, int64_t nnz) {
#ifdef SPON_SIMD
  const int64_t nv = n - n % kVec;
#else
  const int64_t nv = 0;
#endif
  int64_t r = 0;
  for (; r + kRows <= nnz; r += kRows) {
    const W* w[kRows];
    const char* next[kRows];  // the next pass's rows, prefetched while this pass streams
    for (int i = 0; i < kRows; ++i) {
      w[i] = wt + idx[r + i] * ld + col0;
      next[i] = reinterpret_cast<const char*>(wt + idx[std::min(r + kRows + i, nnz - 1)] * ld + col0);
    }
    const float* v = val + r * MB;  // v[i * MB + m]: row r + i, batch row m
#ifdef SPON_SIMD
    int64_t j = 0;
    // kUnroll vectors of columns at a time: kUnroll independent chains of kRows FMAs in flight
    // instead of one (each column's chain and its rounding are unchanged).  One chain alone waits
    // on the FMA latency: ~3 weights a cycle a core, below what memory delivers to int8 / bf16.
    for (; j + kUnroll * kVec <= nv; j += kUnroll * kVec) {
      // One prefetch per 64-byte line of each next row: the rows of a pass are up to kRows separate
      // streams that the hardware prefetcher picks up late (measured, 1 thread, weights not in
      // cache: up to 1.7x on bf16 576-wide rows, never slower).
      for (int64_t b = 0; b < kUnroll * kVec * static_cast<int64_t>(sizeof(W)); b += 64) {
        for (int i = 0; i < kRows; ++i) _mm_prefetch(next[i] + j * sizeof(W) + b, _MM_HINT_T0);
      }
      vfloat t[MB][kUnroll];
      for (int m = 0; m < MB; ++m) {
        for (int u = 0; u < kUnroll; ++u) t[m][u] = vload(acc + m * acc_ld + j + u * kVec);
      }
      for (int i = 0; i < kRows; ++i) {
        for (int u = 0; u < kUnroll; ++u) {
          const vfloat x = vload(w[i] + j + u * kVec);
          for (int m = 0; m < MB; ++m) t[m][u] = vfma(vset1(v[i * MB + m]), x, t[m][u]);
        }
      }
      for (int m = 0; m < MB; ++m) {
        for (int u = 0; u < kUnroll; ++u) vstore(acc + m * acc_ld + j + u * kVec, t[m][u]);
      }
    }
    for (; j < nv; j += kVec) {
      if ((j * static_cast<int64_t>(sizeof(W))) % 64 == 0) {
        for (int i = 0; i < kRows; ++i) _mm_prefetch(next[i] + j * sizeof(W), _MM_HINT_T0);
      }
      vfloat x[kRows];
      for (int i = 0; i < kRows; ++i) x[i] = vload(w[i] + j);
      for (int m = 0; m < MB; ++m) {
        float* a = acc + m * acc_ld + j;
        vfloat t = vload(a);
        for (int i = 0; i < kRows; ++i) t = vfma(vset1(v[i * MB + m]), x[i], t);
        vstore(a, t);
      }
    }
#endif
    for (int64_t j = nv; j < n; ++j) {
      float x[kRows];
      for (int i = 0; i < kRows; ++i) x[i] = as_float(w[i][j]);
      for (int m = 0; m < MB; ++m) {
        float t = acc[m * acc_ld + j];
        for (int i = 0; i < kRows; ++i) t = std::fma(v[i * MB + m], x[i], t);
        acc[m * acc_ld + j] = t;
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

// int4 weights: Wt packed as [K, N/2] bytes, 32 columns per 16-byte block (byte i of a block:
// column i in the low nibble, column i + 16 in the high one), unsigned nibbles u = q + 8.
// One group of input rows (they share one scale per column), col0 and n multiples of 32:
//     acc[m][0:n] += scale[0:n] / kQ4Step * (sum_r val[r][m] * e[idx[r], col0 : col0+n] - off[m])
// with e = kQ4Base + kQ4Step * u the value vload_q4 reads for the nibble u and
// off[m] = (kQ4Base + 8 * kQ4Step) * sum_r val[r][m], so that the bracket is
// kQ4Step * sum_r val[r][m] * (u - 8).  The same walk as accumulate_rows, kRows rows a pass; the first
// pass starts its sums at zero and the last one applies the scales to them in registers, so a
// group of at most kRows kept rows never writes its sums out (`part`, [MB][n], holds them between
// passes of a larger group).  idx[nnz .. avail - 1] are the rows that come next (the next groups):
// each pass prefetches the rows of the pass after it, as accumulate_rows does.
inline float nibble(const uint8_t* blk, int c) { return static_cast<float>(c < 16 ? blk[c] & 15 : blk[c - 16] >> 4); }

template <int MB, int kUnroll = std::max<int>(1, (MB >= 4 ? 1 : 4 / MB) / static_cast<int>(32 / kVec))>
void accumulate_group_q4(float* __restrict acc, int64_t acc_ld, const uint8_t* __restrict q, int64_t ldb,
                         int64_t col0, int64_t n, const int64_t* idx, int64_t avail, const float* val, int64_t nnz,
                         const float* __restrict scale, const float* off, float* __restrict part) {
  const int64_t byte0 = col0 / 2;
  auto pass = [&](int64_t r, const uint8_t* const* w, const float* v, int rows, bool first, bool last) {
    [[maybe_unused]] const char* next[kRows];  // the next pass's rows
    for (int i = 0; i < kRows; ++i) {
      next[i] = reinterpret_cast<const char*>(q + idx[std::min<int64_t>(r + rows + i, avail - 1)] * ldb + byte0);
    }
    const int64_t blocks = n / 32;
#ifdef SPON_SIMD
    // kUnroll blocks of 32 columns at a time: 32 / kVec * kUnroll independent FMA chains (see
    // accumulate_rows); each column's chain is unchanged.
    constexpr int kH = static_cast<int>(32 / kVec);
    int64_t b = 0;
    auto step = [&](auto unroll) {
      constexpr int U = decltype(unroll)::value * kH;
      if ((16 * b) % 64 == 0) {
        for (int i = 0; i < kRows; ++i) _mm_prefetch(next[i] + 16 * b, _MM_HINT_T0);
      }
      vfloat t[MB][U];
      for (int m = 0; m < MB; ++m) {
        for (int u = 0; u < U; ++u) t[m][u] = first ? vset1(0.0f) : vload(part + m * n + 32 * b + u * kVec);
      }
      for (int i = 0; i < rows; ++i) {
        for (int u = 0; u < U; ++u) {
          const vfloat x = vload_q4(w[i] + 16 * (b + u / kH), u % kH);
          for (int m = 0; m < MB; ++m) t[m][u] = vfma(vset1(v[i * MB + m]), x, t[m][u]);
        }
      }
      for (int m = 0; m < MB; ++m) {
        for (int u = 0; u < U; ++u) {
          const int64_t j = 32 * b + u * kVec;
          if (last) {
            float* a = acc + m * acc_ld + j;
            const vfloat sc = kQ4Step == 1.0f ? vload(scale + j) : vmul(vload(scale + j), vset1(1.0f / kQ4Step));
            vstore(a, vfma(sc, vsub(t[m][u], vset1(off[m])), vload(a)));
          } else {
            vstore(part + m * n + j, t[m][u]);
          }
        }
      }
    };
    for (; b + kUnroll <= blocks; b += kUnroll) step(std::integral_constant<int, kUnroll>{});
    for (; b < blocks; ++b) step(std::integral_constant<int, 1>{});
#else
    for (int64_t j = 0; j < 32 * blocks; ++j) {
      float x[kRows];
      for (int i = 0; i < rows; ++i) x[i] = nibble(w[i] + 16 * (j / 32), j % 32);
      for (int m = 0; m < MB; ++m) {
        float t = first ? 0.0f : part[m * n + j];
        for (int i = 0; i < rows; ++i) t = std::fma(v[i * MB + m], x[i], t);
        if (last) acc[m * acc_ld + j] = std::fma(scale[j], t - off[m], acc[m * acc_ld + j]);
        else part[m * n + j] = t;
      }
    }
#endif
  };
  const uint8_t* w[kRows];
  int64_t r = 0;
  for (; r + kRows <= nnz; r += kRows) {
    for (int i = 0; i < kRows; ++i) w[i] = q + idx[r + i] * ldb + byte0;
    pass(r, w, val + r * MB, kRows, r == 0, r + kRows == nnz);
  }
  for (; r < nnz; ++r) {
    w[0] = q + idx[r] * ldb + byte0;
    pass(r, w, val + r * MB, 1, r == 0, r + 1 == nnz);
  }
}

constexpr int64_t kSerialBytes = 1 << 20;  // below ~1 MiB of rows, one thread beats waking the others
constexpr int64_t kMaxBatch = 8;

// ---------------------------------------------------------------------------------------------
// Threads.  A GEMV here lasts 10 us - 2 ms.  Its work is cut into chunks (column ranges, or blocks
// of rows) claimed from one atomic counter, so whichever thread is running takes the next chunk;
// which thread computes a chunk does not change its value: results are bit-identical for any
// thread count.  Two sets of threads can run the chunks (parallel_chunks below decides):
//
// torch's own OpenMP team, on an idle machine.  Between two GEMVs torch runs its own parallel ops
// (attention, the compiled step's loops) on that team, whose threads then spin for a while waiting
// for more; a second set of threads would compete with them for the same cores (the 1B-shape
// decode: 1.2-1.4x faster on the team than on the Pool).
//
// The Pool, on a box whose cores are busy with other processes.  An OpenMP region ends at a
// barrier, so a team thread the scheduler has not run yet holds the caller up for a time slice
// (2-thread calls of 30 us taking 7-15 ms at load average 6-13).  In the Pool the caller claims
// chunks too, so a worker that has not woken up by the time every chunk is claimed finds nothing
// to do, and the caller waits only for chunks already being computed.  Workers spin briefly after
// a job (decode calls come back to back), then sleep on a condition variable.
// Measurements: kernels/README.md, "Threads".

class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool;  // never destroyed: its workers sleep until the process exits
    return *pool;
  }

  // fn(chunk) for chunk in [0, chunks), on up to `threads` threads (the caller included).
  template <typename F>
  void run(int64_t chunks, int threads, const F& fn) {
    if (threads <= 1 || chunks <= 1) {
      for (int64_t c = 0; c < chunks; ++c) fn(c);
      return;
    }
    std::lock_guard<std::mutex> one_job(job_mu_);  // the pool serves one caller at a time
    ensure_workers(threads - 1);
    fn_ = [](const void* f, int64_t c) { (*static_cast<const F*>(f))(c); };
    ctx_ = &fn;
    done_.store(0, std::memory_order_relaxed);
    gen_ = (gen_ + 1) & 0xffffffffu;
    ticket_.store(make(gen_, chunks, 0), std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lk(mu_); }
      cv_.notify_all();
    }
    work(gen_);
    int64_t spins = 0;
    while (done_.load(std::memory_order_acquire) < chunks) {
      if (++spins < 4096) pause();
      else std::this_thread::yield();  // a worker holding a chunk was descheduled: let it run
    }
  }

 private:
  static uint64_t make(uint64_t gen, int64_t total, int64_t next) {
    return (gen << 32) | (static_cast<uint64_t>(total) << 16) | static_cast<uint64_t>(next);
  }
  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
  }

  // Claim and run chunks of job `gen` until none is left (or another job was posted).
  void work(uint64_t gen) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    while ((t >> 32) == gen) {
      const int64_t total = (t >> 16) & 0xffff, next = t & 0xffff;
      if (next >= total) return;
      if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        fn_(ctx_, next);  // the job is alive: its caller waits for this chunk
        done_.fetch_add(1, std::memory_order_release);
        t = ticket_.load(std::memory_order_acquire);
      }
    }
  }

  void worker() {
    uint64_t seen = ticket_.load(std::memory_order_acquire) >> 32;
    for (;;) {
      // Spin ~50 us for the next job (decode calls come back to back), then sleep.
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
      uint64_t g = seen;
      for (int i = 0;; ++i) {
        g = ticket_.load(std::memory_order_acquire) >> 32;
        if (g != seen) break;
        pause();
        if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) break;
      }
      if (g == seen) {
        std::unique_lock<std::mutex> lk(mu_);
        sleeping_.fetch_add(1, std::memory_order_seq_cst);
        cv_.wait(lk, [&] { return (ticket_.load(std::memory_order_seq_cst) >> 32) != seen; });
        sleeping_.fetch_sub(1, std::memory_order_seq_cst);
        g = ticket_.load(std::memory_order_acquire) >> 32;
      }
      seen = g;
      work(g);
    }
  }

  void ensure_workers(int n) {
    if (static_cast<int>(workers_.size()) >= n) return;
    while (static_cast<int>(workers_.size()) < n) {
      workers_.emplace_back([this] { worker(); });
      workers_.back().detach();
    }
  }

  std::mutex job_mu_, mu_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleeping_{0};
  uint64_t gen_ = 0;
  void (*fn_)(const void*, int64_t) = nullptr;
  const void* ctx_ = nullptr;
};

// fn(chunk) for chunk in [0, chunks) on up to `threads` threads.  SPON_CPU_POOL=openmp or =own
// fixes the set of threads; by default (auto) the team runs a job, which notes whether a team
// thread came too late to claim any chunk (a sign that it was not running); when 4 of the last 16
// such jobs had one, the next 1024 jobs go to the Pool, then the team is tried again.
enum class PoolChoice { kAuto, kOpenMP, kOwn };

inline PoolChoice pool_choice() {
  static const PoolChoice choice = [] {
    const char* v = std::getenv("SPON_CPU_POOL");
    if (v && std::strcmp(v, "openmp") == 0) return PoolChoice::kOpenMP;
    if (v && std::strcmp(v, "own") == 0) return PoolChoice::kOwn;
    return PoolChoice::kAuto;
  }();
  return choice;
}

// A forked child inherits no threads: libgomp's team then waits forever for threads that do not
// exist (torch's own OpenMP ops hang there too), while the Pool's caller takes every chunk itself.
std::atomic<bool> in_forked_child{false};
const int atfork_registered = pthread_atfork(nullptr, nullptr, [] { in_forked_child.store(true); });

std::atomic<uint32_t> late_history{0};  // bit i: the i-th last team job had a late thread
std::atomic<int> own_pool_jobs{0};      // jobs left for the Pool before the team is tried again

template <typename F>
void parallel_chunks(int64_t chunks, int threads, const F& fn) {
  if (threads <= 1 || chunks <= 1) {
    for (int64_t c = 0; c < chunks; ++c) fn(c);
    return;
  }
  const PoolChoice choice = pool_choice();
  if (choice == PoolChoice::kOwn || in_forked_child.load(std::memory_order_relaxed) ||
      (choice == PoolChoice::kAuto && own_pool_jobs.load(std::memory_order_relaxed) > 0)) {
    if (choice == PoolChoice::kAuto) own_pool_jobs.fetch_sub(1, std::memory_order_relaxed);
    Pool::get().run(chunks, threads, fn);
    return;
  }
  const int team = static_cast<int>(std::min<int64_t>(threads, chunks));
  std::atomic<int64_t> next{0};
  std::atomic<int> late{0};
#pragma omp parallel num_threads(team)
  {
    int64_t mine = 0;
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks; ++mine) fn(c);
    if (mine == 0) late.fetch_add(1, std::memory_order_relaxed);
  }
  // Only jobs of at least two chunks a thread say anything: with fewer, a running thread can
  // find every chunk taken without having been late.
  if (choice == PoolChoice::kAuto && chunks >= 2 * team) {
    const uint32_t h = ((late_history.load(std::memory_order_relaxed) << 1) | (late.load() > 0)) & 0xffffu;
    late_history.store(h, std::memory_order_relaxed);
    if (__builtin_popcount(h) >= 4) {
      late_history.store(0, std::memory_order_relaxed);
      own_pool_jobs.store(1024, std::memory_order_relaxed);
    }
  }
}

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
// tau = -inf keeps every input, NaN included: the op is then a dense GEMV with F.linear's
// semantics (spon.kernel_backend runs the dense LM head through it).
template <typename X, typename Tau>
Survivors survivors(const X* x, int64_t M, int64_t MB, int64_t K, Tau tau) {
  Survivors s;
  s.idx.reserve(K);
  s.val.reserve(K * MB);
  for (int64_t k = 0; k < K; ++k) {
    const float t = tau(k);
    const bool all = t == -std::numeric_limits<float>::infinity();
    bool any = all;
    for (int64_t m = 0; m < M && !any; ++m) any = std::fabs(as_float(x[m * K + k])) > t;  // strict, fp32
    if (!any) continue;
    s.idx.push_back(k);
    for (int64_t m = 0; m < MB; ++m) {
      const float v = m < M ? as_float(x[m * K + k]) : 0.0f;
      s.val.push_back(all || std::fabs(v) > t ? v : 0.0f);
    }
  }
  return s;
}

// Weight formats: W = X (same dtype as x), int8 (per-output-channel scales [N]) or int4 (W = uint8_t,
// packed as above, group-wise scales [K / group, N]: rows k of one group of `group` inputs share
// scales[k / group][n]).
struct Quant {
  const float* scales = nullptr;  // int8: [N]; int4: [K / group, N]
  int64_t group = 0;              // int4 group size (rows of Wt per scale); 0 otherwise
};

// int4: the kept rows of one segment by group of `group` inputs (one scale per column each), and the
// offset (kQ4Base + 8 * kQ4Step) * sum(val) of the unsigned nibbles: worked out once per call, for every
// chunk or block.
template <int MB>
struct GroupQ4 {
  int64_t r0, r1, grp;  // kept rows r0 .. r1 - 1 of the segment, all of group grp
  float off[MB];
};

template <int MB>
std::vector<GroupQ4<MB>> groups_q4(const Survivors& sv, int64_t group) {
  std::vector<GroupQ4<MB>> out;
  const int64_t nnz = static_cast<int64_t>(sv.idx.size());
  for (int64_t r = 0; r < nnz;) {
    GroupQ4<MB> gr{r, r, sv.idx[r] / group, {}};
    while (gr.r1 < nnz && sv.idx[gr.r1] / group == gr.grp) ++gr.r1;
    for (int m = 0; m < MB; ++m) {
      float sumv = 0.0f;
      for (int64_t i = gr.r0; i < gr.r1; ++i) sumv += sv.val[i * MB + m];
      gr.off[m] = (kQ4Base + 8.0f * kQ4Step) * sumv;
    }
    out.push_back(gr);
    r = gr.r1;
  }
  return out;
}

// acc[m][0:n] += the segment's groups gs[g0 .. g1 - 1] over columns col0 .. col0 + n (int4; part:
// scratch of [MB][n] floats).
template <int MB>
void accumulate_groups_q4(float* acc, int64_t acc_ld, const uint8_t* q, int64_t N, int64_t col0, int64_t n,
                          const Survivors& sv, const std::vector<GroupQ4<MB>>& gs, size_t g0, size_t g1,
                          const float* scales, float* part) {
  const int64_t nnz = static_cast<int64_t>(sv.idx.size());
  for (size_t i = g0; i < g1; ++i) {
    const GroupQ4<MB>& gr = gs[i];
    accumulate_group_q4<MB>(acc, acc_ld, q, N / 2, col0, n, sv.idx.data() + gr.r0, nnz - gr.r0,
                            sv.val.data() + gr.r0 * MB, gr.r1 - gr.r0, scales + gr.grp * N + col0, gr.off, part);
  }
}

// Row split, for tall matrices (K >= 2N: down projections) that do not fit one thread's caches: the
// kept rows of each segment are cut into blocks, each block's rows are read whole (one contiguous
// stream per row, the full width of the segment) into a partial sum of its own, and the partial
// sums are added in block order.  Cutting such a matrix by columns makes every thread read a short
// piece of every kept row (a 2048-wide bf16 row in eight pieces of 512 bytes); whole rows streamed
// 1.35-1.58x faster (bf16 8192x2048, 2 threads, AMD EPYC), while wide matrices lost up to 30 % to
// the partial sums' extra traffic, so they keep the column split.  The blocks depend on the shape
// and the number of kept rows only, never on the thread count: the result is the same for any
// number of threads.
constexpr int64_t kMinBlockRows = 32;
constexpr int64_t kMaxBlocks = 32;

template <int MB, typename X, typename W>
void row_split(int64_t M, int64_t N, const W* wt, const std::vector<Survivors>& segs,
               const std::vector<std::vector<GroupQ4<MB>>>& groups, const std::vector<int64_t>& seg_start,
               const std::vector<int64_t>& seg_sizes, const float* bias, const Quant& quant, X* out, int threads) {
  constexpr bool kQ4 = std::is_same<W, uint8_t>::value;
  struct Block {
    size_t seg;
    int64_t r0, r1;  // kept rows r0 .. r1 - 1 of the segment
    size_t g0, g1;   // int4: its groups g0 .. g1 - 1 (a block holds whole groups)
    float* part;     // [MB][seg_sizes[seg]]
  };
  std::vector<Block> blocks;
  std::vector<int64_t> first(segs.size() + 1, 0);  // blocks of segment g: first[g] .. first[g + 1] - 1
  int64_t floats = 0;
  for (size_t g = 0; g < segs.size(); ++g) {
    const int64_t nnz = static_cast<int64_t>(segs[g].idx.size());
    int64_t rows = std::max<int64_t>(kMinBlockRows, (nnz + kMaxBlocks - 1) / kMaxBlocks);
    rows = (rows + kRows - 1) / kRows * kRows;  // whole passes of kRows rows
    if constexpr (kQ4) {  // whole groups, at least `rows` kept rows a block
      const auto& gs = groups[g];
      for (size_t g0 = 0; g0 < gs.size() && seg_sizes[g] > 0;) {
        size_t g1 = g0;
        while (g1 < gs.size() && gs[g1].r0 - gs[g0].r0 < rows) ++g1;
        blocks.push_back({g, gs[g0].r0, gs[g1 - 1].r1, g0, g1, nullptr});
        floats += MB * seg_sizes[g];
        g0 = g1;
      }
    } else {
      for (int64_t r0 = 0; r0 < nnz && seg_sizes[g] > 0; r0 += rows) {
        blocks.push_back({g, r0, std::min(nnz, r0 + rows), 0, 0, nullptr});
        floats += MB * seg_sizes[g];
      }
    }
    first[g + 1] = static_cast<int64_t>(blocks.size());
  }
  thread_local std::vector<float> parts;  // kept between calls: a fresh allocation this size is an mmap
  if (static_cast<int64_t>(parts.size()) < floats) parts.resize(floats);
  float* p = parts.data();
  for (Block& b : blocks) {
    b.part = p;
    p += MB * seg_sizes[b.seg];
  }
  parallel_chunks(static_cast<int64_t>(blocks.size()), threads, [&](int64_t i) {
    const Block& b = blocks[i];
    const int64_t n = seg_sizes[b.seg];
    std::fill(b.part, b.part + MB * n, 0.0f);
    const Survivors& sv = segs[b.seg];
    if constexpr (kQ4) {
      thread_local std::vector<float> scratch;
      if (static_cast<int64_t>(scratch.size()) < MB * n) scratch.resize(MB * n);
      accumulate_groups_q4<MB>(b.part, n, wt, N, seg_start[b.seg], n, sv, groups[b.seg], b.g0, b.g1, quant.scales,
                               scratch.data());
    } else {
      accumulate_rows<MB>(b.part, n, wt, N, seg_start[b.seg], n, sv.idx.data() + b.r0, sv.val.data() + b.r0 * MB,
                          b.r1 - b.r0);
    }
  });
  const float* col_scales = kQ4 ? nullptr : quant.scales;  // int8: one scale per output column
  // The sum over blocks, scales, bias and cast: column chunks of 256, in block order per column.
  constexpr int64_t kCols = 256;
  const int64_t chunks = (N + kCols - 1) / kCols;
  parallel_chunks(chunks, threads, [&](int64_t c) {
    const int64_t c0 = c * kCols, c1 = std::min(N, c0 + kCols);
    float y[kCols];
    for (size_t g = 0; g < segs.size(); ++g) {
      const int64_t lo = std::max(c0, seg_start[g]), hi = std::min(c1, seg_start[g + 1]);
      if (lo >= hi) continue;
      const int64_t n = seg_sizes[g];
      for (int64_t m = 0; m < M; ++m) {
        std::fill(y, y + (hi - lo), 0.0f);
        for (int64_t bi = first[g]; bi < first[g + 1]; ++bi) {
          const float* part = blocks[bi].part + m * n + (lo - seg_start[g]);
          for (int64_t j = 0; j < hi - lo; ++j) y[j] += part[j];
        }
        for (int64_t j = lo; j < hi; ++j) {
          float v = y[j - lo];
          if (col_scales) v *= col_scales[j];
          if (bias) v += bias[j];
          out[m * N + j] = static_cast<X>(v);
        }
      }
    }
  });
}

// chan_taus: nullptr (taus[g] is segment g's threshold) or [nseg][K] fp32, one
// threshold per segment and input channel (taus is then ignored).
template <int MB, typename X, typename W>
void sparse_gemv_impl(const X* x, int64_t M, int64_t K, const W* wt, int64_t N, const std::vector<double>& taus,
                      const float* chan_taus, const std::vector<int64_t>& seg_sizes, const float* bias,
                      const Quant& quant, X* out) {
  constexpr bool kQ4 = std::is_same<W, uint8_t>::value;
  const size_t nseg = seg_sizes.size();
  std::vector<Survivors> segs(nseg);
  std::vector<int64_t> seg_start(nseg + 1, 0);
  double bytes = 0;
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
    bytes += static_cast<double>(segs[g].idx.size()) * seg_sizes[g] * (kQ4 ? 0.5 : sizeof(W));
  }
  const int threads = bytes < kSerialBytes ? 1 : std::max(1, at::get_num_threads());
  std::vector<std::vector<GroupQ4<MB>>> groups(kQ4 ? nseg : 0);
  for (size_t g = 0; g < groups.size(); ++g) groups[g] = groups_q4<MB>(segs[g], quant.group);
  if (bytes >= kSerialBytes && K >= 2 * N) {
    row_split<MB>(M, N, wt, segs, groups, seg_start, seg_sizes, bias, quant, out, threads);
    return;
  }
  // Column chunks aligned to 32 (one int4 block; two 64-byte lines of fp32 accumulators), about
  // four per thread so a late thread's share is taken by the others, but each reading at least
  // kMinPieceBytes of a row: shorter pieces stream worse (bf16, weights out of cache, 2 threads,
  // AMD EPYC: 2048x2048 at 50 % 34 -> 37 GB/s, 576x960 at 0 % 29 -> 35, with 1 KiB instead of 512 B).
  // int4 is bound by its instructions, not the stream: 256 B (512 columns), so that a 2048-wide
  // matrix is cut into four chunks, not run on one thread.
  constexpr int64_t kAlign = 32;
  constexpr int64_t kMinPieceBytes = kQ4 ? 256 : 1024;
  const int64_t units = (N + kAlign - 1) / kAlign;
  const int64_t want = threads == 1 ? 1 : std::min<int64_t>(units, 4 * threads);
  const int64_t unit_bytes = kQ4 ? kAlign / 2 : kAlign * static_cast<int64_t>(sizeof(W));
  const int64_t per = std::max<int64_t>((units + want - 1) / want, kMinPieceBytes / unit_bytes);
  const int64_t chunks = (units + per - 1) / per;
  auto body = [&](int64_t chunk) {
    const int64_t c0 = chunk * per * kAlign, c1 = std::min(N, (chunk + 1) * per * kAlign), n = c1 - c0;
    std::vector<float> acc(MB * n, 0.0f);  // [MB][n]
    std::vector<float> part(kQ4 ? MB * n : 0);
    for (size_t g = 0; g < nseg; ++g) {  // the segments this column range overlaps
      const int64_t lo = std::max(c0, seg_start[g]), hi = std::min(c1, seg_start[g + 1]);
      if (lo >= hi) continue;
      const Survivors& sv = segs[g];
      const int64_t nnz = static_cast<int64_t>(sv.idx.size());
      if constexpr (!kQ4) {
        accumulate_rows<MB>(acc.data() + (lo - c0), n, wt, N, lo, hi - lo, sv.idx.data(), sv.val.data(), nnz);
      } else {
        accumulate_groups_q4<MB>(acc.data() + (lo - c0), n, wt, N, lo, hi - lo, sv, groups[g], 0, groups[g].size(),
                                 quant.scales, part.data());
      }
    }
    const float* col_scales = kQ4 ? nullptr : quant.scales;  // int8: one scale per output column
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t j = c0; j < c1; ++j) {
        float y = acc[m * n + (j - c0)];
        if (col_scales) y *= col_scales[j];
        if (bias) y += bias[j];
        out[m * N + j] = static_cast<X>(y);
      }
    }
  };
  parallel_chunks(chunks, threads, body);
}

template <typename X, typename W>
void dispatch_batch(const X* x, int64_t M, int64_t K, const W* wt, int64_t N, const std::vector<double>& taus,
                    const float* ct, const std::vector<int64_t>& sizes, const float* bias, const Quant& q, X* out) {
  // Batch rows padded to 1, 2, 4 or 8 so the per-row loop unrolls at compile time.
  if (M == 1) sparse_gemv_impl<1>(x, M, K, wt, N, taus, ct, sizes, bias, q, out);
  else if (M == 2) sparse_gemv_impl<2>(x, M, K, wt, N, taus, ct, sizes, bias, q, out);
  else if (M <= 4) sparse_gemv_impl<4>(x, M, K, wt, N, taus, ct, sizes, bias, q, out);
  else sparse_gemv_impl<8>(x, M, K, wt, N, taus, ct, sizes, bias, q, out);
}

enum class Fmt { kSame, kInt8, kInt4 };

template <typename X>
void run(const at::Tensor& x, const at::Tensor& weight_t, Fmt fmt, int64_t M, int64_t K, int64_t N,
         const std::vector<double>& taus, const float* ct, const std::vector<int64_t>& sizes, const float* bias,
         const Quant& q, at::Tensor& out) {
  if (fmt == Fmt::kInt8) {
    dispatch_batch<X, int8_t>(x.data_ptr<X>(), M, K, weight_t.data_ptr<int8_t>(), N, taus, ct, sizes, bias, q,
                              out.data_ptr<X>());
  } else if (fmt == Fmt::kInt4) {
    dispatch_batch<X, uint8_t>(x.data_ptr<X>(), M, K, weight_t.data_ptr<uint8_t>(), N, taus, ct, sizes, bias, q,
                               out.data_ptr<X>());
  } else {
    dispatch_batch<X, X>(x.data_ptr<X>(), M, K, weight_t.data_ptr<X>(), N, taus, ct, sizes, bias, q,
                         out.data_ptr<X>());
  }
}

// weight_t: [K, N] in x's dtype; int8 [K, N] with scales [N]; or int4, uint8 [K, N / 2] packed
// (see accumulate_rows_q4) with scales [K / group, N] (group = K / scales.size(0)).
at::Tensor sparse_gemv(const at::Tensor& x, const at::Tensor& weight_t, const c10::optional<at::Tensor>& bias,
                       at::ArrayRef<double> thresholds, at::IntArrayRef seg_sizes,
                       const c10::optional<at::Tensor>& scales,
                       const c10::optional<at::Tensor>& channel_thresholds) {
  TORCH_CHECK(x.device().is_cpu() && weight_t.device().is_cpu(), "sparse_gemv: CPU tensors only");
  TORCH_CHECK(weight_t.dim() == 2 && weight_t.is_contiguous(), "sparse_gemv: weight_t must be a contiguous [in, out] matrix");
  const Fmt fmt = weight_t.scalar_type() == at::kChar ? Fmt::kInt8 : weight_t.scalar_type() == at::kByte ? Fmt::kInt4 : Fmt::kSame;
  const int64_t K = weight_t.size(0), N = fmt == Fmt::kInt4 ? 2 * weight_t.size(1) : weight_t.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "sparse_gemv: x must be [M, ", K, "] for weight_t with ", K,
              " rows, got ", x.sizes());
  const int64_t M = x.size(0);
  TORCH_CHECK(M >= 1 && M <= kMaxBatch, "sparse_gemv: 1 to ", kMaxBatch, " rows, got ", M);
  TORCH_CHECK(!seg_sizes.empty() && thresholds.size() == seg_sizes.size(), "sparse_gemv: one threshold per segment");
  int64_t total = 0;
  for (int64_t n : seg_sizes) {
    TORCH_CHECK(n >= 0, "sparse_gemv: negative segment size");
    TORCH_CHECK(fmt != Fmt::kInt4 || n % 32 == 0, "sparse_gemv: int4 segments must be multiples of 32 columns, got ", n);
    total += n;
  }
  TORCH_CHECK(total == N, "sparse_gemv: segment sizes sum to ", total, ", weight_t has ", N, " columns");
  TORCH_CHECK((fmt != Fmt::kSame) == scales.has_value(), "sparse_gemv: scales go with int8/int4 weights and only with them");
  TORCH_CHECK(fmt != Fmt::kSame || weight_t.scalar_type() == x.scalar_type(), "sparse_gemv: weight dtype must match x");
  const at::Tensor xc = x.contiguous();
  at::Tensor b, s;
  if (bias) {
    TORCH_CHECK(bias->numel() == N, "sparse_gemv: bias must have ", N, " elements");
    b = bias->to(at::kFloat).contiguous();
  }
  Quant q;
  if (scales) {
    if (fmt == Fmt::kInt8) {
      TORCH_CHECK(scales->numel() == N, "sparse_gemv: scales must have ", N, " elements");
    } else {
      TORCH_CHECK(scales->dim() == 2 && scales->size(1) == N && scales->size(0) >= 1 && K % scales->size(0) == 0,
                  "sparse_gemv: int4 scales must be [K / group, ", N, "] with the group dividing K = ", K, ", got ",
                  scales->sizes());
      q.group = K / scales->size(0);
    }
    s = scales->to(at::kFloat).contiguous();
    q.scales = s.data_ptr<float>();
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
  const float* cp = channel_thresholds ? ct.data_ptr<float>() : nullptr;
  AT_DISPATCH_SWITCH(x.scalar_type(), "sparse_gemv",
      AT_DISPATCH_CASE(at::kFloat, [&] { run<scalar_t>(xc, weight_t, fmt, M, K, N, taus, cp, sizes, bp, q, out); })
      AT_DISPATCH_CASE(at::kHalf, [&] { run<scalar_t>(xc, weight_t, fmt, M, K, N, taus, cp, sizes, bp, q, out); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { run<scalar_t>(xc, weight_t, fmt, M, K, N, taus, cp, sizes, bp, q, out); }));
  return out;
}

}  // namespace

TORCH_LIBRARY(spon_cpu, m) {
  m.def(
      "sparse_gemv(Tensor x, Tensor weight_t, Tensor? bias, float[] thresholds, int[] seg_sizes, Tensor? scales, "
      "Tensor? channel_thresholds=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(spon_cpu, CPU, m) { m.impl("sparse_gemv", &sparse_gemv); }
