// out[M, N] = x[M, K] @ W^T for int8 (per output channel scale) and int4 (group-wise scale + zero)
// weights, with AVX-512 VNNI integer dot products (vpdpbusd: u8 x s8 -> int32, 64 products a go).
//
// x is quantized per call to int8 in blocks of B along K (B = 32 for int8 weights, as llama.cpp's
// Q8_0; B = the group for int4) with one float scale per block: x ~ sx[b] * xq. Weights are
// unsigned bytes (int8 + 128, or the int4 codes 0..15), so vpdpbusd(w, xq) needs no sign tricks;
// the offsets come back through the per-block sums of xq:
//   int8:  sum_k (q+128) xq = sum_k q xq + 128 sum_k xq            y = sw[n] (sum_b sx_b dot_b - 128 sum_b sx_b sum xq_b)
//   int4:  w = (c - 8) s + z  ->  y = sum_g sx_g (s_g dot_g + (z_g - 8 s_g) sum xq_g)
// Weights are packed (by exaone/kernels/qgemm.py) in tiles of 64 output channels, one 4-wide
// step of K at a time, so one 64-byte load is 16 channels x 4 k, exactly vpdpbusd's operand:
//   int8: tile t, step s: 256 bytes, byte (16 j + n) * 4 + kk  = w[64 t + 16 j + n][4 s + kk] + 128
//   int4: tile t, step s: 128 bytes = two 64-byte halves h; byte n * 4 + kk of half h holds
//         channel 64 t + 32 h + n in the low nibble and 64 t + 32 h + 16 + n in the high one
//         (one AND, one shift, one AND unpack 64 bytes into two operands).
//   int4 scales: bf16 (tiles, groups, 2, 64): the 64 channels' s, then their z.
// Each step broadcasts 4 bytes of each of MB rows of xq and accumulates MB x 4 vectors of 16
// channels (outer-product form: each weight byte is loaded once per MB rows). Batch-1 decode
// streams the weights once; prefill reuses each tile (in L2) for every block of MB rows.
// Threads split the tiles (at::parallel_for, torch's thread count). qlinear_many runs several
// weights of one kind against one x (q/k/v, gate/up): x quantized once, all tiles as one sequence.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kTile = 64;       // output channels per tile: 4 vectors of 16 int32
constexpr int64_t kInt8Block = 32;  // activation block for int8 weights
// Rows of x per register block: 16 int32 sums + 4 weight vectors + a broadcast fit the 32
// registers; 6 rows spilled and ran int4 at a third of the speed (measured).
constexpr int kMaxMB = 4;
#ifndef EXAONE_QPF
#define EXAONE_QPF 4096
#endif
// Bytes of weights fetched ahead (0: leave it to the hardware). 4 KB rather than 1: when this
// host had ~55 GB/s, int4 streamed 38.9 vs 36.8 GB/s (53 interleaved reps); at ~37 GB/s all equal.
constexpr int64_t kPrefetch = EXAONE_QPF;
// int4: the scales of the group this many groups ahead (256 bytes; past a tile's last group, the
// next tile's first ones: the layout runs on), fetched as each group starts. They are a second,
// sparse stream (256 bytes per 4 KB of weights at group 128) that each group's end waits on. All
// int4 linears of a 1.2B step, paired builds in one process: 1.030 / 1.012 (2 ahead), 1.022 (4).
#ifndef EXAONE_Q4_SPF
#define EXAONE_Q4_SPF 2
#endif
constexpr int64_t kScalesAhead = EXAONE_Q4_SPF;

inline __m512 bf16_to_f32(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// Round-to-nearest-even fp32 -> bf16 of 16 lanes (no avx512_bf16 here; NaN is not special-cased).
inline __m256i f32_to_bf16(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}

template <typename T>
inline __m512 load_x(const T* p, __mmask16 mask);
template <>
inline __m512 load_x<float>(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
template <>
inline __m512 load_x<at::BFloat16>(const at::BFloat16* p, __mmask16 mask) {
  __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// acc += u8 w . s8 x per 4 bytes. Inline asm: with the intrinsic gcc copies every accumulator to a
// fresh register (and the stack) on each step, which halves the throughput.
inline void dpbusd(__m512i& acc, __m512i w, __m512i x) { asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x)); }

inline __mmask16 mask16(int64_t n) { return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1); }

// One row: x[0, K) -> xq[0, Kp) (zero past K), sx[b] = amax_b / 127, xsum[b] = sx[b] * sum(xq in b).
template <typename T>
void quantize_row(const T* x, int64_t K, int64_t Kp, int64_t B, int8_t* xq, float* sx, float* xsum) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t b = 0, k0 = 0; k0 < Kp; ++b, k0 += B) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = k0; k < k0 + B; k += 16)
      amax = _mm512_max_ps(amax, _mm512_and_ps(load_x(x + k, mask16(K - k)), absmask));
    const float a = _mm512_reduce_max_ps(amax);
    const float inv = a > 0 ? 127.0f / a : 0.0f;
    __m512i sum = _mm512_setzero_si512();
    for (int64_t k = k0; k < k0 + B; k += 16) {
      __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load_x(x + k, mask16(K - k)), _mm512_set1_ps(inv)));  // RNE
      sum = _mm512_add_epi32(sum, q);
      _mm_storeu_si128((__m128i*)(xq + k), _mm512_cvtsepi32_epi8(q));
    }
    sx[b] = a / 127.0f;
    xsum[b] = sx[b] * float(_mm512_reduce_add_epi32(sum));
  }
}

struct Args {
  const int8_t* xq;        // (M, Kp)
  const float* sx;         // (M, nb)
  const float* xsum;       // (M, nb)
  const float* xtot;       // (M,): sum over blocks of xsum (int8 offset correction)
  int64_t Kp, B, nb, ldo;  // ldo: the output's row stride (the parts' N summed)
};

// One weight of a call: its packed tiles and scales, its N, and its first column in the output.
struct Part {
  const uint8_t* w;        // packed weights
  const void* scales;      // int8: float (Np,); int4: bf16 (tiles, groups, 2, 64)
  int64_t N, col, tiles;
};

// MB rows of x against tile t of part p (64 channels) over all of K; writes out rows m0.. (row
// stride a.ldo) at the part's columns.
template <int MB, bool INT4, typename T>
void tile(const Args& a, const Part& p, int64_t t, int64_t m0, T* out) {
  const int64_t steps_per_block = a.B / 4, step_bytes = INT4 ? 128 : 256;
  const uint8_t* wp = p.w + t * (a.Kp / 4) * step_bytes;
  const int8_t* xr = a.xq + m0 * a.Kp;
  const float* sxr = a.sx + m0 * a.nb;
  const float* xsr = a.xsum + m0 * a.nb;
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  // Float sums live in memory, touched once per block: only the int32 sums stay in registers
  // (kept as registers, gcc otherwise stores and copies them on every step).
  alignas(64) float facc[MB][4][16] = {};
  int64_t k = 0;
  for (int64_t b = 0; b < a.nb; ++b) {
    if constexpr (INT4 && kScalesAhead > 0) {  // int4 scales: see kScalesAhead
      const char* nz = reinterpret_cast<const char*>(static_cast<const uint16_t*>(p.scales) + (t * a.nb + b + kScalesAhead) * 128);
      for (int l = 0; l < 256; l += 64) _mm_prefetch(nz + l, _MM_HINT_T0);
    }
    __m512i acc[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_si512();
    for (int64_t s = 0; s < steps_per_block; ++s, k += 4, wp += step_bytes) {
      __m512i w[4];
      if constexpr (kPrefetch > 0)  // the hardware streamer stops at each 4 KB page; M > 1 steps are slow to ask
        for (int64_t l = 0; l < step_bytes; l += 64) _mm_prefetch((const char*)wp + kPrefetch + l, _MM_HINT_T0);
      if constexpr (INT4) {
        const __m512i v0 = _mm512_loadu_si512(wp), v1 = _mm512_loadu_si512(wp + 64);
        w[0] = _mm512_and_si512(v0, low4);
        w[1] = _mm512_and_si512(_mm512_srli_epi16(v0, 4), low4);
        w[2] = _mm512_and_si512(v1, low4);
        w[3] = _mm512_and_si512(_mm512_srli_epi16(v1, 4), low4);
      } else {
        for (int j = 0; j < 4; ++j) w[j] = _mm512_loadu_si512(wp + 64 * j);
      }
      for (int m = 0; m < MB; ++m) {
        int32_t x4;
        std::memcpy(&x4, xr + m * a.Kp + k, 4);
        const __m512i xb = _mm512_set1_epi32(x4);
        for (int j = 0; j < 4; ++j) dpbusd(acc[m][j], w[j], xb);
      }
    }
    if constexpr (INT4) {  // group b: scales and zeros of the 64 channels
      const uint16_t* sz = static_cast<const uint16_t*>(p.scales) + (t * a.nb + b) * 128;
      for (int j = 0; j < 4; ++j) {
        const __m512 sc = bf16_to_f32(sz + 16 * j);
        const __m512 zz = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), sc, bf16_to_f32(sz + 64 + 16 * j));  // z - 8 s
        for (int m = 0; m < MB; ++m) {
          const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][j]), _mm512_mul_ps(sc, _mm512_set1_ps(sxr[m * a.nb + b])),
                                           _mm512_load_ps(facc[m][j]));
          _mm512_store_ps(facc[m][j], _mm512_fmadd_ps(zz, _mm512_set1_ps(xsr[m * a.nb + b]), f));
        }
      }
    } else {
      for (int m = 0; m < MB; ++m) {
        const __m512 sxb = _mm512_set1_ps(sxr[m * a.nb + b]);
        for (int j = 0; j < 4; ++j)
          _mm512_store_ps(facc[m][j], _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][j]), sxb, _mm512_load_ps(facc[m][j])));
      }
    }
  }
  const int64_t n0 = t * kTile;
  for (int m = 0; m < MB; ++m) {
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + 16 * j;
      if (n >= p.N) break;
      __m512 y = _mm512_load_ps(facc[m][j]);
      if constexpr (!INT4)  // sw[n] * (acc - 128 * sum_b sx_b sum xq_b)
        y = _mm512_mul_ps(_mm512_loadu_ps(static_cast<const float*>(p.scales) + n),
                          _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), _mm512_set1_ps(a.xtot[m0 + m]), y));
      const __mmask16 mk = mask16(p.N - n);
      T* o = out + (m0 + m) * a.ldo + p.col + n;
      if constexpr (std::is_same_v<T, float>)
        _mm512_mask_storeu_ps(o, mk, y);
      else
        _mm256_mask_storeu_epi16(o, mk, f32_to_bf16(y));
    }
  }
}

template <bool INT4, typename T>
void tile_rows(const Args& a, const Part& p, int64_t t, int64_t m0, int64_t mb, T* out) {
  switch (mb) {  // the kMaxMB-row block, and exact-size blocks for the last rows
    case 1: return tile<1, INT4>(a, p, t, m0, out);
    case 2: return tile<2, INT4>(a, p, t, m0, out);
    case 3: return tile<3, INT4>(a, p, t, m0, out);
    default: return tile<kMaxMB, INT4>(a, p, t, m0, out);
  }
}

// Threads split the tiles of all parts as one sequence (one fork per call, whatever the parts).
template <bool INT4, typename T>
void run(const Args& a, const std::vector<Part>& parts, int64_t M, int64_t tile_bytes, T* out) {
  int64_t tiles = 0;
  for (const Part& p : parts) tiles += p.tiles;
  auto range = [&](int64_t t0, int64_t t1) {
    size_t i = 0;
    int64_t first = 0;  // global index of part i's tile 0
    for (int64_t t = t0; t < t1; ++t) {
      while (t - first >= parts[i].tiles) first += parts[i++].tiles;
      // the tile stays in L2 while every block of rows passes over it
      for (int64_t m0 = 0; m0 < M; m0 += kMaxMB)
        tile_rows<INT4>(a, parts[i], t - first, m0, std::min<int64_t>(kMaxMB, M - m0), out);
    }
  };
  // At least ~128 KB of weights per task: a small matrix does not pay a thread fork for nothing.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / tile_bytes);
  at::parallel_for(0, tiles, grain, range);
}

// x (M, K) float32 or bfloat16 against the packed weights ws[i] (uint8 (tiles, Kp/4 * step bytes))
// with scales ss[i] and Ns[i] output channels, all of one kind: bits 8 or 4, block the activation
// block (int8: 32; int4: the group). x is quantized once; returns (M, sum Ns) in x's dtype, part i
// in columns [sum Ns[:i], sum Ns[:i+1]).
torch::Tensor qlinear_many(const torch::Tensor& x, const std::vector<torch::Tensor>& ws,
                           const std::vector<torch::Tensor>& ss, const std::vector<int64_t>& Ns, int64_t bits,
                           int64_t block) {
  TORCH_CHECK(x.device().is_cpu(), "qlinear: CPU tensors only");
  TORCH_CHECK(bits == 8 || bits == 4, "qlinear: bits must be 8 or 4, got ", bits);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "qlinear: x must be a contiguous (M, K) tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "qlinear: x must be float32 or bfloat16");
  TORCH_CHECK(block > 0 && block % 16 == 0, "qlinear: block must be a positive multiple of 16, got ", block);
  TORCH_CHECK(!ws.empty() && ws.size() == ss.size() && ws.size() == Ns.size(),
              "qlinear: one scales tensor and one N per weight, got ", ws.size(), " weights, ", ss.size(),
              " scales, ", Ns.size(), " Ns");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t Kp = (K + block - 1) / block * block, nb = Kp / block, step_bytes = bits == 4 ? 128 : 256;
  if (bits == 4) {
    TORCH_CHECK(K % block == 0, "qlinear: int4 needs K divisible by the group, got K=", K, ", group=", block);
  }
  std::vector<Part> parts;
  int64_t ldo = 0;
  for (size_t i = 0; i < ws.size(); ++i) {
    const torch::Tensor &w = ws[i], &s = ss[i];
    const int64_t N = Ns[i], tiles = w.dim() == 2 ? w.size(0) : -1;
    TORCH_CHECK(w.device().is_cpu() && s.device().is_cpu(), "qlinear: CPU tensors only");
    TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(), "qlinear: w must be packed uint8 (tiles, bytes)");
    TORCH_CHECK(N >= 0 && tiles == (N + kTile - 1) / kTile && w.size(1) == Kp / 4 * step_bytes, "qlinear: packed w ",
                w.sizes(), " does not match N=", N, ", K=", K, ", block=", block);
    if (bits == 4) {
      TORCH_CHECK(s.scalar_type() == at::kBFloat16 && s.is_contiguous() && s.numel() == tiles * nb * 128,
                  "qlinear: int4 scales must be contiguous bfloat16 (tiles, groups, 2, 64)");
    } else {
      TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.numel() == tiles * kTile,
                  "qlinear: int8 scales must be contiguous float32 (tiles * 64,)");
    }
    parts.push_back(Part{w.data_ptr<uint8_t>(), s.data_ptr(), N, ldo, tiles});
    ldo += N;
  }
  auto out = torch::empty({M, ldo}, x.options());
  if (M == 0 || ldo == 0) return out;
  // Per calling thread and reused: fresh buffers would page-fault on every call.
  static thread_local std::vector<int8_t> xq_buf;
  static thread_local std::vector<float> f_buf;
  xq_buf.resize(std::max<size_t>(xq_buf.size(), size_t(M * Kp)));
  f_buf.resize(std::max<size_t>(f_buf.size(), size_t(M * (2 * nb + 1))));
  // Raw pointers: inside parallel_for the names xq_buf / f_buf would be each worker's own buffers.
  int8_t* xq = xq_buf.data();
  float *sx = f_buf.data(), *xsum = sx + M * nb, *xtot = xsum + M * nb;
  Args a{xq, sx, xsum, xtot, Kp, block, nb, ldo};
  auto quantize = [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) {
      if (x.scalar_type() == at::kFloat)
        quantize_row(x.data_ptr<float>() + m * K, K, Kp, block, xq + m * Kp, sx + m * nb, xsum + m * nb);
      else
        quantize_row(x.data_ptr<at::BFloat16>() + m * K, K, Kp, block, xq + m * Kp, sx + m * nb, xsum + m * nb);
      float s = 0;
      for (int64_t b = 0; b < nb; ++b) s += xsum[m * nb + b];
      xtot[m] = s;
    }
  };
  if (M >= 16) at::parallel_for(0, M, 8, quantize); else quantize(0, M);
  const int64_t tile_bytes = Kp / 4 * step_bytes;
  if (x.scalar_type() == at::kFloat) {
    if (bits == 4) run<true>(a, parts, M, tile_bytes, out.data_ptr<float>());
    else run<false>(a, parts, M, tile_bytes, out.data_ptr<float>());
  } else {
    auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    if (bits == 4) run<true>(a, parts, M, tile_bytes, op);
    else run<false>(a, parts, M, tile_bytes, op);
  }
  return out;
}

torch::Tensor qlinear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales, int64_t N,
                      int64_t bits, int64_t block) {
  return qlinear_many(x, {w}, {scales}, {N}, bits, block);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qlinear", &qlinear, "x (M, K) float32/bf16 @ packed int8/int4 weights -> (M, N), int8 activations, VNNI");
  m.def("qlinear_many", &qlinear_many, "x (M, K) @ several packed weights of one kind -> (M, sum N), x quantized once");
  // For gemm.cpp's DecodeLayers, which calls it between its own kernels without going through Python.
  m.def("qlinear_many_capsule", [] { return py::capsule(reinterpret_cast<void*>(&qlinear_many), "exaone.qlinear_many"); });
}
