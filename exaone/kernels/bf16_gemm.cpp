// out[M, N] (bf16) = x[M, K] (bf16) @ w[N, K]^T (bf16) for CPUs with AVX-512 but no bf16
// dot-product instructions. fp32 accumulation, one round-to-nearest-even to bf16 at the end.
//
// bf16 -> fp32 is a 16-bit shift, so one 512-bit load of 32 weights gives two fp32 vectors for
// two instructions: the even-indexed weights (lane << 16) and the odd-indexed ones
// (lane & 0xffff0000). x is converted once up front into the same split order (per 32-element
// chunk: its 16 even then 16 odd elements, zero-padded to a multiple of 32), so the dot
// products line up without any shuffle. Each weight vector is loaded and converted once per
// block of MB rows of x; threads split N (at::parallel_for, torch's thread count).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <array>
#include <cstdint>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kChunk = 32;  // bf16 values per 512-bit load
#ifndef EXAONE_MB  // overridable only to try other blockings (bench/bench_kernels.py --tune)
#define EXAONE_MB 4
#endif
#ifndef EXAONE_NB
#define EXAONE_NB 4
#endif
#ifndef EXAONE_PANEL_KB
#define EXAONE_PANEL_KB 256
#endif
constexpr int kMaxMB = EXAONE_MB;  // rows of x per register block
constexpr int kMaxNB = EXAONE_NB;  // rows of w per register block (MB * NB accumulators + 2 NB weights)

inline __mmask32 tail_mask(int64_t n) { return n >= kChunk ? ~__mmask32(0) : (__mmask32(1) << n) - 1; }

// x (M, K) with row stride ldx -> xp (M, Kp) fp32 in the even/odd split order.
void pack_x(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, float* xp, int64_t Kp) {
  const __m512i hi = _mm512_set1_epi32(0xffff0000);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < Kp; k += kChunk) {
      __m512i v = _mm512_maskz_loadu_epi16(tail_mask(K - k), x + m * ldx + k);
      _mm512_storeu_ps(xp + m * Kp + k, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
      _mm512_storeu_ps(xp + m * Kp + k + 16, _mm512_castsi512_ps(_mm512_and_si512(v, hi)));
    }
  }
}

// acc[m][n] += the 32 products of chunk k (weights masked to `mask`; x is zero-padded there).
template <int MB, int NB>
inline void chunk(__m512 (&acc)[MB][NB], const uint16_t* w, int64_t K, const float* xp, int64_t Kp, int64_t k,
                  __mmask32 mask) {
  const __m512i hi = _mm512_set1_epi32(0xffff0000);
  __m512 we[NB], wo[NB];
  for (int n = 0; n < NB; ++n) {
    __m512i v = _mm512_maskz_loadu_epi16(mask, w + n * K + k);
    we[n] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    wo[n] = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
  }
  for (int m = 0; m < MB; ++m) {
    const __m512 xe = _mm512_loadu_ps(xp + m * Kp + k), xo = _mm512_loadu_ps(xp + m * Kp + k + 16);
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_fmadd_ps(wo[n], xo, _mm512_fmadd_ps(we[n], xe, acc[m][n]));
  }
}

// One register block: MB rows of x against NB rows of w over all of K.
template <int MB, int NB>
void tile(const uint16_t* w, int64_t K, const float* xp, int64_t Kp, at::BFloat16* out, int64_t ldo) {
  __m512 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + kChunk <= K; k += kChunk) chunk<MB, NB>(acc, w, K, xp, Kp, k, ~__mmask32(0));
  if (k < K) chunk<MB, NB>(acc, w, K, xp, Kp, k, tail_mask(K - k));  // K not a multiple of 32
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) out[m * ldo + n] = at::BFloat16(_mm512_reduce_add_ps(acc[m][n]));  // RNE
}

using TileFn = void (*)(const uint16_t*, int64_t, const float*, int64_t, at::BFloat16*, int64_t);

template <int MB, int... NBs>
constexpr std::array<TileFn, kMaxNB> row_of(std::integer_sequence<int, NBs...>) { return {&tile<MB, NBs + 1>...}; }

template <int... MBs>
constexpr std::array<std::array<TileFn, kMaxNB>, kMaxMB> table_of(std::integer_sequence<int, MBs...>) {
  return {row_of<MBs + 1>(std::make_integer_sequence<int, kMaxNB>{})...};
}

// kTiles[mb - 1][nb - 1]: the edge blocks of M and N get their own exact-size tiles.
constexpr auto kTiles = table_of(std::make_integer_sequence<int, kMaxMB>{});

torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "bf16_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "bf16_linear: x and w must be bfloat16, got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "bf16_linear: x must be (M, K) and w (N, K), got ", x.sizes(),
              " and ", w.sizes());
  TORCH_CHECK(x.size(1) == w.size(1), "bf16_linear: K mismatch, x ", x.sizes(), " w ", w.sizes());
  TORCH_CHECK(w.is_contiguous(), "bf16_linear: w must be contiguous");
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "bf16_linear: x rows must be contiguous (stride(1) == 1)");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto out = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();
  const int64_t Kp = (K + kChunk - 1) / kChunk * kChunk;
  // Per calling thread and reused: a fresh buffer of a few MB would page-fault on every call.
  static thread_local std::vector<float> xbuf;
  if (xbuf.size() < size_t(M * Kp)) xbuf.resize(M * Kp);
  float* xp = xbuf.data();
  pack_x(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), x.stride(0), M, K, xp, Kp);
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  auto* op = out.data_ptr<at::BFloat16>();
  const int64_t blocks = (N + kMaxNB - 1) / kMaxNB;
  // Weight rows are taken a panel (about L2-sized) at a time; every block of MB rows of x passes
  // over the panel before the next, so the panel is read from memory once and each block of x stays in L1/L2.
  const int64_t panel = std::max<int64_t>(1, (int64_t(EXAONE_PANEL_KB) << 10) / (kMaxNB * K * 2));
  // At least ~256K weights per task, so small matrices don't pay a thread fork for nothing.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / (kMaxNB * K));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t p0 = b0; p0 < b1; p0 += panel) {
      const int64_t p1 = std::min(b1, p0 + panel);
      for (int64_t m0 = 0; m0 < M; m0 += kMaxMB) {
        const int64_t mb = std::min<int64_t>(kMaxMB, M - m0);
        for (int64_t b = p0; b < p1; ++b) {
          const int64_t n0 = b * kMaxNB, nb = std::min<int64_t>(kMaxNB, N - n0);
          kTiles[mb - 1][nb - 1](wp + n0 * K, K, xp + m0 * Kp, Kp, op + m0 * N + n0, N);
        }
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_linear", &bf16_linear, "x (M, K) bf16 @ w (N, K)^T bf16 -> (M, N) bf16, fp32 accumulation");
}
