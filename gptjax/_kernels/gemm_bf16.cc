// A GEMM-shaped bfloat16 matmul for XLA:CPU: out float32 [M, N] = x bf16 [M, K] . w bf16 [N, K]^T.
//
// The GEMV blocks of cpu_matmul.cc (4 rows of x by 4 of w, a horizontal sum per output) read each weight row
// once per 4 rows of x and spend a reduction per output: right for decode, wrong for prefill and training,
// where M (tokens) is in the hundreds. This is the BLIS structure instead:
//   - w stays stored out-major [N, K]; each thread packs a block of kNC rows x kKC inputs of it into panels
//     [kKC / 2][kNR outputs][2 inputs] (vdpbf16ps multiplies pairs of bf16 along K), once per call, and reuses
//     the panels over all M rows of x;
//   - the register tile is kMR = 12 rows of x by kNR = 32 outputs (two zmm per row, 24 accumulators): a pair of
//     x's bf16 values is broadcast against a panel of 16 outputs x 2 inputs, no horizontal sums;
//   - K is blocked by kKC so that one 32-output panel (kKC / 2 x 128 bytes = 32 KB) stays near L1 while every row
//     of x streams past it, and a thread's packed block (kNC x kKC x 2 bytes = 128 KB) in L2.
// A small w under many more rows of x (a weight gradient xᵀ.dy: the tied head's is [50257, 768] from K = 256 tokens)
// is packed whole once and the work split over rows of x instead (RowSplit). Outputs are float32, or bfloat16
// rounded as XLA's convert rounds (Bf16GemmKN<uint16_t>: a bf16 weight's gradient written once, at half the bytes).
// Tails: a K block of odd length ends with a half pair (x's second value read as 0, w's packed as 0), outputs
// past N are packed as zero rows and masked at the store, so no load or store leaves x, w or out.
#include "gemm_bf16.h"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>

#include "bf16.h"
#include "parallel_rows.h"
#include "transpose16.h"

namespace gptjax {
namespace {

// Chosen by measurement on gpt2's shapes (2 busy Zen 4 cores, CPU time of one thread, GFLOP/s at M = 512, K = 3072,
// N = 768): 2 panels x 12 rows with 512-input K blocks 192, 4 panels x 6 rows 179 (128-input blocks: 164).
constexpr int kNP = 2;           // 16-lane panels per register tile
constexpr int kMR = 12;          // rows of x per register tile (kNP * kMR accumulators + kNP panels + 1 <= 32 zmm)
constexpr int kNR = 16 * kNP;    // outputs per register tile
constexpr int64_t kKC = 512;     // inputs per K block (even: pairs never straddle blocks)
constexpr int64_t kNC = 128;     // outputs per thread work item (a multiple of kNR)

#define GPTJAX_GEMM_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Packs w rows [n0, n0 + nc) x inputs [k0, k0 + kc) into kNR-wide panels: panel b holds, for each pair p,
// lanes j of (w[n0 + kNR b + j][k0 + 2p], w[n0 + kNR b + j][k0 + 2p + 1]) as one uint32, zero past n0 + nc or K.
// 16 full rows x 16 pairs are one 16 x 16 transpose of 64-byte loads; the rest (a row tail, the last pairs) one
// masked gather per pair (scalar packing cost as much as the GEMM's tiles at M = 128; gathers still 4 times the
// transposes' time, which let the GEMM start at 128 rows).
GPTJAX_GEMM_TARGET void PackPanels(const uint16_t* w, int64_t K, int64_t n0, int64_t nc, int64_t k0, int64_t kc,
                                   uint32_t* out) {
  const int64_t pairs = (kc + 1) / 2, blocks = (nc + kNR - 1) / kNR;
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(int(2 * K)));  // byte offsets of 16 rows
  for (int64_t b = 0; b < blocks; ++b)
    for (int q = 0; q < kNP; ++q) {
      uint32_t* panel = out + b * pairs * kNR + 16 * q;
      const int64_t n = b * kNR + 16 * q, live = std::clamp<int64_t>(nc - n, 0, 16);
      const __mmask16 m = live == 16 ? __mmask16(0xFFFF) : __mmask16((1u << live) - 1);
      const uint16_t* base = w + (n0 + n) * K + k0;
      int64_t p = 0;
      if (live == 16)
        for (; p + 16 <= kc / 2; p += 16) {
          __m512i r[16];
#pragma GCC unroll 16
          for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(base + i * K + 2 * p);
          Transpose16x16(r);
#pragma GCC unroll 16
          for (int i = 0; i < 16; ++i) _mm512_storeu_si512(panel + (p + i) * kNR, r[i]);
        }
      for (; p < kc / 2; ++p)
        _mm512_storeu_si512(panel + p * kNR,
                            live ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, rows, base + 2 * p, 1)
                                 : _mm512_setzero_si512());
      if (kc % 2)  // the odd last input alone, its pair's second half zero
        for (int j = 0; j < 16; ++j) panel[(pairs - 1) * kNR + j] = j < live ? base[j * K + kc - 1] : 0;
    }
}

// The same panels from w stored in-major [K, N] (Conv1D layout; a training step's weights and output gradients):
// pair p of 16 outputs is two 32-byte row loads, interleaved by one permute, zero past n0 + nc or K.
GPTJAX_GEMM_TARGET void PackPanelsKN(const uint16_t* w, int64_t N, int64_t n0, int64_t nc, int64_t k0, int64_t kc,
                                     uint32_t* out) {
  const int64_t pairs = (kc + 1) / 2, blocks = (nc + kNR - 1) / kNR;
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                              6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);  // lane j: (row0[j], row1[j])
  for (int64_t b = 0; b < blocks; ++b)
    for (int q = 0; q < kNP; ++q) {
      uint32_t* panel = out + b * pairs * kNR + 16 * q;
      const int64_t n = b * kNR + 16 * q, live = std::clamp<int64_t>(nc - n, 0, 16);
      const __mmask16 m = live == 16 ? __mmask16(0xFFFF) : __mmask16((1u << live) - 1);
      for (int64_t p = 0; p < pairs; ++p) {
        const uint16_t* row0 = w + (k0 + 2 * p) * N + n0 + n;
        const bool second = 2 * p + 1 < kc;  // an odd block's last pair is half
        const __m256i lo = _mm256_maskz_loadu_epi16(m, row0);
        const __m256i hi = second ? _mm256_maskz_loadu_epi16(m, row0 + N) : _mm256_setzero_si256();
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        _mm512_storeu_si512(panel + p * kNR, _mm512_permutexvar_epi16(interleave, both));
      }
    }
}

// One pair of inputs of a register tile: kNP panel loads, then per row of x one broadcast pair and kNP vdpbf16ps.
// kHalf: the K block's odd last input alone (x's second value taken as 0, never read past x's row).
template <int MR, bool kHalf>
GPTJAX_GEMM_TARGET inline __attribute__((always_inline)) void Step(const uint16_t* x, int64_t K,
                                                                   const uint32_t* panel, __m512* acc) {
  __m512bh wv[kNP];
#pragma GCC unroll 4
  for (int j = 0; j < kNP; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(panel + 16 * j);
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    uint32_t v = x[i * K];
    if constexpr (!kHalf) std::memcpy(&v, x + i * K, sizeof v);
    const __m512bh xb = (__m512bh)_mm512_set1_epi32(int(v));
#pragma GCC unroll 4
    for (int j = 0; j < kNP; ++j) acc[kNP * i + j] = _mm512_dpbf16_ps(acc[kNP * i + j], xb, wv[j]);
  }
}

// One register tile: MR rows of x (row stride K, starting at the block's first input) against one packed panel
// of `pairs` pairs (the last one a half pair when odd). Stores (or adds, after the first K block) into out, row
// stride ldo; a bfloat16 out (Out = uint16_t) is only stored, rounded, after a K that is one block.
template <int MR, typename Out>
GPTJAX_GEMM_TARGET void Tile(const uint16_t* x, int64_t K, const uint32_t* panel, int64_t pairs, bool odd,
                             Out* out, int64_t ldo, const __mmask16* mask, bool add) {
  __m512 acc[kNP * MR];
#pragma GCC unroll 32
  for (int t = 0; t < kNP * MR; ++t) acc[t] = _mm512_setzero_ps();
  const int64_t full = odd ? pairs - 1 : pairs;
  for (int64_t p = 0; p < full; ++p) Step<MR, false>(x + 2 * p, K, panel + p * kNR, acc);
  if (odd) Step<MR, true>(x + 2 * full, K, panel + full * kNR, acc);
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < kNP; ++j) {
      Out* o = out + i * ldo + 16 * j;
      __m512 r = acc[kNP * i + j];
      if constexpr (std::is_same_v<Out, float>) {
        if (add) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(mask[j], o));
        _mm512_mask_storeu_ps(o, mask[j], r);
      } else {
        _mm256_mask_storeu_epi16(o, mask[j], RoundToBf16(r));
      }
    }
}

template <typename Out>
using TileFn = void (*)(const uint16_t*, int64_t, const uint32_t*, int64_t, bool, Out*, int64_t, const __mmask16*,
                        bool);

template <typename Out, int... MR>
constexpr auto MakeTiles(std::integer_sequence<int, MR...>) {
  return std::array<TileFn<Out>, sizeof...(MR)>{&Tile<MR + 1, Out>...};
}

// Tile<1> .. Tile<kMR>, for the M tail.
template <typename Out>
constexpr auto kTiles = MakeTiles<Out>(std::make_integer_sequence<int, kMR>());

inline __mmask16 LaneMask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// Outputs [n0, n1) for all M rows into out (at column n0 of row 0, row stride ldo): per K block, pack the weights
// once (pack(nc, k0, kc, packed)), then sweep every row of x past each panel.
template <typename Out, typename Pack>
void Range(const uint16_t* x, const Pack& pack, Out* out, int64_t ldo, int64_t M, int64_t K, int64_t n0, int64_t n1,
           uint32_t* packed) {
  const int64_t nc = n1 - n0, blocks = (nc + kNR - 1) / kNR;
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0), pairs = (kc + 1) / 2;
    pack(nc, k0, kc, packed);
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t left = n1 - (n0 + b * kNR);
      __mmask16 mask[kNP];
      for (int j = 0; j < kNP; ++j) mask[j] = LaneMask(left - 16 * j);
      const uint32_t* panel = packed + b * pairs * kNR;
      for (int64_t m = 0; m < M; m += kMR) {
        const int64_t mr = std::min<int64_t>(kMR, M - m);
        kTiles<Out>[mr - 1](x + m * K + k0, K, panel, pairs, kc % 2 != 0, out + m * ldo + b * kNR, ldo, mask, k0 > 0);
      }
    }
  }
}

// bfloat16 outputs [n0, n1) for all M rows. One K block: its tiles round as they store. More: per kMC rows of x,
// the float32 sums of every K block in a work item's scratch [kMC, nc] (L2-resident), rounded once at the end
// (the weights' panels are then packed once per kMC rows).
constexpr int64_t kMC = 8 * kMR;

template <typename Pack>
GPTJAX_GEMM_TARGET void RangeBf16(const uint16_t* x, const Pack& pack, uint16_t* out, int64_t M, int64_t K, int64_t N,
                                  int64_t n0, int64_t n1, uint32_t* packed) {
  if (K <= kKC) return Range(x, pack, out + n0, N, M, K, n0, n1, packed);
  const int64_t nc = n1 - n0;
  const auto scratch = std::make_unique<float[]>(size_t(kMC * nc));
  for (int64_t m0 = 0; m0 < M; m0 += kMC) {
    const int64_t mc = std::min(kMC, M - m0);
    Range(x + m0 * K, pack, scratch.get(), nc, mc, K, n0, n1, packed);
    for (int64_t i = 0; i < mc; ++i)
      for (int64_t j = 0; j < nc; j += 16)
        _mm256_mask_storeu_epi16(out + (m0 + i) * N + n0 + j, LaneMask(nc - j),
                                 RoundToBf16(_mm512_maskz_loadu_ps(LaneMask(nc - j), scratch.get() + i * nc + j)));
  }
}

// A w whose panels take at most this many bytes, under many more rows of x than outputs, is packed whole, once,
// and the work split over rows of x instead (RowSplit).
constexpr int64_t kPackOnceBytes = 512 * 1024;

// out [M, N] = x [M, K] . (w viewed as [N, K]) with all of w packed once into panels of every K (pack(N, 0, K)),
// the work split over kMC rows of x: x is streamed once (an output-split reads all of x once per 128 outputs: the
// tied head's weight gradient [50257, 768] = dy^T [50257, 256] . x [256, 768] read 26 MB of dy 6 times), each
// panel stays near L1 while a work item's rows pass it, and each tile sums all of K in registers before it stores.
template <typename Out, typename Pack>
void RowSplit(const uint16_t* x, const Pack& pack, Out* out, int64_t M, int64_t K, int64_t N,
              xla::ffi::ThreadPool& pool) {
  const int64_t pairs = (K + 1) / 2, blocks = (N + kNR - 1) / kNR;
  const auto packed = std::make_unique<uint32_t[]>(size_t(blocks * pairs * kNR));
  pack(N, 0, K, packed.get());
  const uint32_t* panels = packed.get();
  ParallelRows(pool, M, [=](int64_t m0, int64_t m1) {
    for (int64_t b = 0; b < blocks; ++b) {
      __mmask16 mask[kNP];
      for (int j = 0; j < kNP; ++j) mask[j] = LaneMask(N - b * kNR - 16 * j);
      for (int64_t m = m0; m < m1; m += kMR) {
        const int64_t mr = std::min<int64_t>(kMR, m1 - m);
        kTiles<Out>[mr - 1](x + m * K, K, panels + b * pairs * kNR, pairs, K % 2 != 0, out + m * N + b * kNR, N,
                            mask, false);
      }
    }
  }, kMC);
}

// out [M, N] = x [M, K] . (w viewed as [N, K]), on the pool: each work item packs its outputs' panels with
// pack_for(n0) and reuses them over all M rows and K blocks (or RowSplit, for a small w under many rows).
template <typename Out, typename PackFor>
void Gemm(const uint16_t* x, const PackFor& pack_for, Out* out, int64_t M, int64_t K, int64_t N,
          xla::ffi::ThreadPool& pool) {
  if (K == 0) {  // empty sums
    std::fill(out, out + M * N, Out(0));
    return;
  }
  if (M > 2 * N && ((K + 1) / 2) * ((N + kNR - 1) / kNR) * kNR * 4 <= kPackOnceBytes)
    return RowSplit(x, pack_for(0), out, M, K, N, pool);
  ParallelRows(pool, N, [=](int64_t n0, int64_t n1) {
    // per work item (64 KB, reused over all M rows and K blocks): allocation is noise beside M x 128 x K MACs
    const auto packed = std::make_unique<uint32_t[]>(size_t((kNC + kNR - 1) / kNR) * ((kKC + 1) / 2) * kNR);
    if constexpr (std::is_same_v<Out, float>)
      Range(x, pack_for(n0), out + n0, N, M, K, n0, n1, packed.get());
    else
      RangeBf16(x, pack_for(n0), out, M, K, N, n0, n1, packed.get());
  }, kNC);
}

}  // namespace

void Bf16Gemm(const uint16_t* x, const uint16_t* w, float* out, int64_t M, int64_t K, int64_t N,
              xla::ffi::ThreadPool& pool) {
  Gemm(x, [=](int64_t n0) {
    return [=](int64_t nc, int64_t k0, int64_t kc, uint32_t* packed) { PackPanels(w, K, n0, nc, k0, kc, packed); };
  }, out, M, K, N, pool);
}

template <typename Out>
void Bf16GemmKN(const uint16_t* x, const uint16_t* w, Out* out, int64_t M, int64_t K, int64_t N,
                xla::ffi::ThreadPool& pool) {
  Gemm(x, [=](int64_t n0) {
    return [=](int64_t nc, int64_t k0, int64_t kc, uint32_t* packed) { PackPanelsKN(w, N, n0, nc, k0, kc, packed); };
  }, out, M, K, N, pool);
}

template void Bf16GemmKN(const uint16_t*, const uint16_t*, float*, int64_t, int64_t, int64_t, xla::ffi::ThreadPool&);
template void Bf16GemmKN(const uint16_t*, const uint16_t*, uint16_t*, int64_t, int64_t, int64_t,
                         xla::ffi::ThreadPool&);

}  // namespace gptjax
