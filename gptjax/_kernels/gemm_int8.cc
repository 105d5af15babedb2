// The int8 GEMM for prefill (many rows of x): int8 x int8 -> int32 with AVX512-VNNI (vpdpbusd), blocked for the
// caches as BLIS blocks a GEMM, for the weights as gptjax stores them (out-major w [N, K]).
//
// Register tile: kMR rows of x by kNR = 48 outputs. Each step broadcasts 4 bytes of one row of x (4 k's) against
// three 64-byte vectors of a packed weight panel (16 outputs x 4 k's each): 24 int32 accumulators, no horizontal
// sums (the GEMV kernel in cpu_matmul.cc ends every output with one; right for decode, where w's bytes dominate).
// Packing: per call, each thread packs its weight panels (kNR outputs x kKC k's, L1-resident) and runs all rows of
// x against them (x's block kMC x kKC stays in L2), so each weight byte is read once per kMC rows, not per 4.
// vpdpbusd multiplies unsigned by signed bytes: x is offset to x + 128 (as uint8) and 128 * (the panel's column
// sums, from a vpdpbusd against ones while packing) is subtracted: exact in (wrapping) int32.
#include "gemm_int8.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "parallel_rows.h"
#include "transpose16.h"

namespace gptjax {
namespace {

constexpr int kNV = 3;            // 64-byte vectors of outputs per register tile
constexpr int kNR = 16 * kNV;     // outputs per tile (and per packed panel)
constexpr int kMR = 8;            // rows of x per tile: 8 x 3 accumulators + 3 panel vectors + 1 broadcast
constexpr int64_t kKC = 384;      // k's per block: a panel is 48 x 384 = 18 KB, inside the 32 KB L1
constexpr int64_t kMC = 256;      // rows of x per block: 256 x 384 = 96 KB, inside the L2
constexpr int64_t kPanels = 4;    // panels per work item (192 outputs): enough items to balance the threads

#define GPTJAX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

inline __mmask16 Lanes(int64_t left) {  // the first `left` of 16 lanes (none for left <= 0)
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// dst[q * kNR + j] = the q-th int32 (4 k's) of row j, for 16 rows of 64 bytes each (row j at src + j * K), and
// sum + the column sums (a vpdpbusd against ones).
GPTJAX_TARGET inline __m512i Transpose16(const int8_t* src, int64_t K, int32_t* dst, __m512i sum) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i r[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * K);
  Transpose16x16(r);
#pragma GCC unroll 16
  for (int q = 0; q < 16; ++q) {
    _mm512_storeu_si512(dst + q * kNR, r[q]);
    sum = _mm512_dpbusd_epi32(sum, ones, r[q]);
  }
  return sum;
}

// Pack outputs [n, n + nr) (nr <= kNR) of w over k's [k0, k0 + kc) (kc a multiple of 4) into panel [kc / 4][kNR]
// int32 (4 k's of one output per int32; outputs past nr and k's past K are zero), and corr[kNR] = 128 * the
// column sums over those k's.
GPTJAX_TARGET void PackPanel(const int8_t* w, int64_t K, int64_t n, int64_t nr, int64_t k0, int64_t kc,
                             int32_t* panel, int32_t* corr) {
  const int64_t full = std::max<int64_t>(0, std::min(kc, (K - k0) / 4 * 4));  // k's with 4 in range
  const __m512i ones = _mm512_set1_epi8(1);
  for (int v = 0; v < kNV; ++v) {
    const int64_t rows = std::clamp<int64_t>(nr - 16 * v, 0, 16);
    const __mmask16 m = Lanes(rows);
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(int32_t(K)));
    const int8_t* base = w + (n + 16 * v) * K + k0;
    __m512i sum = _mm512_setzero_si512();
    int32_t* dst = panel + 16 * v;
    int64_t k = 0;
    if (rows == 16)
      for (; k + 64 <= full; k += 64, dst += 16 * kNR) sum = Transpose16(base + k, K, dst, sum);
    if (K <= INT32_MAX / 16) {  // gather offsets j * K fit in int32
      for (; k < full; k += 4, dst += kNR) {
        const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, base + k, 1);
        _mm512_storeu_si512(dst, g);
        sum = _mm512_dpbusd_epi32(sum, ones, g);
      }
    }
    for (; k < kc; k += 4, dst += kNR) {  // the tail of K (and zeros past it)
      alignas(64) int32_t lanes[16] = {};
      for (int64_t j = 0; j < rows; ++j)
        if (k0 + k < K) std::memcpy(&lanes[j], base + j * K + k, std::min<int64_t>(4, K - k0 - k));
      const __m512i g = _mm512_load_si512(lanes);
      _mm512_storeu_si512(dst, g);
      sum = _mm512_dpbusd_epi32(sum, ones, g);
    }
    _mm512_storeu_si512(corr + 16 * v, _mm512_slli_epi32(sum, 7));
  }
}

// out[i, j] (+)= sum over the block's k's of xu[i, k] * panel's column j - corr[j], for MR rows and nr outputs.
template <int MR>
GPTJAX_TARGET inline void Tile(const uint8_t* xu, int64_t kp, const int32_t* panel, int64_t kq, const int32_t* corr,
                               int32_t* out, int64_t N, int64_t nr, bool first) {
  __m512i acc[MR * kNV];
#pragma GCC unroll 24
  for (int t = 0; t < MR * kNV; ++t) acc[t] = _mm512_setzero_si512();
  for (int64_t q = 0; q < kq; ++q, panel += kNR) {
    __m512i b[kNV];
#pragma GCC unroll 3
    for (int v = 0; v < kNV; ++v) b[v] = _mm512_loadu_si512(panel + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t four;
      std::memcpy(&four, xu + i * kp + 4 * q, 4);
      const __m512i a = _mm512_set1_epi32(four);
#pragma GCC unroll 3
      for (int v = 0; v < kNV; ++v) acc[i * kNV + v] = _mm512_dpbusd_epi32(acc[i * kNV + v], a, b[v]);
    }
  }
#pragma GCC unroll 3
  for (int v = 0; v < kNV; ++v) {
    const __mmask16 m = Lanes(nr - 16 * v);
    if (!m) break;
    const __m512i c = _mm512_loadu_si512(corr + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t* o = out + i * N + 16 * v;
      __m512i r = _mm512_sub_epi32(acc[i * kNV + v], c);
      if (!first) r = _mm512_add_epi32(r, _mm512_maskz_loadu_epi32(m, o));
      _mm512_mask_storeu_epi32(o, m, r);
    }
  }
}

GPTJAX_TARGET void Tiles(const uint8_t* xu, int64_t kp, int64_t m0, int64_t m1, const int32_t* panel, int64_t kq,
                         const int32_t* corr, int32_t* out, int64_t N, int64_t nr, bool first) {
  for (int64_t m = m0; m < m1; m += kMR) {
    const uint8_t* xm = xu + m * kp;
    int32_t* om = out + m * N;
    switch (std::min<int64_t>(kMR, m1 - m)) {
      case 8: Tile<8>(xm, kp, panel, kq, corr, om, N, nr, first); break;
      case 7: Tile<7>(xm, kp, panel, kq, corr, om, N, nr, first); break;
      case 6: Tile<6>(xm, kp, panel, kq, corr, om, N, nr, first); break;
      case 5: Tile<5>(xm, kp, panel, kq, corr, om, N, nr, first); break;
      case 4: Tile<4>(xm, kp, panel, kq, corr, om, N, nr, first); break;
      case 3: Tile<3>(xm, kp, panel, kq, corr, om, N, nr, first); break;
      case 2: Tile<2>(xm, kp, panel, kq, corr, om, N, nr, first); break;
      default: Tile<1>(xm, kp, panel, kq, corr, om, N, nr, first); break;
    }
  }
}

// Outputs [n0, n1) over all rows of x: per block of k's, pack the work item's panels, then every row block.
GPTJAX_TARGET void Columns(const uint8_t* xu, int64_t kp, const int8_t* w, int32_t* out, int64_t M, int64_t K,
                           int64_t N, int64_t kc, int64_t n0, int64_t n1) {
  const int64_t panels = (n1 - n0 + kNR - 1) / kNR;
  std::vector<int32_t> packed(panels * (kc / 4) * kNR), corr(panels * kNR);  // this work item's packed w
  for (int64_t k0 = 0; k0 < kp; k0 += kc) {
    const int64_t kb = std::min(kc, kp - k0), kq = kb / 4;
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t n = n0 + p * kNR;
      PackPanel(w, K, n, std::min<int64_t>(kNR, n1 - n), k0, kb, &packed[p * kq * kNR], &corr[p * kNR]);
    }
    for (int64_t m0 = 0; m0 < M; m0 += kMC)
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t n = n0 + p * kNR;
        Tiles(xu + k0, kp, m0, std::min(M, m0 + kMC), &packed[p * kq * kNR], kq, &corr[p * kNR], out + n, N,
              std::min<int64_t>(kNR, n1 - n), k0 == 0);
      }
  }
}

}  // namespace

void Int8Gemm(const int8_t* x, const int8_t* w, int32_t* out, int64_t M, int64_t K, int64_t N,
              xla::ffi::ThreadPool& pool) {
  if (K == 0) {  // empty sums
    std::fill(out, out + M * N, 0);
    return;
  }
  const int64_t kp = (K + 3) / 4 * 4;                  // x's rows padded to whole 4-byte groups
  const int64_t blocks = (kp + kKC - 1) / kKC;
  const int64_t kc = ((kp + blocks - 1) / blocks + 3) / 4 * 4;  // equal blocks of k's: 768 -> 2 x 384
  std::vector<uint8_t> xu(M * kp, 0);  // x + 128 as uint8 (x ^ 0x80); the padding meets zeros in the panels
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xu[m * kp + k] = uint8_t(x[m * K + k]) ^ 0x80;
  const uint8_t* xp = xu.data();
  ParallelRows(pool, N, [=](int64_t n0, int64_t n1) { Columns(xp, kp, w, out, M, K, N, kc, n0, n1); },
               kPanels * kNR);
}

}  // namespace gptjax
