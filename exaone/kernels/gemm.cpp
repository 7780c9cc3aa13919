// out[M, N] = x[M, K] @ w[N, K]^T on AVX-512 CPUs, for fp32 and bf16 (bf16: the rows where
// torch's GEMMs are slow: few rows, or any count on CPUs without bf16 dot-product instructions).
// fp32 accumulation; bf16 output rounds to nearest even once.
//
// Dot-product form: a register block of 4 rows of x against 4 rows of w keeps 16 vector
// accumulators over a slice of K, then one shuffle tree turns them into the 16 sums (no
// per-element horizontal reduction). w stays (N, K) row-major as stored; nothing is transposed.
//  - Few rows (memory-bound; bf16: up to 16 rows, measured faster): each weight is read once per
//    call and used for every row of x; bf16 weights are widened in registers (bf16 -> fp32 is a 16-bit shift: one 512-bit load of
//    32 weights gives the even-indexed ones `lane << 16` and the odd ones `lane & 0xffff0000`;
//    x is converted once into the same even/odd order, so no shuffles are needed).
//  - More rows (compute-bound): 4 weight rows at a time, cut into K slices (kKC values, 16 KiB
//    of fp32) that stay in L1 while every row of x passes over them; a bf16 slice is widened to
//    fp32 once per call (from 17 rows), so the inner loop is the same pure fp32 FMA loop for both dtypes.
//  Meanwhile each block of 4 rows of x prefetches a share of the next slice.
// Threads split N (at::parallel_for, torch's thread count).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// Overridable only to try other settings (bench/bench_kernels.py --tune).
#ifndef EXAONE_KC
#define EXAONE_KC 1024  // K slice when x has more than 4 rows (multiple of 32)
#endif
#ifndef EXAONE_WIDEN_ROWS
#define EXAONE_WIDEN_ROWS 17  // bf16: from this many rows, widen weight slices once instead of in registers
#endif
#ifndef EXAONE_WPAD
#define EXAONE_WPAD 16  // floats added to each widened weight row (4 KiB strides share L1 sets)
#endif
#ifndef EXAONE_STREAM_ROWS
#define EXAONE_STREAM_ROWS 2  // up to this many rows of x: one weight row at a time (see stream_rows)
#endif
#ifndef EXAONE_STREAM_PF
#define EXAONE_STREAM_PF 2048  // bytes ahead that stream_rows prefetches (0: the hardware prefetcher alone)
#endif
#ifndef EXAONE_PF_HINT
#define EXAONE_PF_HINT _MM_HINT_T0
#endif
constexpr int64_t kKC = EXAONE_KC;
constexpr int kB = 4;            // the register block: kB rows of x x kB rows of w
constexpr int64_t kChunk = 32;   // bf16 values per 512-bit load

inline __mmask16 mask16(int64_t n) { return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1); }
inline __mmask32 mask32(int64_t n) { return n >= kChunk ? ~__mmask32(0) : (__mmask32(1) << n) - 1; }

// Lane 4 m + n of the result = the sum of the 16 lanes of a[m][n] (45 shuffles and adds).
inline __m512 reduce4x4(const __m512 (&a)[kB][kB]) {
  __m512 v[kB];
  for (int m = 0; m < kB; ++m) {
    // per 128-bit lane: t = (n0, n1, n0, n1), u = (n2, n3, n2, n3), then v = (n0, n1, n2, n3)
    const __m512 t = _mm512_add_ps(_mm512_unpacklo_ps(a[m][0], a[m][1]), _mm512_unpackhi_ps(a[m][0], a[m][1]));
    const __m512 u = _mm512_add_ps(_mm512_unpacklo_ps(a[m][2], a[m][3]), _mm512_unpackhi_ps(a[m][2], a[m][3]));
    const __m512d td = _mm512_castps_pd(t), ud = _mm512_castps_pd(u);
    v[m] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(td, ud)), _mm512_castpd_ps(_mm512_unpackhi_pd(td, ud)));
  }
  // then the four 128-bit lanes of each v[m] are summed into lane m
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(v[0], v[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(v[2], v[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(v[2], v[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// acc[m][n] += w row n . x row m over one 16-wide chunk (Tail: only the lanes in `mask`).
template <int MB, int NB, bool Tail>
inline void f32_chunk(__m512 (&acc)[kB][kB], const float* x, int64_t ldx, const float* w, int64_t ldw,
                      __mmask16 mask) {
  __m512 wv[NB];
  for (int n = 0; n < NB; ++n) wv[n] = Tail ? _mm512_maskz_loadu_ps(mask, w + n * ldw) : _mm512_loadu_ps(w + n * ldw);
  for (int m = 0; m < MB; ++m) {
    const __m512 xv = Tail ? _mm512_maskz_loadu_ps(mask, x + m * ldx) : _mm512_loadu_ps(x + m * ldx);
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_fmadd_ps(wv[n], xv, acc[m][n]);
  }
}

// acc[m][n] += w row n (bf16, widened here) . x row m (fp32, even/odd order) over 32 values.
template <int MB, int NB>
inline void bf16_chunk(__m512 (&acc)[kB][kB], const float* x, int64_t ldx, const uint16_t* w, int64_t ldw,
                       __mmask32 mask) {
  const __m512i hi = _mm512_set1_epi32(0xffff0000);
  __m512 we[NB], wo[NB];
  for (int n = 0; n < NB; ++n) {
    // masked only where K ends (a masked 16-bit load costs more than this branch on AMD Zen)
    const __m512i v = mask == ~__mmask32(0) ? _mm512_loadu_si512(w + n * ldw) : _mm512_maskz_loadu_epi16(mask, w + n * ldw);
    we[n] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    wo[n] = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
  }
  for (int m = 0; m < MB; ++m) {
    const __m512 xe = _mm512_loadu_ps(x + m * ldx), xo = _mm512_loadu_ps(x + m * ldx + 16);
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_fmadd_ps(wo[n], xo, _mm512_fmadd_ps(we[n], xe, acc[m][n]));
  }
}

// The weights to fetch while this block computes: rows first, first + step, ... (< NB) of the
// next slice, row n's at p + n * ld bytes, `elem` bytes per value of K.
struct Prefetch {
  const char* p = nullptr;
  int64_t ld = 0, elem = 0;
  int first = 0, step = 1;
  template <int NB>
  inline void at(int64_t k) const {
    if (p)
      for (int n = first; n < NB; n += step) _mm_prefetch(p + n * ld + k * elem, EXAONE_PF_HINT);
  }
};

// ---- bf16 rows on CPUs with avx512_bf16: weights of type Dp ----------------------------------
// vdpbf16ps multiplies 16 pairs of bf16 values exactly and adds both products to 16 fp32 sums:
// one instruction per (row of x, row of w, 32 values of K), where widening the weight costs two
// FMAs and its share of the widening. x stays bf16 as given; only the tail of K is a masked load
// (zeros beyond K in both): masked 16-bit loads in the main loop held it to half the speed here
// (Zen 5: 16 rows 280 vs 550-630 GFLOP/s). Products of bf16 values are exact in fp32, so only the
// order of the fp32 additions differs from the widening path (and bf16 subnormals count as zero).
// Used for all row counts from 3 on such CPUs (bf16_linear), through the same tile tables, slices
// and prefetch as the other weight types: weights of type `Dp` (bf16 bits) select dp_tile there,
// and x bf16 too.
struct Dp {
  uint16_t bits;
};
// The element type of x that goes with weights of type W.
template <typename W>
using XOf = std::conditional_t<std::is_same_v<W, Dp>, uint16_t, float>;

#define EXAONE_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

// out[m * ldo + n] = (or += when `add`) the sum of the 16 lanes of acc[m][n], m < MB, n < NB.
template <int MB, int NB>
inline void finish(const __m512 (&acc)[kB][kB], float* out, int64_t ldo, bool add) {
  alignas(64) float sums[kB * kB];
  _mm512_store_ps(sums, reduce4x4(acc));
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) out[m * ldo + n] = add ? out[m * ldo + n] + sums[m * kB + n] : sums[m * kB + n];
}

// `tile` (below) for Dp weights, x bf16. Its own function: only it is compiled for avx512_bf16,
// and only CPUs that have it call it.
template <int MB, int NB>
EXAONE_BF16_TARGET void dp_tile(const uint16_t* x, int64_t ldx, const Dp* wd, int64_t ldw, int64_t kc,
                                float* out, int64_t ldo, bool add, const Prefetch& pf) {
  const auto* w = reinterpret_cast<const uint16_t*>(wd);
  __m512 acc[kB][kB];
  for (int m = 0; m < kB; ++m)
    for (int n = 0; n < kB; ++n) acc[m][n] = _mm512_setzero_ps();
  auto chunk = [&](int64_t k, bool tail) EXAONE_BF16_TARGET {
    const __mmask32 mask = mask32(kc - k);
    __m512bh wv[NB];
    for (int n = 0; n < NB; ++n)
      wv[n] = (__m512bh)(tail ? _mm512_maskz_loadu_epi16(mask, w + n * ldw + k) : _mm512_loadu_si512(w + n * ldw + k));
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = (__m512bh)(tail ? _mm512_maskz_loadu_epi16(mask, x + m * ldx + k) : _mm512_loadu_si512(x + m * ldx + k));
      for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], xv, wv[n]);
    }
  };
  int64_t k = 0;
  for (; k + kChunk <= kc; k += kChunk) {
    pf.at<NB>(k);
    chunk(k, false);
  }
  if (k < kc) chunk(k, true);
  finish<MB, NB>(acc, out, ldo, add);
}

// One register block over kc values of K: MB rows of x (row stride ldx) against NB rows of w
// (fp32 or bf16, row stride ldw; Dp weights: dp_tile); out[m * ldo + n] = (or += when `add`) the sums.
template <typename W, int MB, int NB>
void tile(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t kc, float* out, int64_t ldo, bool add,
          const Prefetch& pf) {
  __m512 acc[kB][kB];
  for (int m = 0; m < kB; ++m)
    for (int n = 0; n < kB; ++n) acc[m][n] = _mm512_setzero_ps();
  int64_t k = 0;
  if constexpr (std::is_same_v<W, float>) {
    for (; k + 16 <= kc; k += 16) {
      pf.at<NB>(k);
      f32_chunk<MB, NB, false>(acc, x + k, ldx, w + k, ldw, 0);
    }
    if (k < kc) f32_chunk<MB, NB, true>(acc, x + k, ldx, w + k, ldw, mask16(kc - k));
  } else {  // x is zero-padded to a multiple of 32; the weight's last chunk is masked
    for (; k < kc; k += kChunk) {
      pf.at<NB>(k);
      bf16_chunk<MB, NB>(acc, x + k, ldx, w + k, ldw, mask32(kc - k));
    }
  }
  finish<MB, NB>(acc, out, ldo, add);
}

template <typename W>
using TileFn = void (*)(const XOf<W>*, int64_t, const W*, int64_t, int64_t, float*, int64_t, bool, const Prefetch&);

// The tile for W: Dp's own, the shared one for fp32 and widened bf16.
template <typename W, int MB, int NB>
constexpr TileFn<W> tile_of() {
  if constexpr (std::is_same_v<W, Dp>) return &dp_tile<MB, NB>;
  else return &tile<W, MB, NB>;
}

template <typename W, int MB, int... NBs>
constexpr std::array<TileFn<W>, kB> row_of(std::integer_sequence<int, NBs...>) { return {tile_of<W, MB, NBs + 1>()...}; }

template <typename W, int... MBs>
constexpr std::array<std::array<TileFn<W>, kB>, kB> table_of(std::integer_sequence<int, MBs...>) {
  return {row_of<W, MBs + 1>(std::make_integer_sequence<int, kB>{})...};
}

// kTiles<W>[mb - 1][nb - 1]: the edge blocks of M and N get their own exact-size tiles.
template <typename W>
constexpr auto kTiles = table_of<W>(std::make_integer_sequence<int, kB>{});

// One K slice (kn values) of nb <= 4 weight rows against all M rows of x: out (ldo) = or += the
// partial sums. The slice stays in L1 for every block of x; meanwhile the blocks prefetch `pf`
// (the next slice), each a share of its rows, so memory streams evenly while they compute.
template <typename W>
void slice(const XOf<W>* x, int64_t ldx, int64_t M, const W* w, int64_t ldw, int64_t kn, int64_t nb, float* out,
           int64_t ldo, bool add, Prefetch pf) {
  const int blocks = int((M + kB - 1) / kB);
  pf.step = blocks;
  for (int64_t m = 0; m < M; m += kB) {
    pf.first = int(m / kB);
    kTiles<W>[std::min<int64_t>(kB, M - m) - 1][nb - 1](x + m * ldx, ldx, w, ldw, kn, out + m * ldo, ldo, add, pf);
  }
}

// The next K slice of rows [n0, n0 + 4) after the one at k0 (or the next 4 rows' first), to prefetch.
template <typename W>
Prefetch next_slice(const W* w, int64_t N, int64_t K, int64_t n0, int64_t k0, int64_t kc) {
  Prefetch pf;
  pf.ld = K * int64_t(sizeof(W)), pf.elem = sizeof(W);
  if (k0 + kc < K) pf.p = reinterpret_cast<const char*>(w + n0 * K + k0 + kc);
  else if (n0 + kB < N) pf.p = reinterpret_cast<const char*>(w + (n0 + kB) * K);
  return pf;
}

// 32 values of K of one weight row as two fp32 vectors (bf16: the even and the odd ones), and of
// x row m to match; Tail: only the first `left` values (x beyond K is zero for bf16).
template <typename W, int MB, bool Tail>
inline void stream_chunk(__m512 (&acc)[MB][2], const float* x, int64_t ldx, const W* r, int64_t left) {
  __m512 w0, w1;
  if constexpr (std::is_same_v<W, float>) {
    w0 = Tail ? _mm512_maskz_loadu_ps(mask16(left), r) : _mm512_loadu_ps(r);
    w1 = Tail ? _mm512_maskz_loadu_ps(mask16(left - 16), r + 16) : _mm512_loadu_ps(r + 16);
  } else {
    const __m512i v = Tail ? _mm512_maskz_loadu_epi16(mask32(left), r) : _mm512_loadu_si512(r);
    w0 = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    w1 = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xffff0000)));
  }
  for (int m = 0; m < MB; ++m) {
    const float* xm = x + m * ldx;
    const bool mask_x = Tail && std::is_same_v<W, float>;
    const __m512 x0 = mask_x ? _mm512_maskz_loadu_ps(mask16(left), xm) : _mm512_loadu_ps(xm);
    const __m512 x1 = mask_x ? _mm512_maskz_loadu_ps(mask16(left - 16), xm + 16) : _mm512_loadu_ps(xm + 16);
    acc[m][0] = _mm512_fmadd_ps(w0, x0, acc[m][0]);
    acc[m][1] = _mm512_fmadd_ps(w1, x1, acc[m][1]);
  }
}

// Few rows of x (memory-bound): weight rows [0, nb) one at a time, each read from start to end as
// one stream, against all MB rows of x (held in L1); out[m * ldo + n] = the sums. Reading 4 weight
// rows side by side (the tile form) keeps 4 streams per thread in flight, which the hardware
// prefetchers of some CPUs follow at half the bandwidth (Zen 5: 32 vs 64 GB/s).
// fp32 w: x as is; bf16 w: x in the even/odd order of pack_x, zero-padded to a multiple of 32.
template <typename W, int MB>
void stream_rows(const float* x, int64_t ldx, const W* w, int64_t K, int64_t nb, float* out, int64_t ldo) {
  for (int64_t n = 0; n < nb; ++n) {
    const W* r = w + n * K;
    __m512 acc[MB][2];
    for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + kChunk <= K; k += kChunk) {
      if constexpr (EXAONE_STREAM_PF > 0)
        for (int64_t l = 0; l < kChunk * int64_t(sizeof(W)); l += 64)
          _mm_prefetch(reinterpret_cast<const char*>(r + k) + EXAONE_STREAM_PF + l, EXAONE_PF_HINT);
      stream_chunk<W, MB, false>(acc, x + k, ldx, r + k, kChunk);
    }
    if (k < K) stream_chunk<W, MB, true>(acc, x + k, ldx, r + k, K - k);
    for (int m = 0; m < MB; ++m) out[m * ldo + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
  }
}

template <typename W>
void stream(const float* x, int64_t ldx, int64_t M, const W* w, int64_t K, int64_t nb, float* out, int64_t ldo) {
  switch (M) {
    case 1: return stream_rows<W, 1>(x, ldx, w, K, nb, out, ldo);
    case 2: return stream_rows<W, 2>(x, ldx, w, K, nb, out, ldo);
    case 3: return stream_rows<W, 3>(x, ldx, w, K, nb, out, ldo);
    default: return stream_rows<W, 4>(x, ldx, w, K, nb, out, ldo);
  }
}

// Threads split N in blocks of 4 weight rows; at least ~256K weights per task, so small matrices
// don't pay a thread fork for nothing.
template <typename Fn>
void for_blocks(int64_t N, int64_t K, Fn fn) {
  const int64_t blocks = (N + kB - 1) / kB;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / (kB * K));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fn(b * kB, std::min<int64_t>(kB, N - b * kB));
  });
}

// Checks the inputs and returns the (M, N) output, with `done` set when there is nothing to
// compute (empty shapes; K == 0 gives zeros).
torch::Tensor start(const torch::Tensor& x, const torch::Tensor& w, at::ScalarType dtype, const char* name,
                    bool& done) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == dtype && w.scalar_type() == dtype, name, ": x and w must be ", dtype, ", got ",
              x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, name, ": x must be (M, K) and w (N, K), got ", x.sizes(), " and ",
              w.sizes());
  TORCH_CHECK(x.size(1) == w.size(1), name, ": K mismatch, x ", x.sizes(), " w ", w.sizes());
  TORCH_CHECK(w.is_contiguous(), name, ": w must be contiguous");
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, name, ": x rows must be contiguous (stride(1) == 1)");
  auto out = torch::empty({x.size(0), w.size(0)}, x.options());
  done = out.numel() == 0 || x.size(1) == 0;
  return x.size(1) == 0 ? out.zero_() : out;
}

torch::Tensor f32_linear(const torch::Tensor& x, const torch::Tensor& w) {
  bool done;
  auto out = start(x, w, at::kFloat, "f32_linear", done);
  if (done) return out;
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  if (M <= std::min(EXAONE_STREAM_ROWS, kB)) {
    for_blocks(N, K, [&](int64_t n0, int64_t nb) { stream(xp, ldx, M, wp + n0 * K, K, nb, op + n0, N); });
    return out;
  }
  const int64_t kc = M <= kB ? K : kKC;  // few rows: one pass, each weight row streams in one go
  for_blocks(N, K, [&](int64_t n0, int64_t nb) {
    for (int64_t k0 = 0; k0 < K; k0 += kc)
      slice(xp + k0, ldx, M, wp + n0 * K + k0, K, std::min(kc, K - k0), nb, op + n0, N, k0 > 0,
            next_slice(wp, N, K, n0, k0, kc));
  });
  return out;
}

#ifndef EXAONE_DP_KC
#define EXAONE_DP_KC 1024  // K slice of the Dp tiles from 5 rows of x (multiple of 32): x and w stay in L1
#endif

bool native_bf16() {
  static const bool yes = __builtin_cpu_supports("avx512bf16");
  return yes;
}

// x (M, K) bf16 with row stride ldx -> xp (M, Kp) fp32 with row stride ldp in the even/odd
// order, zero-padded to Kp.
void pack_x(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, float* xp, int64_t ldp, int64_t Kp) {
  const __m512i hi = _mm512_set1_epi32(0xffff0000);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < Kp; k += kChunk) {
      const __m512i v = _mm512_maskz_loadu_epi16(mask32(K - k), x + m * ldx + k);
      _mm512_storeu_ps(xp + m * ldp + k, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
      _mm512_storeu_ps(xp + m * ldp + k + 16, _mm512_castsi512_ps(_mm512_and_si512(v, hi)));
    }
  }
}

// fp32 (rows, n) with row stride lds -> bf16 (rows, n) with row stride ldd, round to nearest even.
void round_rows(const float* s, int64_t lds, int64_t rows, int64_t n, at::BFloat16* d, int64_t ldd) {
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t j = 0; j < n; ++j) d[m * ldd + j] = at::BFloat16(s[m * lds + j]);
}

torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& w) {
  bool done;
  auto out = start(x, w, at::kBFloat16, "bf16_linear", done);
  if (done) return out;
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  auto* op = out.data_ptr<at::BFloat16>();
  if (M > std::min(EXAONE_STREAM_ROWS, kB) && native_bf16()) {  // vdpbf16ps (see dp_tile), x as it is
    const auto* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    const auto* wd = reinterpret_cast<const Dp*>(wp);
    const int64_t kc = M <= kB ? K : EXAONE_DP_KC;  // few rows: one pass; more: K slices that stay in L1
    for_blocks(N, K, [&](int64_t n0, int64_t nb) {
      static thread_local std::vector<float> sums;
      if (sums.size() < size_t(M * kB)) sums.resize(M * kB);
      for (int64_t k0 = 0; k0 < K; k0 += kc)
        slice(xb + k0, x.stride(0), M, wd + n0 * K + k0, K, std::min(kc, K - k0), nb, sums.data(), kB, k0 > 0,
              next_slice(wd, N, K, n0, k0, kc));
      round_rows(sums.data(), kB, M, nb, op + n0, N);
    });
    return out;
  }
  const int64_t Kp = (K + kChunk - 1) / kChunk * kChunk;
  // Per calling thread and reused: a fresh buffer of a few MB would page-fault on every call.
  static thread_local std::vector<float> xbuf;
  if (xbuf.size() < size_t(M * Kp)) xbuf.resize(M * Kp);
  float* xp = xbuf.data();
  pack_x(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), x.stride(0), M, K, xp, Kp, Kp);
  const bool widen_once = M >= EXAONE_WIDEN_ROWS;
  for_blocks(N, K, [&](int64_t n0, int64_t nb) {
    static thread_local std::vector<float> sums, wbuf;  // this block's fp32 sums; its widened weight slice
    if (sums.size() < size_t(M * kB)) sums.resize(M * kB);
    if (M <= std::min(EXAONE_STREAM_ROWS, kB)) {  // memory-bound: one weight row at a time
      stream(xp, Kp, M, wp + n0 * K, K, nb, sums.data(), kB);
    } else if (!widen_once) {  // widen in registers, one pass over each weight row
      slice(xp, Kp, M, wp + n0 * K, K, K, nb, sums.data(), kB, false, next_slice(wp, N, K, n0, 0, K));
    } else {  // compute-bound: widen a slice of the 4 rows once, then the pure fp32 loop for every row of x
      const int64_t ldw = kKC + EXAONE_WPAD;
      if (wbuf.size() < size_t(kB * ldw)) wbuf.resize(kB * ldw);
      for (int64_t k0 = 0; k0 < Kp; k0 += kKC) {
        const int64_t kn = std::min(kKC, Kp - k0);
        pack_x(wp + n0 * K + k0, K, nb, std::min(kn, K - k0), wbuf.data(), ldw, kn);  // x's even/odd order
        slice(xp + k0, Kp, M, wbuf.data(), ldw, kn, nb, sums.data(), kB, k0 > 0, next_slice(wp, N, K, n0, k0, kKC));
      }
    }
    round_rows(sums.data(), kB, M, nb, op + n0, N);
  });
  return out;
}

// ---- RMSNorm for decode-sized inputs ---------------------------------------------------------
// out = w * (x * rsqrt(mean(x^2) + eps)) per row of D values (+ residual when given), with the
// reference's rounding: bf16 rows are normalised in fp32, rounded to bf16, then multiplied by the
// weight (rounded again), and the residual add rounds once more, as the torch ops do. One call
// instead of 7-9 small torch ops; only the order of the sum of squares differs.
// (A full mask takes a plain load: masked loads cost more than a predictable branch on AMD Zen.)
inline __m512 load_f32(const float* p, __mmask16 m) {
  return m == 0xffff ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}
inline __m512 load_f32(const at::BFloat16* p, __mmask16 m) {
  const __m256i v = m == 0xffff ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
// fp32 -> bf16, round to nearest even (NaN stays NaN: its mantissa keeps a high bit after rounding)
inline __m512 round_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(0xffff0000)));
}
// bf16: stores the high halves, so `v` must already be rounded (round_bf16).
inline void store(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store(at::BFloat16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}

// 1 / sqrt(mean(x^2) + eps) over D values, in all lanes.
template <typename T>
inline __m512 rms_scale(const T* x, int64_t D, float eps) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __m512 v = load_f32(x + d, mask16(D - d));
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  return _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / float(D) + eps));
}

// w * (x * scale) for the 16 (masked) values at x and w, rounded as the reference rounds.
template <typename T>
inline __m512 normed(const T* x, const T* w, __mmask16 m, __m512 scale) {
  constexpr bool kBf16 = std::is_same_v<T, at::BFloat16>;
  __m512 h = _mm512_mul_ps(load_f32(x, m), scale);
  if (kBf16) h = round_bf16(h);
  h = _mm512_mul_ps(load_f32(w, m), h);
  return kBf16 ? round_bf16(h) : h;
}

template <typename T>
void rms_rows(const T* x, const T* w, const T* res, T* out, int64_t rows, int64_t D, float eps) {
  constexpr bool kBf16 = std::is_same_v<T, at::BFloat16>;
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * D;
    const __m512 scale = rms_scale(xr, D, eps);
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = mask16(D - d);
      __m512 h = normed(xr + d, w + d, m, scale);
      if (res) {
        h = _mm512_add_ps(load_f32(res + r * D + d, m), h);
        if (kBf16) h = round_bf16(h);
      }
      store(out + r * D + d, h, m);
    }
  }
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps,
                       const c10::optional<torch::Tensor>& residual) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "rms_norm: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "rms_norm: x and w must both be float32 or bfloat16, got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && w.dim() == 1 && x.dim() >= 1 && x.size(-1) == w.size(0),
              "rms_norm: x (..., D) and w (D) must be contiguous, got ", x.sizes(), " and ", w.sizes());
  if (residual)
    TORCH_CHECK(residual->scalar_type() == x.scalar_type() && residual->sizes() == x.sizes() && residual->is_contiguous(),
                "rms_norm: residual must be a contiguous ", x.scalar_type(), " tensor of shape ", x.sizes());
  auto out = torch::empty_like(x);
  const int64_t D = w.size(0), rows = D ? x.numel() / D : 0;
  if (rows == 0) return out;
  // Threads split the rows, at least ~64K values each (decode: one thread, no fork).
  at::parallel_for(0, rows, std::max<int64_t>(1, (int64_t(1) << 16) / D), [&](int64_t r0, int64_t r1) {
    if (x.scalar_type() == at::kFloat)
      rms_rows<float>(x.data_ptr<float>() + r0 * D, w.data_ptr<float>(),
                      residual ? residual->data_ptr<float>() + r0 * D : nullptr, out.data_ptr<float>() + r0 * D,
                      r1 - r0, D, float(eps));
    else
      rms_rows<at::BFloat16>(x.data_ptr<at::BFloat16>() + r0 * D, w.data_ptr<at::BFloat16>(),
                             residual ? residual->data_ptr<at::BFloat16>() + r0 * D : nullptr,
                             out.data_ptr<at::BFloat16>() + r0 * D, r1 - r0, D, float(eps));
  });
  return out;
}

// ---- q/k norm + RoPE for decode-sized inputs ---------------------------------------------------
// out[t, h] = rope(w * x[t, h] / rms(x[t, h])) for each head h of D values of row t, with the
// reference's rounding (RMSNorm as above; then x * cos, roll(x, D/2) * sin and their sum, each
// rounded to bf16 for bf16). x rows may be strided (a slice of a fused q/k/v projection); cos and
// sin are (T, D) with sin's first half negated (model.rope_cos_sin), or absent: no rotation.
// One row's heads: head hd of x (D values at x + hd * D) -> out + hd * ldh. cos, sin: this row's
// D values, or null (no rotation).
template <typename T>
void norm_rope_heads(const T* x, const T* w, const T* cos, const T* sin, T* out, int64_t ldh, int64_t heads,
                     int64_t D, float eps) {
  constexpr bool kBf16 = std::is_same_v<T, at::BFloat16>;
  alignas(64) float h[1024];  // one normalised head (D <= 1024, checked)
  const int64_t half = D / 2;
  for (int64_t hd = 0; hd < heads; ++hd) {
    const T* xr = x + hd * D;
    const __m512 scale = rms_scale(xr, D, eps);
    T* o = out + hd * ldh;
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = mask16(D - d);
      const __m512 v = normed(xr + d, w + d, m, scale);
      if (cos) _mm512_store_ps(h + d, v);
      else store(o + d, v, m);
    }
    if (!cos) continue;
    for (int64_t d = 0; d < D; d += 16) {  // D % 32 == 0 (checked): whole vectors, halves align
      __m512 a = _mm512_mul_ps(_mm512_load_ps(h + d), load_f32(cos + d, 0xffff));
      __m512 b = _mm512_mul_ps(_mm512_load_ps(h + (d + half) % D), load_f32(sin + d, 0xffff));
      if (kBf16) a = round_bf16(a), b = round_bf16(b);
      __m512 r = _mm512_add_ps(a, b);
      if (kBf16) r = round_bf16(r);
      store(o + d, r, 0xffff);
    }
  }
}

template <typename T>
void norm_rope_rows(const T* x, int64_t ldx, const T* w, const T* cos, const T* sin, T* out, int64_t t0, int64_t t1,
                    int64_t heads, int64_t D, float eps) {
  for (int64_t t = t0; t < t1; ++t)
    norm_rope_heads(x + t * ldx, w, cos ? cos + t * D : nullptr, sin ? sin + t * D : nullptr, out + t * heads * D, D,
                    heads, D, eps);
}

// The checks norm_rope and attend_decode share: w (D,), cos/sin (T, D) of x's dtype or both absent.
void check_norm_rope(const char* name, at::ScalarType dtype, int64_t T, const torch::Tensor& w,
                     const c10::optional<torch::Tensor>& cos, const c10::optional<torch::Tensor>& sin) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == dtype && (dtype == at::kFloat || dtype == at::kBFloat16),
              name, ": x and the norm weights must all be float32 or bfloat16 CPU tensors");
  const int64_t D = w.numel();
  TORCH_CHECK(w.dim() == 1 && w.is_contiguous() && D > 0 && D <= 1024, name, ": norm weights must be contiguous (D,), D <= 1024");
  TORCH_CHECK(cos.has_value() == sin.has_value(), name, ": give cos and sin together");
  if (cos)
    TORCH_CHECK(D % 32 == 0 && cos->scalar_type() == dtype && sin->scalar_type() == dtype &&
                cos->dim() == 2 && cos->size(0) == T && cos->size(1) == D && sin->sizes() == cos->sizes() &&
                cos->is_contiguous() && sin->is_contiguous(),
                name, ": cos and sin must be contiguous (T, D) tensors of x's dtype, D a multiple of 32; got ",
                cos->sizes(), " for ", T, " rows");
}

torch::Tensor norm_rope(const torch::Tensor& x, int64_t heads, const torch::Tensor& w, double eps,
                        const c10::optional<torch::Tensor>& cos, const c10::optional<torch::Tensor>& sin) {
  TORCH_CHECK(x.device().is_cpu(), "norm_rope: CPU tensors only");
  const int64_t D = w.numel(), T = x.dim() == 2 ? x.size(0) : 0;
  check_norm_rope("norm_rope", x.scalar_type(), T, w, cos, sin);
  TORCH_CHECK(x.dim() == 2 && heads > 0 && x.size(1) == heads * D && (x.stride(1) == 1 || x.size(1) == 1),
              "norm_rope: x must be (T, heads * D) with contiguous rows, got ", x.sizes(), " for ", heads, " heads of ", D);
  auto out = torch::empty({T, heads * D}, x.options());
  if (T == 0) return out;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (heads * D));
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    if (x.scalar_type() == at::kFloat)
      norm_rope_rows<float>(x.data_ptr<float>(), x.stride(0), w.data_ptr<float>(), cos ? cos->data_ptr<float>() : nullptr,
                            sin ? sin->data_ptr<float>() : nullptr, out.data_ptr<float>(), t0, t1, heads, D, float(eps));
    else
      norm_rope_rows<at::BFloat16>(x.data_ptr<at::BFloat16>(), x.stride(0), w.data_ptr<at::BFloat16>(),
                                   cos ? cos->data_ptr<at::BFloat16>() : nullptr,
                                   sin ? sin->data_ptr<at::BFloat16>() : nullptr, out.data_ptr<at::BFloat16>(), t0, t1,
                                   heads, D, float(eps));
  });
  return out;
}

// ---- argmax over the vocabulary -----------------------------------------------------------------
// torch.argmax's answer per row (the first index of the maximum; a NaN counts as the maximum, the
// first NaN wins) in two vector passes: the maximum, then its first index. torch's own reduction
// runs 1.4 ns a value (fp32; bf16 4 ns), 0.1-0.4 ms per 102400-token row, every decode step.
template <typename T>
int64_t argmax_row(const T* x, int64_t N) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  __m512 mx[4] = {ninf, ninf, ninf, ninf};
  __mmask16 nan = 0;
  int64_t k = 0;
  for (; k + 64 <= N; k += 64)
    for (int j = 0; j < 4; ++j) {
      const __m512 v = load_f32(x + k + 16 * j, 0xffff);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      mx[j] = _mm512_max_ps(mx[j], v);
    }
  for (; k < N; k += 16) {
    const __mmask16 m = mask16(N - k);
    const __m512 v = _mm512_mask_mov_ps(ninf, m, load_f32(x + k, m));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    mx[0] = _mm512_max_ps(mx[0], v);
  }
  if (nan) {
    for (int64_t i = 0; i < N; ++i)
      if (std::isnan(float(x[i]))) return i;
  }
  const __m512 best = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(mx[0], mx[1]), _mm512_max_ps(mx[2], mx[3]))));
  for (k = 0; k < N; k += 16) {
    const __mmask16 m = mask16(N - k);
    const __mmask16 eq = _mm512_mask_cmp_ps_mask(m, load_f32(x + k, m), best, _CMP_EQ_OQ);
    if (eq) return k + __builtin_ctz(eq);
  }
  return 0;  // unreachable for N > 0: the maximum is one of the values
}

torch::Tensor argmax(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "argmax: x must be a float32 or bfloat16 CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && (x.stride(1) == 1 || x.size(1) == 1),
              "argmax: x must be (M, N) with N > 0 and contiguous rows, got ", x.sizes());
  const int64_t M = x.size(0), N = x.size(1), ld = x.stride(0);
  auto out = torch::empty({M}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, M, std::max<int64_t>(1, (int64_t(1) << 17) / N), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      op[r] = x.scalar_type() == at::kFloat ? argmax_row(x.data_ptr<float>() + r * ld, N)
                                            : argmax_row(x.data_ptr<at::BFloat16>() + r * ld, N);
  });
  return out;
}

// ---- Attention of one query per row (decode) --------------------------------------------------
// out[b, h] = softmax(scale q[b, h] . k[b, g, j] for j < len[b]) . v[b, g, :len[b]], g = h / rep.
// One task per (row, kv head): its rep query heads are the rows of x in `slice` against 4 keys at a
// time (scores in fp32, no per-key horizontal sums), then an exp pass, then one pass over v that
// accumulates all rep heads; k and v are read once. Replaces ~8 small torch ops a layer.

// Rows of k and v prefetched ahead of the one in use (0: leave it to the hardware). In decode they
// are cold, and each head's rows are a short stream the prefetchers ramp up to late. 8 kv heads of
// 64, each call after a 128 MB read (means over 30 k/v sets): bf16 400 keys 103 -> 57 us, 4000 keys
// 1103 -> 395 us, 48 keys 41 -> 35 us; fp32 4000 keys 861 -> 447 us; 16 and 32 rows measured
// alike. Inside int4 engine steps: 400 keys 98 -> 48 us a call, 40 keys 25 -> 20 us. Prefetches
// never fault, so the rows past the end need no check.
#ifndef EXAONE_ATTN_AHEAD
#define EXAONE_ATTN_AHEAD 16
#endif
constexpr int64_t kAttnAhead = EXAONE_ATTN_AHEAD;

// e^x for x <= 0 (softmax after subtracting the max): 2^(x log2 e) = 2^n 2^f with a degree-6
// polynomial for 2^f, f in [-0.5, 0.5] (relative error < 2e-7); scalef applies 2^n.
inline __m512 exp_neg(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-126.0f)), _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5353362e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3398874e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6184197e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503406e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022652e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// acc[h][0, 16 NV) = sum_j p[h * ldp + j] v[j * ldv + (0, 16 NV)] for HC heads, sums in registers
// (acc row stride lda). A D beyond 128 goes in 128-wide column passes.
template <typename T, int NV, int HC>
void v_pass(const float* p, int64_t ldp, const T* v, int64_t ldv, int64_t len, float* acc, int64_t lda) {
  __m512 s[HC][NV];
  for (int h = 0; h < HC; ++h)
    for (int n = 0; n < NV; ++n) s[h][n] = _mm512_setzero_ps();
  for (int64_t j = 0; j < len; ++j) {
    if constexpr (kAttnAhead > 0)  // cold rows (the weights streamed through since the last step)
      for (int64_t l = 0; l < int64_t(16 * NV * sizeof(T)); l += 64)
        _mm_prefetch(reinterpret_cast<const char*>(v + (j + kAttnAhead) * ldv) + l, _MM_HINT_T0);
    __m512 vv[NV];
    for (int n = 0; n < NV; ++n) vv[n] = load_f32(v + j * ldv + 16 * n, 0xffff);
    for (int h = 0; h < HC; ++h) {
      const __m512 pb = _mm512_set1_ps(p[h * ldp + j]);
      for (int n = 0; n < NV; ++n) s[h][n] = _mm512_fmadd_ps(pb, vv[n], s[h][n]);
    }
  }
  for (int h = 0; h < HC; ++h)
    for (int n = 0; n < NV; ++n) _mm512_storeu_ps(acc + h * lda + 16 * n, s[h][n]);
}

// All rep heads: HC at a time (as many as keep HC x NV sums and the NV values of v in registers),
// then the remaining heads in one smaller pass.
template <typename T, int NV>
void v_pass_heads(int64_t rep, const float* p, int64_t ldp, const T* v, int64_t ldv, int64_t len, float* acc,
                  int64_t lda) {
  constexpr int HC = NV <= 4 ? 4 : 2;
  int64_t h = 0;
  for (; h + HC <= rep; h += HC) v_pass<T, NV, HC>(p + h * ldp, ldp, v, ldv, len, acc + h * lda, lda);
  switch (rep - h) {
    case 0: return;
    case 1: return v_pass<T, NV, 1>(p + h * ldp, ldp, v, ldv, len, acc + h * lda, lda);
    case 2: return v_pass<T, NV, (HC > 2 ? 2 : 1)>(p + h * ldp, ldp, v, ldv, len, acc + h * lda, lda);
    default: return v_pass<T, NV, (HC > 3 ? 3 : 1)>(p + h * ldp, ldp, v, ldv, len, acc + h * lda, lda);
  }
}

template <typename T>
void attend_one(const T* q, int64_t ldq, int64_t rep, const T* k, const T* v, int64_t ldk, int64_t len, int64_t D,
                float scale, T* out, int64_t ldo, float* qbuf, float* scores, float* inv) {
  using W = std::conditional_t<std::is_same_v<T, float>, float, uint16_t>;
  {  // Up front, the first kAttnAhead rows of k and of v: the passes below ask for each later row
     // kAttnAhead rows before its use, so these are the ones they never ask for (and v's arrive
     // while the k pass runs). This replaced a fixed first 16 KB: the same time a call in int4
     // steps (40 keys 17.9 vs 17.1 us, 400 keys 45.9 vs 46.1) and cold (4000 keys 403 vs 365 us).
    const int64_t bytes = std::min(len, kAttnAhead) * ldk * int64_t(sizeof(T));
    for (int64_t l = 0; l < bytes; l += 64) _mm_prefetch(reinterpret_cast<const char*>(k) + l, _MM_HINT_T0);
    for (int64_t l = 0; l < bytes; l += 64) _mm_prefetch(reinterpret_cast<const char*>(v) + l, _MM_HINT_T0);
  }
  // q rows (scaled once here) in the layout `slice` wants: fp32 as is; bf16 widened, even/odd.
  for (int64_t h = 0; h < rep; ++h) {
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t d = 0; d < D; ++d) qbuf[h * D + d] = q[h * ldq + d] * scale;
    } else {
      pack_x(reinterpret_cast<const uint16_t*>(q + h * ldq), D, 1, D, qbuf + h * D, D, D);
      for (int64_t d = 0; d < D; ++d) qbuf[h * D + d] *= scale;
    }
  }
  const W* kw = reinterpret_cast<const W*>(k);
  for (int64_t j = 0; j < len; j += kB) {
    if constexpr (kAttnAhead > 0)
      for (int64_t l = 0; l < kB * ldk * int64_t(sizeof(T)); l += 64)
        _mm_prefetch(reinterpret_cast<const char*>(k + (j + kAttnAhead) * ldk) + l, _MM_HINT_T0);
    slice(qbuf, D, rep, kw + j * ldk, ldk, D, std::min<int64_t>(kB, len - j), scores + j, len, false, Prefetch{});
  }
  for (int64_t h = 0; h < rep; ++h) {  // scores -> exp(scores - max); inv[h] = 1 / their sum
    float* s = scores + h * len;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < len; j += 16)
      mx = _mm512_mask_max_ps(mx, mask16(len - j), mx, _mm512_maskz_loadu_ps(mask16(len - j), s + j));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; j += 16) {
      const __mmask16 mk = mask16(len - j);
      const __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + j), m));
      _mm512_mask_storeu_ps(s + j, mk, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mk, e));
    }
    inv[h] = 1.0f / _mm512_reduce_add_ps(sum);
  }
  float* acc = qbuf;  // q is done with: rep x D fp32 sums
  if (D == 32) v_pass_heads<T, 2>(rep, scores, len, v, ldk, len, acc, D);
  else if (D == 64) v_pass_heads<T, 4>(rep, scores, len, v, ldk, len, acc, D);
  else for (int64_t d = 0; d < D; d += 128) v_pass_heads<T, 8>(rep, scores, len, v + d, ldk, len, acc + d, D);
  for (int64_t h = 0; h < rep; ++h)
    for (int64_t d = 0; d < D; d += 16) {
      __m512 y = _mm512_mul_ps(_mm512_loadu_ps(acc + h * D + d), _mm512_set1_ps(inv[h]));
      if constexpr (!std::is_same_v<T, float>) y = round_bf16(y);
      store(out + h * ldo + d, y, 0xffff);
    }
}

// All (row, kv head) tasks: q row b's head h at q + b * ldqb + h * ldqh; k and v row b's head g at
// + b * ldkb + g * ldkg, D values a slot, slots [0, len[b]); out (B, H, D) contiguous. L: the most
// slots a row may have (the scores buffer).
template <typename T>
void attend_rows(const T* q, int64_t ldqb, int64_t ldqh, const T* k, const T* v, int64_t ldkb, int64_t ldkg,
                 const int64_t* len, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t L, float scale, T* out) {
  const int64_t rep = H / KVH;
  // Small contexts on one thread: a fork costs more than the work.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, L * D));
  at::parallel_for(0, B * KVH, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> qbuf(rep * D), scores(rep * L), inv(rep);  // per worker, reused by its tasks
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / KVH, g = t % KVH;
      attend_one<T>(q + b * ldqb + g * rep * ldqh, ldqh, rep, k + b * ldkb + g * ldkg, v + b * ldkb + g * ldkg, D,
                    len[b], D, scale, out + (b * H + g * rep) * D, D, qbuf.data(), scores.data(), inv.data());
    }
  });
}

void check_attention(const char* name, int64_t H, int64_t KVH, int64_t D) {
  TORCH_CHECK(KVH > 0 && H % KVH == 0, name, ": heads ", H, " not a multiple of kv heads ", KVH);
  TORCH_CHECK(D == 32 || D == 64 || D % 128 == 0, name, ": head_dim must be 32, 64 or a multiple of 128, got ", D);
}

// q (B, H, D) with any row strides; k, v (B, KVH, L, D) with rows of D contiguous (the cache's
// slices); lengths (B,) int64 in [1, L]. Returns (B, H, D) contiguous.
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& lengths, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "decode_attention: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type() &&
              (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "decode_attention: q, k, v must all be float32 or bfloat16");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(3),
              "decode_attention: q (B, H, D), k and v (B, KVH, L, D), got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k.size(1), L = k.size(2);
  check_attention("decode_attention", H, KVH, D);
  TORCH_CHECK(q.stride(2) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && k.stride(2) == D && v.stride(2) == D &&
              k.strides() == v.strides(), "decode_attention: rows of D values must be contiguous, k and v alike");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1 && lengths.size(0) == B && lengths.is_contiguous(),
              "decode_attention: lengths must be a contiguous int64 (B,) tensor");
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(len[b] >= 1 && len[b] <= L, "decode_attention: lengths must be in [1, ", L, "], got ", len[b]);
  auto out = torch::empty({B, H, D}, q.options());
  if (q.scalar_type() == at::kFloat)
    attend_rows<float>(q.data_ptr<float>(), q.stride(0), q.stride(1), k.data_ptr<float>(), v.data_ptr<float>(),
                       k.stride(0), k.stride(1), len, B, H, KVH, D, L, float(scale), out.data_ptr<float>());
  else
    attend_rows<at::BFloat16>(q.data_ptr<at::BFloat16>(), q.stride(0), q.stride(1), k.data_ptr<at::BFloat16>(),
                              v.data_ptr<at::BFloat16>(), k.stride(0), k.stride(1), len, B, H, KVH, D, L, float(scale),
                              out.data_ptr<at::BFloat16>());
  return out;
}

// ---- A decode step's attention, from the projections to o_proj's input -----------------------
// One call for what is otherwise ~25 torch ops a layer: q/k norm + RoPE (as norm_rope), k and v
// written into the cache at each row's slot, attention over the row's valid slots (as
// decode_attention). q, k, v (B, heads * D) rows (any row stride: slices of a fused projection);
// cache K, V (R, KVH, S, D) contiguous, the batch at rows [row0, row0 + B); pos (B,) the query
// positions. window 0 (global layer): slot = pos, slots [0, pos]; else (sliding ring of S = window
// slots): slot = pos % window, slots [0, min(pos + 1, window)). Returns (B, H * D).
template <typename T>
void attend_decode_typed(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                         const torch::Tensor& qw, const torch::Tensor& kw, float eps,
                         const c10::optional<torch::Tensor>& cos, const c10::optional<torch::Tensor>& sin,
                         torch::Tensor& K, torch::Tensor& V, int64_t row0, const int64_t* slot, const int64_t* len,
                         int64_t L, float scale, torch::Tensor& qn, torch::Tensor& out) {
  const int64_t B = q.size(0), D = qw.numel(), H = q.size(1) / D, KVH = k.size(1) / D, S = K.size(2);
  const T* cs = cos ? cos->data_ptr<T>() : nullptr;
  const T* sn = sin ? sin->data_ptr<T>() : nullptr;
  T* Kp = K.data_ptr<T>() + row0 * K.stride(0);
  T* Vp = V.data_ptr<T>() + row0 * V.stride(0);
  for (int64_t b = 0; b < B; ++b) {
    const T* c = cs ? cs + b * D : nullptr;
    const T* s = sn ? sn + b * D : nullptr;
    norm_rope_heads(q.data_ptr<T>() + b * q.stride(0), qw.data_ptr<T>(), c, s, qn.data_ptr<T>() + b * H * D, D, H, D, eps);
    norm_rope_heads(k.data_ptr<T>() + b * k.stride(0), kw.data_ptr<T>(), c, s, Kp + b * K.stride(0) + slot[b] * D,
                    S * D, KVH, D, eps);
    for (int64_t g = 0; g < KVH; ++g)
      std::copy_n(v.data_ptr<T>() + b * v.stride(0) + g * D, D, Vp + b * V.stride(0) + g * S * D + slot[b] * D);
  }
  attend_rows<T>(qn.data_ptr<T>(), H * D, D, Kp, Vp, K.stride(0), K.stride(1), len, B, H, KVH, D, L, scale,
                 out.data_ptr<T>());
}

torch::Tensor attend_decode(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                            const torch::Tensor& q_norm, const torch::Tensor& k_norm, double eps,
                            const c10::optional<torch::Tensor>& cos, const c10::optional<torch::Tensor>& sin,
                            torch::Tensor K, torch::Tensor V, int64_t row0, const torch::Tensor& pos,
                            int64_t window, double scale) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && K.device().is_cpu() &&
              V.device().is_cpu() && pos.device().is_cpu(), "attend_decode: CPU tensors only");
  const int64_t B = q.dim() == 2 ? q.size(0) : 0, D = q_norm.numel();
  check_norm_rope("attend_decode", dtype, B, q_norm, cos, sin);
  check_norm_rope("attend_decode", dtype, B, k_norm, cos, sin);
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype && K.scalar_type() == dtype && V.scalar_type() == dtype,
              "attend_decode: q, k, v and the cache must have one dtype");
  TORCH_CHECK(K.dim() == 4 && V.sizes() == K.sizes() && K.is_contiguous() && V.is_contiguous() && K.size(3) == D,
              "attend_decode: the cache must be contiguous (R, KVH, S, D) tensors, got ", K.sizes(), " and ", V.sizes());
  const int64_t KVH = K.size(1), S = K.size(2);
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && v.dim() == 2 && k.size(0) == B && v.size(0) == B &&
              q.size(1) % D == 0 && k.size(1) == KVH * D && v.size(1) == KVH * D &&
              q.stride(1) == 1 && k.stride(1) == 1 && v.stride(1) == 1,
              "attend_decode: q (B, H * D), k and v (B, KVH * D) with contiguous rows, got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes(), " for D ", D, ", KVH ", KVH);
  const int64_t H = q.size(1) / D;
  check_attention("attend_decode", H, KVH, D);
  TORCH_CHECK(row0 >= 0 && row0 + B <= K.size(0), "attend_decode: rows [", row0, ", ", row0 + B,
              ") outside the cache's ", K.size(0));
  TORCH_CHECK(window >= 0 && (window == 0 || window == S), "attend_decode: window must be 0 or the ring's ", S, " slots");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.dim() == 1 && pos.size(0) == B && pos.is_contiguous(),
              "attend_decode: pos must be a contiguous int64 (B,) tensor");
  const int64_t* p = pos.data_ptr<int64_t>();
  std::vector<int64_t> slot(B), len(B);
  int64_t L = 1;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(p[b] >= 0 && (window > 0 || p[b] < S), "attend_decode: position ", p[b], " outside [0, ", S, ")");
    slot[b] = window ? p[b] % window : p[b];
    len[b] = window ? std::min(p[b] + 1, window) : p[b] + 1;
    L = std::max(L, len[b]);
  }
  auto qn = torch::empty({B, H * D}, q.options());
  auto out = torch::empty({B, H * D}, q.options());
  if (B == 0) return out;
  if (dtype == at::kFloat)
    attend_decode_typed<float>(q, k, v, q_norm, k_norm, float(eps), cos, sin, K, V, row0, slot.data(), len.data(), L,
                               float(scale), qn, out);
  else
    attend_decode_typed<at::BFloat16>(q, k, v, q_norm, k_norm, float(eps), cos, sin, K, V, row0, slot.data(),
                                      len.data(), L, float(scale), qn, out);
  return out;
}

// ---- silu(gate) * up ----------------------------------------------------------------------------
// As F.silu(gate) * up with its roundings (bf16: silu rounded, then the product): one call and one
// output instead of two ops and an intermediate. silu(x) = x sigmoid(x), sigmoid from e^-|x|
// (exp_neg, relative error < 2e-7): 1 / (1 + e) for x >= 0, e / (1 + e) below.
template <typename T>
void silu_mul_rows(const T* g, int64_t ldg, const T* u, int64_t ldu, T* out, int64_t r0, int64_t r1, int64_t N) {
  constexpr bool kBf16 = std::is_same_v<T, at::BFloat16>;
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t n = 0; n < N; n += 16) {
      const __mmask16 m = mask16(N - n);
      const __m512 x = load_f32(g + r * ldg + n, m);
      const __m512 e = exp_neg(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
      const __m512 sig = _mm512_div_ps(_mm512_mask_mov_ps(one, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), e),
                                       _mm512_add_ps(one, e));
      __m512 s = _mm512_mul_ps(x, sig);
      if (kBf16) s = round_bf16(s);
      __m512 y = _mm512_mul_ps(s, load_f32(u + r * ldu + n, m));
      if (kBf16) y = round_bf16(y);
      store(out + r * N + n, y, m);
    }
}

torch::Tensor silu_mul(const torch::Tensor& gate, const torch::Tensor& up) {
  TORCH_CHECK(gate.device().is_cpu() && up.device().is_cpu() && gate.scalar_type() == up.scalar_type() &&
              (gate.scalar_type() == at::kFloat || gate.scalar_type() == at::kBFloat16),
              "silu_mul: gate and up must both be float32 or bfloat16 CPU tensors");
  TORCH_CHECK(gate.dim() == 2 && up.sizes() == gate.sizes() && (gate.stride(1) == 1 || gate.size(1) <= 1) &&
              (up.stride(1) == 1 || up.size(1) <= 1),
              "silu_mul: gate and up must be (M, N) with contiguous rows, got ", gate.sizes(), " and ", up.sizes());
  const int64_t M = gate.size(0), N = gate.size(1);
  auto out = torch::empty({M, N}, gate.options());
  if (M == 0 || N == 0) return out;
  at::parallel_for(0, M, std::max<int64_t>(1, (int64_t(1) << 16) / N), [&](int64_t r0, int64_t r1) {
    if (gate.scalar_type() == at::kFloat)
      silu_mul_rows<float>(gate.data_ptr<float>(), gate.stride(0), up.data_ptr<float>(), up.stride(0),
                           out.data_ptr<float>(), r0, r1, N);
    else
      silu_mul_rows<at::BFloat16>(gate.data_ptr<at::BFloat16>(), gate.stride(0), up.data_ptr<at::BFloat16>(),
                                  up.stride(0), out.data_ptr<at::BFloat16>(), r0, r1, N);
  });
  return out;
}

// ---- The layers of a decode step in one call ---------------------------------------------------
// What model.DecoderLayer.forward does for a one-token step with a KVCache, layer after layer, with
// the same kernels in the same order (so the same numbers), but without ~25 Python-level calls a
// layer between them: exaone/decode_plan.py builds a DecodeLayers from a model once. A group is
// the linears that share an input: q|k|v, o, gate|up, down. kind 0 / 1: float32 / bfloat16
// weights, one f32_linear / bf16_linear call each; kind 2: packed int8 / int4 weights, one call of
// qgemm's qlinear_many (another extension: its address comes in a capsule) and column slices.
using QLinearMany = torch::Tensor (*)(const torch::Tensor&, const std::vector<torch::Tensor>&,
                                      const std::vector<torch::Tensor>&, const std::vector<int64_t>&, int64_t, int64_t);

struct Group {
  int64_t kind;
  std::vector<torch::Tensor> w, s;
  std::vector<int64_t> n;
  int64_t bits, block;
};

struct Layer {
  Group qkv, o, gate_up, down;
  torch::Tensor q_norm, k_norm, post_attn, post_ff;
  double eps;
  int64_t window;  // 0: global layer; else the ring's slots
  bool rope;
};

class DecodeLayers {
 public:
  DecodeLayers(py::object qlinear_many, std::vector<Layer> layers) : layers_(std::move(layers)) {
    if (!qlinear_many.is_none()) qfn_ = reinterpret_cast<QLinearMany>(qlinear_many.cast<py::capsule>().get_pointer());
    for (const Layer& l : layers_) {
      TORCH_CHECK(l.qkv.n.size() == 3 && l.o.n.size() == 1 && l.gate_up.n.size() == 2 && l.down.n.size() == 1,
                  "DecodeLayers: a layer's groups are q|k|v, o, gate|up, down");
      for (const Group* g : {&l.qkv, &l.o, &l.gate_up, &l.down})
        TORCH_CHECK(g->kind >= 0 && g->kind <= 2 && g->w.size() == g->n.size() && (g->kind != 2 || qfn_) &&
                    (g->kind != 2 || g->s.size() == g->n.size()),
                    "DecodeLayers: a group needs one weight (and for kind 2 one scales tensor) per part, kind 0-2, "
                    "and kind 2 the qlinear_many capsule");
    }
  }

  // x (B, hidden) -> x after every layer. cos, sin (B, D) for the RoPE layers (or None); pos (B,)
  // int64 positions; the batch is rows [row0, row0 + B) of the cache's per-layer K and V.
  torch::Tensor run(torch::Tensor x, const c10::optional<torch::Tensor>& cos, const c10::optional<torch::Tensor>& sin,
                    const torch::Tensor& pos, int64_t row0, const std::vector<torch::Tensor>& K,
                    const std::vector<torch::Tensor>& V) const {
    TORCH_CHECK(K.size() == layers_.size() && V.size() == layers_.size(), "DecodeLayers: one K and V per layer");
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "DecodeLayers: x must be a contiguous (B, hidden) tensor");
    const c10::optional<torch::Tensor> none;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      auto qkv = apply(l.qkv, x);
      const double scale = 1.0 / std::sqrt(double(l.q_norm.numel()));
      auto a = attend_decode(qkv[0], qkv[1], qkv[2], l.q_norm, l.k_norm, l.eps, l.rope ? cos : none,
                             l.rope ? sin : none, K[i], V[i], row0, pos, l.window, scale);
      x = rms_norm(apply(l.o, a)[0], l.post_attn, l.eps, x);
      auto gu = apply(l.gate_up, x);
      x = rms_norm(apply(l.down, silu_mul(gu[0], gu[1]))[0], l.post_ff, l.eps, x);
    }
    return x;
  }

 private:
  std::vector<torch::Tensor> apply(const Group& g, const torch::Tensor& x) const {
    std::vector<torch::Tensor> out;
    if (g.kind == 2) {
      auto y = qfn_(x, g.w, g.s, g.n, g.bits, g.block);
      int64_t c = 0;
      for (int64_t n : g.n) out.push_back(y.narrow(1, c, n)), c += n;
      return out;
    }
    for (const auto& w : g.w) out.push_back(g.kind == 0 ? f32_linear(x, w) : bf16_linear(x, w));
    return out;
  }

  QLinearMany qfn_ = nullptr;
  std::vector<Layer> layers_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("f32_linear", &f32_linear, "x (M, K) fp32 @ w (N, K)^T fp32 -> (M, N) fp32");
  m.def("bf16_linear", &bf16_linear, "x (M, K) bf16 @ w (N, K)^T bf16 -> (M, N) bf16, fp32 accumulation");
  m.def("rms_norm", &rms_norm, "[residual +] w * x / rms(x) over the last dim, fp32 or bf16",
        py::arg("x"), py::arg("w"), py::arg("eps"), py::arg("residual") = py::none());
  m.def("norm_rope", &norm_rope, "per head of D: RoPE(w * x / rms(x)); x (T, heads * D), cos/sin (T, D) or None",
        py::arg("x"), py::arg("heads"), py::arg("w"), py::arg("eps"), py::arg("cos") = py::none(),
        py::arg("sin") = py::none());
  m.def("argmax", &argmax, "x (M, N) fp32 or bf16 -> (M,) int64, torch.argmax(x, -1)'s answer");
  m.def("decode_attention", &decode_attention, "one query per row: q (B, H, D), k/v (B, KVH, L, D), lengths (B,)");
  m.def("attend_decode", &attend_decode,
        "decode attention from the projections: q/k norm + RoPE, k/v into the cache at each row's slot, attention",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_norm"), py::arg("k_norm"), py::arg("eps"), py::arg("cos"),
        py::arg("sin"), py::arg("K"), py::arg("V"), py::arg("row0"), py::arg("pos"), py::arg("window"), py::arg("scale"));
  m.def("silu_mul", &silu_mul, "silu(gate) * up, (M, N) rows, fp32 or bf16");
  py::class_<Group>(m, "Group")
      .def(py::init([](int64_t kind, std::vector<torch::Tensor> w, std::vector<torch::Tensor> s, std::vector<int64_t> n,
                       int64_t bits, int64_t block) { return Group{kind, std::move(w), std::move(s), std::move(n), bits, block}; }),
           py::arg("kind"), py::arg("w"), py::arg("s"), py::arg("n"), py::arg("bits") = 0, py::arg("block") = 0);
  py::class_<Layer>(m, "Layer")
      .def(py::init([](Group qkv, Group o, Group gate_up, Group down, torch::Tensor q_norm, torch::Tensor k_norm,
                       torch::Tensor post_attn, torch::Tensor post_ff, double eps, int64_t window, bool rope) {
             return Layer{std::move(qkv), std::move(o), std::move(gate_up), std::move(down), std::move(q_norm),
                          std::move(k_norm), std::move(post_attn), std::move(post_ff), eps, window, rope};
           }));
  py::class_<DecodeLayers>(m, "DecodeLayers")
      .def(py::init<py::object, std::vector<Layer>>(), py::arg("qlinear_many"), py::arg("layers"))
      .def("run", &DecodeLayers::run, "x (B, hidden) through every layer of a one-token step",
           py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("pos"), py::arg("row0"), py::arg("K"), py::arg("V"),
           py::call_guard<py::gil_scoped_release>());
}
