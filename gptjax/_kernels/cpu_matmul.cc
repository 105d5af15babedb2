// Matmuls over out-major [N, K] weights for XLA:CPU, called from jitted JAX code through the XLA FFI.
//
// XLA:CPU 0.10.2 has no fast path for int8 or bfloat16 weights: it converts them to float32 (materialised,
// or hoisted out of the decode loop) and its int8 x int8 dots run at about its float32 rate. These kernels
// read the int8 / bfloat16 bytes once and multiply them with AVX512-VNNI (vpdpbusd) / AVX512_BF16
// (vdpbf16ps), so a decode step moves a quarter / half of float32's bytes. Results:
//   gptjax_int8_matmul: x int8 [M, K], w int8 [N, K] -> int32 [M, N], exactly sum_k x[m, k] * w[n, k]
//                       (the same integers as XLA's int8 dot; the scales are applied in JAX). From
//                       kInt8GemmMinRows rows of x on (prefill), the GEMM in gemm_int8.cc computes them.
//   gptjax_int8_grouped_matmul: x int8 [M, K], w int8 [N, K], ws float32 [N, G], xs float32 [M, G] -> float32
//                       [M, N] = sum over groups g of K / G inputs of ws[n, g] * xs[m, g] * (exact int32 sum).
//   gptjax_bf16_matmul: x bf16 [M, K], w bf16 [N, K] -> float32 [M, N], float32 accumulation (GEMM-shaped from
//                       kBf16GemmMinRows rows of x: gemm_bf16.cc).
//   gptjax_bf16_rows:   table bf16 [V, D], ids int32 [...] -> float32 [..., D] (ids clamped to [0, V)); its
//                       gradient for training, gptjax_bf16_rows_add, is in rows_add.cc.
//   gptjax_kv_{scores,mix}_{int8,bf16}: attention of few queries over a KV cache stored as int8 or bfloat16 bits.
//   gptjax_int4_matmul: packed int4 weights, in cpu_int4.cc (linked into this module; listed by targets()).
// Leading dims of x are flattened into M. Work is split over rows of w on the XLA intra-op thread pool.
#include <Python.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "bf16.h"
#include "gemm_bf16.h"
#include "gemm_int8.h"
#include "parallel_rows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kNB = 4;             // rows of w per register block
constexpr int kMB = 4;             // rows of x per register block
// Software prefetch of the rows kPrefetchRows ahead: once a block runs more than two rows of x, the hardware
// prefetcher alone fell to a third of the read bandwidth on weights larger than the L3 (measured on Zen 4).
constexpr int kPrefetchRows = 2 * kNB;

#define GPTJAX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16")))

using gptjax::ParallelRows;

// ---- int8: vpdpbusd multiplies unsigned by signed bytes, so x is offset to x + 128 (as uint8) and
// 128 * sum_k w[n, k] (from a vpdpbusd against ones) is subtracted: exact in int32.
// One register block: MB rows of x against NB rows of w (accumulators in a flat array with fully unrolled
// loops: GCC keeps those in registers, while a 2-D array was spilled to the stack on every step).
template <int MB, int NB, bool kRowsum>
GPTJAX_TARGET inline void Int8Block(const uint8_t* xu, int64_t kp, const int8_t* w, int64_t K, int32_t* out,
                                    int64_t N, int32_t* rowsum) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc[MB * NB], cor[NB];
#pragma GCC unroll 16
  for (int t = 0; t < MB * NB; ++t) acc[t] = _mm512_setzero_si512();
#pragma GCC unroll 4
  for (int j = 0; j < NB; ++j) cor[j] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = K - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k)) - 1;  // w's tail reads 0
    __m512i wv[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      wv[j] = _mm512_maskz_loadu_epi8(mask, w + j * K + k);
      _mm_prefetch(reinterpret_cast<const char*>(w + (kPrefetchRows + j) * K + k), _MM_HINT_T0);
    }
    if constexpr (kRowsum) {
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) cor[j] = _mm512_dpbusd_epi32(cor[j], ones, wv[j]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      const __m512i xv = _mm512_loadu_si512(xu + i * kp + k);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[i * NB + j] = _mm512_dpbusd_epi32(acc[i * NB + j], xv, wv[j]);
    }
  }
  if constexpr (kRowsum) {
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) rowsum[j] = 128 * _mm512_reduce_add_epi32(cor[j]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) out[i * N + j] = _mm512_reduce_add_epi32(acc[i * NB + j]) - rowsum[j];
}

template <int NB>
GPTJAX_TARGET void Int8Rows(const uint8_t* xu, int64_t M, int64_t kp, const int8_t* w, int64_t K, int64_t n0,
                            int32_t* out, int64_t N) {
  int32_t rowsum[NB];
  w += n0 * K;
  out += n0;
  // The first block also sums w's rows (4 more registers), so it takes at most 3 rows of x: 4 spilled.
  const int64_t first = std::min<int64_t>(3, M);
  switch (first) {
    case 3: Int8Block<3, NB, true>(xu, kp, w, K, out, N, rowsum); break;
    case 2: Int8Block<2, NB, true>(xu, kp, w, K, out, N, rowsum); break;
    default: Int8Block<1, NB, true>(xu, kp, w, K, out, N, rowsum); break;
  }
  for (int64_t m = first; m < M; m += kMB) {
    const uint8_t* xm = xu + m * kp;
    int32_t* om = out + m * N;
    switch (std::min<int64_t>(kMB, M - m)) {
      case 4: Int8Block<4, NB, false>(xm, kp, w, K, om, N, rowsum); break;
      case 3: Int8Block<3, NB, false>(xm, kp, w, K, om, N, rowsum); break;
      case 2: Int8Block<2, NB, false>(xm, kp, w, K, om, N, rowsum); break;
      default: Int8Block<1, NB, false>(xm, kp, w, K, om, N, rowsum); break;
    }
  }
}

// x [M, K] int8 as uint8 (x ^ 0x80 = x + 128, for vpdpbusd's unsigned operand), rows zero-padded to kp bytes.
std::vector<uint8_t> OffsetRows(const int8_t* x, int64_t M, int64_t K, int64_t kp) {
  std::vector<uint8_t> xu(M * kp, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xu[m * kp + k] = uint8_t(x[m * K + k]) ^ 0x80;
  return xu;
}

GPTJAX_TARGET void Int8Matmul(const int8_t* x, const int8_t* w, int32_t* out, int64_t M, int64_t K, int64_t N,
                              ffi::ThreadPool& pool) {
  if (M >= gptjax::kInt8GemmMinRows) return gptjax::Int8Gemm(x, w, out, M, K, N, pool);  // prefill: gemm_int8.cc
  const int64_t kp = (K + 63) / 64 * 64;  // x rows padded for full 64-byte loads (w's tail is masked to 0)
  const std::vector<uint8_t> xu = OffsetRows(x, M, K, kp);
  const uint8_t* xp = xu.data();
  ParallelRows(pool, N, [=](int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + kNB <= n1; n += kNB) Int8Rows<kNB>(xp, M, kp, w, K, n, out, N);
    for (; n < n1; ++n) Int8Rows<1>(xp, M, kp, w, K, n, out, N);
  });
}

// ---- grouped int8: out[m, n] = sum_g ws[n, g] * xs[m, g] * sum_{k in group g} x[m, k] * w[n, k], in float32.
// Each group's int32 sums are exact (offset-corrected per lane), then scaled and added in float32.
template <int MB, int NB>
GPTJAX_TARGET inline void GroupedBlock(const uint8_t* xu, int64_t kp, const int8_t* w, int64_t K, int64_t gs,
                                       const float* ws, const float* xs, float* out, int64_t N) {
  const __m512i ones = _mm512_set1_epi8(1);
  const int64_t G = K / gs;
  __m512 facc[MB * NB];
#pragma GCC unroll 16
  for (int t = 0; t < MB * NB; ++t) facc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc[MB * NB], cor[NB];
#pragma GCC unroll 16
    for (int t = 0; t < MB * NB; ++t) acc[t] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) cor[j] = _mm512_setzero_si512();
    const int64_t end = (g + 1) * gs;
    for (int64_t k = g * gs; k < end; k += 64) {
      const __mmask64 mask = end - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (end - k)) - 1;
      __m512i wv[NB];
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        wv[j] = _mm512_maskz_loadu_epi8(mask, w + j * K + k);
        _mm_prefetch(reinterpret_cast<const char*>(w + (kPrefetchRows + j) * K + k), _MM_HINT_T0);
        cor[j] = _mm512_dpbusd_epi32(cor[j], ones, wv[j]);
      }
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) {
        const __m512i xv = _mm512_loadu_si512(xu + i * kp + k);
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) acc[i * NB + j] = _mm512_dpbusd_epi32(acc[i * NB + j], xv, wv[j]);
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        const __m512i exact = _mm512_sub_epi32(acc[i * NB + j], _mm512_slli_epi32(cor[j], 7));
        const __m512 scale = _mm512_set1_ps(ws[j * G + g] * xs[i * G + g]);
        facc[i * NB + j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), scale, facc[i * NB + j]);
      }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) out[i * N + j] = _mm512_reduce_add_ps(facc[i * NB + j]);
}

constexpr int kGroupedNB = 2;  // two sets of accumulators (int32 per group, float32 overall): fewer rows of w

template <int NB>
GPTJAX_TARGET void GroupedRows(const uint8_t* xu, int64_t M, int64_t kp, const int8_t* w, int64_t K, int64_t gs,
                               const float* ws, const float* xs, int64_t n0, float* out, int64_t N) {
  const int64_t G = K / gs;
  w += n0 * K;
  ws += n0 * G;
  out += n0;
  for (int64_t m = 0; m < M; m += kMB) {
    const uint8_t* xm = xu + m * kp;
    const float* xsm = xs + m * G;
    float* om = out + m * N;
    switch (std::min<int64_t>(kMB, M - m)) {
      case 4: GroupedBlock<4, NB>(xm, kp, w, K, gs, ws, xsm, om, N); break;
      case 3: GroupedBlock<3, NB>(xm, kp, w, K, gs, ws, xsm, om, N); break;
      case 2: GroupedBlock<2, NB>(xm, kp, w, K, gs, ws, xsm, om, N); break;
      default: GroupedBlock<1, NB>(xm, kp, w, K, gs, ws, xsm, om, N); break;
    }
  }
}

GPTJAX_TARGET void GroupedMatmul(const int8_t* x, const int8_t* w, const float* ws, const float* xs, float* out,
                                 int64_t M, int64_t K, int64_t N, int64_t G, ffi::ThreadPool& pool) {
  // x rows padded by 64 more bytes: a group's last 64-byte load may start up to gs - 1 bytes before its end
  const int64_t kp = (K + 63) / 64 * 64 + 64, gs = K / G;
  const std::vector<uint8_t> xu = OffsetRows(x, M, K, kp);
  const uint8_t* xp = xu.data();
  ParallelRows(pool, N, [=](int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + kGroupedNB <= n1; n += kGroupedNB) GroupedRows<kGroupedNB>(xp, M, kp, w, K, gs, ws, xs, n, out, N);
    for (; n < n1; ++n) GroupedRows<1>(xp, M, kp, w, K, gs, ws, xs, n, out, N);
  });
}

// ---- bfloat16: vdpbf16ps multiplies pairs of bf16 and accumulates in float32.
template <int MB, int NB>
GPTJAX_TARGET inline void Bf16Block(const uint16_t* x, int64_t kp, const uint16_t* w, int64_t K, float* out,
                                    int64_t N) {
  __m512 acc[MB * NB];
#pragma GCC unroll 16
  for (int t = 0; t < MB * NB; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 mask = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
    __m512i wv[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      wv[j] = _mm512_maskz_loadu_epi16(mask, w + j * K + k);
      _mm_prefetch(reinterpret_cast<const char*>(w + (kPrefetchRows + j) * K + k), _MM_HINT_T0);
    }
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * kp + k);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[i * NB + j] = _mm512_dpbf16_ps(acc[i * NB + j], xv, (__m512bh)wv[j]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) out[i * N + j] = _mm512_reduce_add_ps(acc[i * NB + j]);
}

template <int NB>
GPTJAX_TARGET void Bf16Rows(const uint16_t* x, int64_t M, int64_t kp, const uint16_t* w, int64_t K, int64_t n0,
                            float* out, int64_t N) {
  w += n0 * K;
  out += n0;
  for (int64_t m = 0; m < M; m += kMB) {
    const uint16_t* xm = x + m * kp;
    float* om = out + m * N;
    switch (std::min<int64_t>(kMB, M - m)) {
      case 4: Bf16Block<4, NB>(xm, kp, w, K, om, N); break;
      case 3: Bf16Block<3, NB>(xm, kp, w, K, om, N); break;
      case 2: Bf16Block<2, NB>(xm, kp, w, K, om, N); break;
      default: Bf16Block<1, NB>(xm, kp, w, K, om, N); break;
    }
  }
}

GPTJAX_TARGET void Bf16Matmul(const uint16_t* x, const uint16_t* w, float* out, int64_t M, int64_t K, int64_t N,
                              ffi::ThreadPool& pool) {
  if (M >= gptjax::kBf16GemmMinRows) return gptjax::Bf16Gemm(x, w, out, M, K, N, pool);  // prefill, training
  const int64_t kp = (K + 31) / 32 * 32;  // x rows padded with zeros for full 64-byte loads
  std::vector<uint16_t> xp(M * kp, 0);
  for (int64_t m = 0; m < M; ++m) std::memcpy(&xp[m * kp], x + m * K, K * sizeof(uint16_t));
  const uint16_t* xd = xp.data();
  ParallelRows(pool, N, [=](int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + kNB <= n1; n += kNB) Bf16Rows<kNB>(xd, M, kp, w, K, n, out, N);
    for (; n < n1; ++n) Bf16Rows<1>(xd, M, kp, w, K, n, out, N);
  });
}

// ---- Rows of a bfloat16 table as float32 (XLA:CPU gathers bfloat16 from a float32 copy of the whole table).
void Bf16Rows(const uint16_t* table, int64_t V, int64_t D, const int32_t* ids, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = std::clamp<int64_t>(ids[i], 0, V - 1);  // as XLA's gather clamps (negatives wrapped in JAX)
    uint32_t* row = reinterpret_cast<uint32_t*>(out + i * D);
    for (int64_t d = 0; d < D; ++d) row[d] = uint32_t(table[id * D + d]) << 16;
  }
}

// ---- Attention over a cache stored as int8 or as bfloat16 bits (decode: few queries per head). XLA converts
// the whole cache to float32 before its dots, every step; these read the stored bytes.
//   scores[bh, t, s] = sum_k q[bh, t, k] * c[bh, s, k];   mix[bh, t, k] = sum_s p[bh, t, s] * c[bh, s, k]
struct Int8Elems {
  using T = int8_t;
  GPTJAX_TARGET static __m512 Load(const int8_t* p, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
  }
};
struct Bf16Elems {
  using T = uint16_t;
  GPTJAX_TARGET static __m512 Load(const uint16_t* p, __mmask16 m) {
    return gptjax::LoadBf16(p, m);
  }
};

inline __mmask16 TailMask(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }

template <typename E>
GPTJAX_TARGET void KvScoresRange(const float* q, const typename E::T* c, float* out, int64_t i0, int64_t i1,
                                 int64_t T, int64_t S, int64_t K) {
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t t = 0; t < T; ++t) {
      const float* qt = q + (i * T + t) * K;
      float* o = out + (i * T + t) * S;
      for (int64_t s = 0; s < S; ++s) {
        const typename E::T* cs = c + (i * S + s) * K;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
          const __mmask16 m = TailMask(K - k);
          acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qt + k), E::Load(cs + k, m), acc);
        }
        o[s] = _mm512_reduce_add_ps(acc);
      }
    }
}

template <typename E>
GPTJAX_TARGET void KvMixRange(const float* p, const typename E::T* c, float* out, int64_t i0, int64_t i1, int64_t T,
                              int64_t S, int64_t K) {
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t t = 0; t < T; ++t) {
      const float* pt = p + (i * T + t) * S;
      float* o = out + (i * T + t) * K;
      for (int64_t k = 0; k < K; k += 16) {  // one 16-wide slice of the head at a time
        const __mmask16 m = TailMask(K - k);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t s = 0; s < S; ++s)
          acc = _mm512_fmadd_ps(_mm512_set1_ps(pt[s]), E::Load(c + (i * S + s) * K + k, m), acc);
        _mm512_mask_storeu_ps(o + k, m, acc);
      }
    }
}

// ---- FFI handlers: shape checks, then the kernels.
ffi::Error CheckShapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, ffi::Span<const int64_t> out,
                       int64_t* M, int64_t* K, int64_t* N) {
  if (x.size() < 1 || w.size() != 2 || out.size() != x.size())
    return ffi::Error::InvalidArgument("gptjax matmul: x [..., K], w [N, K] and out [..., N] expected");
  *K = x.back();
  *N = w[0];
  *M = 1;
  for (size_t i = 0; i + 1 < x.size(); ++i) *M *= x[i];
  bool leading_match = true;
  for (size_t i = 0; i + 1 < x.size(); ++i) leading_match = leading_match && out[i] == x[i];
  if (w[1] != *K || out.back() != *N || !leading_match)
    return ffi::Error::InvalidArgument("gptjax matmul: out must be [..., N] for x [..., K] and w [N, K]");
  return ffi::Error::Success();
}

// The plain matmul handlers (int8 -> int32, bf16 -> float32): shape checks, nothing to do for an empty output,
// then Kernel over the raw data (bfloat16 as its uint16 bits).
template <ffi::DataType kIn, ffi::DataType kOut, typename In, typename Out,
          void (*Kernel)(const In*, const In*, Out*, int64_t, int64_t, int64_t, ffi::ThreadPool&)>
ffi::Error PlainImpl(ffi::ThreadPool pool, ffi::Buffer<kIn> x, ffi::Buffer<kIn> w, ffi::ResultBuffer<kOut> out) {
  int64_t M, K, N;
  if (auto e = CheckShapes(x.dimensions(), w.dimensions(), out->dimensions(), &M, &K, &N); e.failure()) return e;
  if (M == 0 || N == 0) return ffi::Error::Success();
  Kernel(reinterpret_cast<const In*>(x.typed_data()), reinterpret_cast<const In*>(w.typed_data()),
         reinterpret_cast<Out*>(out->typed_data()), M, K, N, pool);
  return ffi::Error::Success();
}

// x bf16 [..., K] . w bf16 stored in-major [K, N] -> float32 or bfloat16 [..., N] on the GEMM (gemm_bf16.cc), any M.
ffi::Error Bf16MatmulKNImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                            ffi::Result<ffi::AnyBuffer> out) {
  const auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("gptjax_bf16_matmul_kn: w [K, N] expected");
  const auto type = out->element_type();
  if (type != ffi::DataType::F32 && type != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("gptjax_bf16_matmul_kn: a float32 or bfloat16 output expected");
  const int64_t swapped[2] = {wd[1], wd[0]};  // checked as the [N, K] it stands for
  int64_t M, K, N;
  if (auto e = CheckShapes(x.dimensions(), ffi::Span<const int64_t>(swapped, 2), out->dimensions(), &M, &K, &N);
      e.failure())
    return e;
  if (M == 0 || N == 0) return ffi::Error::Success();
  const auto* xd = reinterpret_cast<const uint16_t*>(x.typed_data());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  if (type == ffi::DataType::F32)
    gptjax::Bf16GemmKN(xd, wp, static_cast<float*>(out->untyped_data()), M, K, N, pool);
  else
    gptjax::Bf16GemmKN(xd, wp, static_cast<uint16_t*>(out->untyped_data()), M, K, N, pool);
  return ffi::Error::Success();
}

ffi::Error GroupedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                       ffi::Buffer<ffi::F32> ws, ffi::Buffer<ffi::F32> xs, ffi::ResultBuffer<ffi::F32> out) {
  int64_t M, K, N;
  if (auto e = CheckShapes(x.dimensions(), w.dimensions(), out->dimensions(), &M, &K, &N); e.failure()) return e;
  const auto g = ws.dimensions();
  if (g.size() != 2 || g[0] != N || g[1] < 1 || K % g[1] != 0 || xs.element_count() != M * g[1])
    return ffi::Error::InvalidArgument("gptjax_int8_grouped_matmul: ws [N, G] with G dividing K, xs [..., G]");
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {  // empty sums (and no group size to divide by)
    std::fill(out->typed_data(), out->typed_data() + M * N, 0.0f);
    return ffi::Error::Success();
  }
  GroupedMatmul(x.typed_data(), w.typed_data(), ws.typed_data(), xs.typed_data(), out->typed_data(), M, K, N, g[1],
                pool);
  return ffi::Error::Success();
}


ffi::Error Bf16RowsImpl(ffi::Buffer<ffi::BF16> table, ffi::Buffer<ffi::S32> ids, ffi::ResultBuffer<ffi::F32> out) {
  const auto t = table.dimensions(), od = out->dimensions();
  if (t.size() != 2 || od.size() != ids.dimensions().size() + 1 || od.back() != t[1] ||
      out->element_count() != ids.element_count() * t[1] || (t[0] == 0 && ids.element_count() > 0))
    return ffi::Error::InvalidArgument("gptjax_bf16_rows: a non-empty table [V, D], ids [...], out [..., D] expected");
  Bf16Rows(reinterpret_cast<const uint16_t*>(table.typed_data()), t[0], t[1], ids.typed_data(),
           ids.element_count(), out->typed_data());
  return ffi::Error::Success();
}

// q or p [B, H, T, X] float32 and a cache [B, H, S, K]: scores (X = K) -> [B, H, T, S]; mix (X = S) -> [B, H, T, K]
template <typename E, bool kScores, ffi::DataType kDtype>
ffi::Error KvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<kDtype> c,
                  ffi::ResultBuffer<ffi::F32> out) {
  const auto ad = a.dimensions(), cd = c.dimensions(), od = out->dimensions();
  if (ad.size() != 4 || cd.size() != 4 || od.size() != 4 || ad[0] != cd[0] || ad[1] != cd[1] || od[0] != ad[0] ||
      od[1] != ad[1] || od[2] != ad[2] ||
      (kScores ? (ad[3] != cd[3] || od[3] != cd[2]) : (ad[3] != cd[2] || od[3] != cd[3])))
    return ffi::Error::InvalidArgument("gptjax kv kernel: [B, H, T, K or S] and a cache [B, H, S, K] expected");
  const int64_t BH = ad[0] * ad[1], T = ad[2], S = cd[2], K = cd[3];
  const auto* cache = reinterpret_cast<const typename E::T*>(c.typed_data());
  const float* in = a.typed_data();
  float* o = out->typed_data();
  ParallelRows(pool, BH, [=](int64_t i0, int64_t i1) {  // one (row, head) per work item
    if constexpr (kScores) KvScoresRange<E>(in, cache, o, i0, i1, T, S, K);
    else KvMixRange<E>(in, cache, o, i0, i1, T, S, K);
  }, 1);
  return ffi::Error::Success();
}

// The binding of every handler here but the rows gather: XLA's intra-op pool, operands A and B, a result R.
template <ffi::DataType A, ffi::DataType B, ffi::DataType R>
auto PooledBinding() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().template Arg<ffi::Buffer<A>>().template Arg<ffi::Buffer<B>>()
      .template Ret<ffi::Buffer<R>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxKvScoresInt8, (KvImpl<Int8Elems, true, ffi::S8>),
                              (PooledBinding<ffi::F32, ffi::S8, ffi::F32>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxKvMixInt8, (KvImpl<Int8Elems, false, ffi::S8>),
                              (PooledBinding<ffi::F32, ffi::S8, ffi::F32>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxKvScoresBf16, (KvImpl<Bf16Elems, true, ffi::U16>),
                              (PooledBinding<ffi::F32, ffi::U16, ffi::F32>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxKvMixBf16, (KvImpl<Bf16Elems, false, ffi::U16>),
                              (PooledBinding<ffi::F32, ffi::U16, ffi::F32>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxBf16Rows, Bf16RowsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxInt8Matmul, (PlainImpl<ffi::S8, ffi::S32, int8_t, int32_t, Int8Matmul>),
                              (PooledBinding<ffi::S8, ffi::S8, ffi::S32>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxInt8GroupedMatmul, GroupedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxBf16Matmul, (PlainImpl<ffi::BF16, ffi::F32, uint16_t, float, Bf16Matmul>),
                              (PooledBinding<ffi::BF16, ffi::BF16, ffi::F32>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxBf16MatmulKN, Bf16MatmulKNImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::AnyBuffer>());

// The packed-int4, causal-attention, AdamW and embedding-gradient handlers, defined in cpu_int4.cc, attention.cc,
// adamw.cc and rows_add.cc (the same module).
extern "C" XLA_FFI_Error* GptjaxInt4Matmul(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* GptjaxCausalAttention(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* GptjaxAdamW(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* GptjaxBf16RowsAdd(XLA_FFI_CallFrame* call_frame);

// ---- Python module gptjax._cpu_kernels: supported() and targets() -> {name: PyCapsule}.
static PyObject* Supported(PyObject*, PyObject*) {
  __builtin_cpu_init();
  const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
                  __builtin_cpu_supports("avx512bf16");
  return PyBool_FromLong(ok);
}

static PyObject* Targets(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (!d) return nullptr;
  const std::pair<const char*, void*> handlers[] = {{"gptjax_int8_matmul", (void*)GptjaxInt8Matmul},
                                                    {"gptjax_bf16_matmul", (void*)GptjaxBf16Matmul},
                                                    {"gptjax_bf16_matmul_kn", (void*)GptjaxBf16MatmulKN},
                                                    {"gptjax_int8_grouped_matmul", (void*)GptjaxInt8GroupedMatmul},
                                                    {"gptjax_bf16_rows", (void*)GptjaxBf16Rows},
                                                    {"gptjax_kv_scores_int8", (void*)GptjaxKvScoresInt8},
                                                    {"gptjax_kv_mix_int8", (void*)GptjaxKvMixInt8},
                                                    {"gptjax_kv_scores_bf16", (void*)GptjaxKvScoresBf16},
                                                    {"gptjax_kv_mix_bf16", (void*)GptjaxKvMixBf16},
                                                    {"gptjax_int4_matmul", (void*)GptjaxInt4Matmul},
                                                    {"gptjax_causal_attention", (void*)GptjaxCausalAttention},
                                                    {"gptjax_adamw", (void*)GptjaxAdamW},
                                                    {"gptjax_bf16_rows_add", (void*)GptjaxBf16RowsAdd}};
  for (const auto& [name, fn] : handlers) {
    PyObject* capsule = PyCapsule_New(fn, nullptr, nullptr);
    if (!capsule || PyDict_SetItemString(d, name, capsule) < 0) {
      Py_XDECREF(capsule);
      Py_DECREF(d);
      return nullptr;
    }
    Py_DECREF(capsule);
  }
  return d;
}

static PyMethodDef kMethods[] = {
    {"supported", Supported, METH_NOARGS, "Whether this CPU has AVX512 VNNI and BF16 (the kernels need both)."},
    {"targets", Targets, METH_NOARGS, "The XLA FFI handlers as {target name: PyCapsule}."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu_kernels", "int8 / bfloat16 matmuls for XLA:CPU", -1,
                              kMethods};

PyMODINIT_FUNC PyInit__cpu_kernels() { return PyModule_Create(&kModule); }
