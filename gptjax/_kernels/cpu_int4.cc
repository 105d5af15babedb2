// The packed-int4 matmul for XLA:CPU (gptjax.backends.cpu_kernels.int4_matmul), called from jitted JAX code through
// the XLA FFI; compiled into gptjax._cpu_kernels beside cpu_matmul.cc, which lists it in targets().
//
//   gptjax_int4_matmul: x int8 [M, K], w uint8 [N, K / 2], ws float32 [N, G] -> float32 [M, N]
//       = sum over groups g of K / G inputs of ws[n, g] * (the exact int32 sum of x[m, k] * (nibble(w, n, k) - 8)).
//
// Byte j of a row of w holds input 2j in its low nibble and 2j + 1 in its high one, each stored as value + 8
// (gptjax.quantize.pack_int4). The nibbles are unpacked in registers (a shift and two masks per 64 bytes) and
// multiplied as they are, unsigned, by vpdpbusd against x as signed bytes; x is split once per call into its even
// and odd inputs (so the low nibbles meet the even inputs), and the nibbles' + 8 is removed by starting each
// lane's sum at -8 times the sum of x over that lane's inputs (computed once per call, exact in int32). No int8
// or float copy of w is made: a decode step reads its K / 2 bytes per row once.
//
// One 64-byte load of w spans 128 inputs; int32 lane i of its vpdpbusd sums spans inputs 8i .. 8i + 7, so with
// groups of 32, 64 or 128 inputs each lane lies in one group: the lane's exact sum is converted to float32 and
// multiplied by its group's scale (a permute of the row's scales), and the lanes are added at the end.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel_rows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using gptjax::ParallelRows;

#define GPTJAX_INT4_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

constexpr int kNB = 4;  // rows of w per register block
constexpr int kMB = 2;  // rows of x per register block (decode: the two int8 terms of one token)
constexpr int kPrefetchRows = 2 * kNB;

struct Int4Args {
  const uint8_t* xe;  // [M, kp] even inputs of x, as int8 bits, zero-padded to kp bytes
  const uint8_t* xo;  // [M, kp] odd inputs
  const int32_t* offset;  // [M, kp / 4] per int32 lane of each 64-byte block: -8 * the sum of x over its 8 inputs
  int64_t kp;  // padded bytes per row of xe / xo (a multiple of 64)
  const uint8_t* w;  // [N, K2]
  int64_t K2;  // bytes per row of w (K / 2)
  const float* ws;  // [N, G]
  int64_t G, gs;  // groups per row, inputs per group
  __m512i lane_group;  // lane i -> the group of its inputs within a 128-input block (relative to the block's first)
  float* out;  // [M, N]
  int64_t N;
};

template <int MB, int NB>
GPTJAX_INT4_TARGET inline void Int4Block(const Int4Args& a, int64_t m, int64_t n) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 facc[MB * NB];
#pragma GCC unroll 8
  for (int t = 0; t < MB * NB; ++t) facc[t] = _mm512_setzero_ps();
  const uint8_t* w = a.w + n * a.K2;
  const float* ws = a.ws + n * a.G;
  for (int64_t k = 0; k < a.K2; k += 64) {  // k: byte index; inputs 2k .. 2k + 127
    const __mmask64 mask = a.K2 - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (a.K2 - k)) - 1;  // w's tail: 0
    const int64_t g0 = 2 * k / a.gs;  // the group of the block's first input
    const __mmask16 gmask = a.G - g0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (a.G - g0)) - 1);
    __m512i lo[NB], hi[NB];
    __m512 scale[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      const __m512i bytes = _mm512_maskz_loadu_epi8(mask, w + j * a.K2 + k);
      _mm_prefetch(reinterpret_cast<const char*>(w + (kPrefetchRows + j) * a.K2 + k), _MM_HINT_T0);
      lo[j] = _mm512_and_si512(bytes, low4);
      hi[j] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4);
      scale[j] = _mm512_permutexvar_ps(a.lane_group, _mm512_maskz_loadu_ps(gmask, ws + j * a.G + g0));
    }
#pragma GCC unroll 2
    for (int i = 0; i < MB; ++i) {
      const __m512i xe = _mm512_loadu_si512(a.xe + (m + i) * a.kp + k);
      const __m512i xo = _mm512_loadu_si512(a.xo + (m + i) * a.kp + k);
      const __m512i off = _mm512_loadu_si512(a.offset + ((m + i) * a.kp + k) / 4);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {  // per lane: sum of (nibble - 8) * x, exact
        const __m512i sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(off, lo[j], xe), hi[j], xo);
        facc[i * NB + j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale[j], facc[i * NB + j]);
      }
    }
  }
#pragma GCC unroll 2
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) a.out[(m + i) * a.N + n + j] = _mm512_reduce_add_ps(facc[i * NB + j]);
}

template <int NB>
GPTJAX_INT4_TARGET void Int4Rows(const Int4Args& a, int64_t M, int64_t n) {
  int64_t m = 0;
  for (; m + kMB <= M; m += kMB) Int4Block<kMB, NB>(a, m, n);
  for (; m < M; ++m) Int4Block<1, NB>(a, m, n);
}

GPTJAX_INT4_TARGET void Int4Matmul(const int8_t* x, const uint8_t* w, const float* ws, float* out, int64_t M,
                                   int64_t K, int64_t N, int64_t G, ffi::ThreadPool& pool) {
  const int64_t K2 = K / 2, kp = (K2 + 63) / 64 * 64, gs = K / G;
  std::vector<uint8_t> xe(M * kp, 0), xo(M * kp, 0);
  std::vector<int32_t> offset(M * kp / 4, 0);  // lane l of a block: packed bytes 4l .. 4l + 3, inputs 8l .. 8l + 7
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < K2; ++j) {
      xe[m * kp + j] = uint8_t(x[m * K + 2 * j]);
      xo[m * kp + j] = uint8_t(x[m * K + 2 * j + 1]);
      offset[(m * kp + j) / 4] -= 8 * (int32_t(x[m * K + 2 * j]) + int32_t(x[m * K + 2 * j + 1]));
    }
  alignas(64) int32_t lanes[16];
  for (int i = 0; i < 16; ++i) lanes[i] = gs >= 128 ? 0 : int32_t(8 * i / gs);  // lane i: inputs 8i .. 8i + 7
  Int4Args a{xe.data(), xo.data(), offset.data(), kp, w, K2, ws, G, gs, _mm512_load_si512(lanes), out, N};
  ParallelRows(pool, N, [&a, M](int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + kNB <= n1; n += kNB) Int4Rows<kNB>(a, M, n);
    for (; n < n1; ++n) Int4Rows<1>(a, M, n);
  });
}

ffi::Error Int4Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::F32> ws,
                    ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = ws.dimensions(), od = out->dimensions();
  if (xd.size() < 1 || wd.size() != 2 || sd.size() != 2 || od.size() != xd.size())
    return ffi::Error::InvalidArgument("gptjax_int4_matmul: x [..., K], w [N, K / 2], ws [N, G], out [..., N]");
  const int64_t K = xd.back(), N = wd[0], G = sd[1];
  int64_t M = 1;
  bool leading_match = true;
  for (size_t i = 0; i + 1 < xd.size(); ++i) {
    M *= xd[i];
    leading_match = leading_match && od[i] == xd[i];
  }
  if (K % 2 || wd[1] != K / 2 || sd[0] != N || od.back() != N || !leading_match)
    return ffi::Error::InvalidArgument("gptjax_int4_matmul: out must be [..., N] for x [..., K] (K even), "
                                       "w [N, K / 2] and ws [N, G]");
  const int64_t gs = G > 0 && K % G == 0 ? K / G : 0;
  if (K > 0 && (gs == 0 || gs % 8 || (128 % gs && gs % 128)))
    return ffi::Error::InvalidArgument("gptjax_int4_matmul: groups of K / G inputs must be a multiple of 8 that "
                                       "divides 128 or is a multiple of it");
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(out->typed_data(), out->typed_data() + M * N, 0.0f);
    return ffi::Error::Success();
  }
  Int4Matmul(x.typed_data(), w.typed_data(), ws.typed_data(), out->typed_data(), M, K, N, G, pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxInt4Matmul, Int4Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
