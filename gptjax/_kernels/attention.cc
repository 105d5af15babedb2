// Causal self-attention for XLA:CPU (gptjax.backends.cpu_kernels.causal_attention), called from jitted JAX code
// through the XLA FFI; compiled into gptjax._cpu_kernels beside cpu_matmul.cc, which lists it in targets().
//
//   gptjax_causal_attention: qkv float32 [B, T, 3, H, K] (queries, keys, values of each token, as the fused
//       projection leaves them) -> float32 [B, T, H, K], out[b, t, h] = sum over s <= t of p[t, s] v[s] with
//       p = softmax over s <= t of (q[t] . k[s]) / sqrt(K): the model's attention without a cache (prefill, scoring).
//
// XLA's formulation runs the whole [T, T] score matrix (half of it masked), the mask, the softmax and both dots as
// separate passes over [H, T, T] float32 buffers (gpt2, T = 512: about 10 ms per layer, 40% of a w8a8 prefill).
// Measured on 2 Zen 4 cores, one layer's 12 heads of 64: T = 512 3-6 ms here against XLA's 15-17; T = 1024 17-27 ms
// against 96-117; a w8a8 prefill of 512 tokens went from 284 to 244 ms, fp32's from 628 to 537.
// Here one work item is one (batch row, head): its keys transposed once into a [K, T] panel and its values copied
// into a [T, K] one (both L2-resident), then per tile of kMR queries: scores for keys up to the tile's last query only
// (the masked half is never computed), the softmax of each row in place, the weighted sum of values. Register tiles
// are kMR queries by 32 keys (scores) and kMR queries by 32 lanes of K (weighted sum): broadcasts against two
// vectors, no horizontal sums. Rows past T repeat the last query (valid memory) and are never stored; keys past a
// row's query get probability 0; K's tail lanes are masked, so nothing reads or writes past qkv or out.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel_rows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using gptjax::ParallelRows;

#define GPTJAX_ATTN_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))

constexpr int kMR = 8;       // queries per register tile (8 x 2 accumulators)

struct Layout {
  const float* qkv;
  float* out;
  int64_t T, H, K;
  int64_t Stride() const { return 3 * H * K; }  // floats between tokens in qkv
  const float* Q(int64_t b, int64_t t, int64_t h) const { return qkv + (b * T + t) * Stride() + h * K; }
  const float* Kk(int64_t b, int64_t t, int64_t h) const { return Q(b, t, h) + H * K; }
  const float* V(int64_t b, int64_t t, int64_t h) const { return Q(b, t, h) + 2 * H * K; }
  float* O(int64_t b, int64_t t, int64_t h) const { return out + ((b * T + t) * H + h) * K; }
};

GPTJAX_ATTN_TARGET inline __mmask16 TailMask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

// exp(x) for x <= 0 (scores minus their row's maximum): x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial of r
// (Cephes' expf coefficients, within 2 ulp of expf) scaled by 2^n with vscalefps, which underflows to 0 as expf does.
GPTJAX_ATTN_TARGET inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // expf is 0 from about -103.97
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// Scores of the tile's queries qt [K][kMR] (transposed) against keys [0, n) from the transposed panel kt [K][np],
// times scale, into s [kMR][np] (np: a multiple of 32; keys past n score against zeros).
GPTJAX_ATTN_TARGET void ScoreTile(const float* qt, const float* kt, int64_t K, int64_t np, int64_t n, float scale,
                                  float* s) {
  for (int64_t j = 0; j < n; j += 32) {
    __m512 acc[kMR][2];
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t d = 0; d < K; ++d) {
      const __m512 k0 = _mm512_loadu_ps(kt + d * np + j), k1 = _mm512_loadu_ps(kt + d * np + j + 16);
#pragma GCC unroll 8
      for (int i = 0; i < kMR; ++i) {
        const __m512 qd = _mm512_set1_ps(qt[d * kMR + i]);
        acc[i][0] = _mm512_fmadd_ps(qd, k0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(qd, k1, acc[i][1]);
      }
    }
    const __m512 sc = _mm512_set1_ps(scale);
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) {
      _mm512_storeu_ps(s + i * np + j, _mm512_mul_ps(acc[i][0], sc));
      _mm512_storeu_ps(s + i * np + j + 16, _mm512_mul_ps(acc[i][1], sc));
    }
  }
}

// Row t's scores s[0, np) -> its probabilities over keys [0, t] (softmax: exp of score minus the maximum, divided
// by the sum, as jax.nn.softmax), 0 for keys (t, np).
GPTJAX_ATTN_TARGET void SoftmaxRow(float* s, int64_t t, int64_t np) {
  const int64_t n = t + 1;
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) mx = _mm512_mask_max_ps(mx, TailMask(n - j), mx, _mm512_loadu_ps(s + j));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 live = TailMask(n - j);
    const __m512 e = _mm512_maskz_mov_ps(live, Exp(_mm512_sub_ps(_mm512_loadu_ps(s + j), m)));
    sum = _mm512_add_ps(sum, e);
    _mm512_storeu_ps(s + j, e);
  }
  const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
  for (int64_t j = 0; j < n; j += 16) _mm512_storeu_ps(s + j, _mm512_div_ps(_mm512_loadu_ps(s + j), total));
  for (int64_t j = (n + 15) / 16 * 16; j < np; j += 16) _mm512_storeu_ps(s + j, _mm512_setzero_ps());
}

// out rows [t0, t0 + rows) of head h = p [kMR][np] . values vc [n][K] (contiguous), 32 lanes of K at a time.
GPTJAX_ATTN_TARGET void MixTile(const Layout& a, int64_t b, int64_t h, int64_t t0, int rows, const float* p,
                                int64_t np, const float* vc, int64_t n) {
  const int64_t K = a.K;
  for (int64_t c = 0; c < K; c += 32) {
    const __mmask16 m0 = TailMask(K - c), m1 = K - c > 16 ? TailMask(K - c - 16) : 0;
    __m512 acc[kMR][2];
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const __m512 v0 = _mm512_maskz_loadu_ps(m0, vc + j * K + c), v1 = _mm512_maskz_loadu_ps(m1, vc + j * K + c + 16);
#pragma GCC unroll 8
      for (int i = 0; i < kMR; ++i) {
        const __m512 pj = _mm512_set1_ps(p[i * np + j]);
        acc[i][0] = _mm512_fmadd_ps(pj, v0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(pj, v1, acc[i][1]);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) {  // constant indices keep acc in registers (a loop to `rows` spilled it)
      if (i >= rows) break;
      float* o = a.O(b, t0 + i, h) + c;
      _mm512_mask_storeu_ps(o, m0, acc[i][0]);
      _mm512_mask_storeu_ps(o + 16, m1, acc[i][1]);
    }
  }
}

// One work item: every query of batch row b, head h. Its keys are transposed into kt [K][np] and its values copied
// into vc [T][K] once (from qkv, where consecutive tokens lie 3 H K floats apart, to L2-resident panels).
GPTJAX_ATTN_TARGET void Head(const Layout& a, int64_t b, int64_t h, std::vector<float>& scratch) {
  const int64_t T = a.T, K = a.K, np = (T + 31) / 32 * 32;  // keys padded to whole score tiles
  scratch.resize(std::max<size_t>(scratch.size(), 2 * K * np + kMR * np + K * kMR));  // grows only
  float* kt = scratch.data();  // [K][np] keys transposed, zero past T
  float* vc = kt + K * np;     // [T][K] values
  float* s = vc + K * np;      // [kMR][np] one tile's scores, then probabilities
  float* qt = s + kMR * np;    // [K][kMR] one tile's queries transposed
  for (int64_t j = 0; j < T; ++j) {
    const float* k = a.Kk(b, j, h);
    for (int64_t d = 0; d < K; ++d) kt[d * np + j] = k[d];
    std::copy(a.V(b, j, h), a.V(b, j, h) + K, vc + j * K);
  }
  for (int64_t d = 0; d < K; ++d) std::fill(kt + d * np + T, kt + (d + 1) * np, 0.0f);
  const float scale = 1.0f / std::sqrt(float(K));
  for (int64_t t = 0; t < T; t += kMR) {
    const int rows = int(std::min<int64_t>(kMR, T - t));
    const int64_t n = t + rows;  // keys this tile reads: up to its last query
    for (int i = 0; i < kMR; ++i) {  // rows past T repeat the last query (never stored)
      const float* q = a.Q(b, t + std::min(i, rows - 1), h);
      for (int64_t d = 0; d < K; ++d) qt[d * kMR + i] = q[d];
    }
    ScoreTile(qt, kt, K, np, n, scale, s);
    for (int i = 0; i < rows; ++i) SoftmaxRow(s + i * np, t + i, np);
    for (int i = rows; i < kMR; ++i) std::fill(s + i * np, s + (i + 1) * np, 0.0f);
    MixTile(a, b, h, t, rows, s, np, vc, n);
  }
}

ffi::Error CausalAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::ResultBuffer<ffi::F32> out) {
  const auto d = qkv.dimensions(), o = out->dimensions();
  if (d.size() != 5 || d[2] != 3 || o.size() != 4 || o[0] != d[0] || o[1] != d[1] || o[2] != d[3] || o[3] != d[4])
    return ffi::Error::InvalidArgument("gptjax_causal_attention: qkv [B, T, 3, H, K] and out [B, T, H, K] expected");
  const Layout a{qkv.typed_data(), out->typed_data(), d[1], d[3], d[4]};
  const int64_t B = d[0];
  if (B == 0 || a.T == 0 || a.H == 0 || a.K == 0) return ffi::Error::Success();
  ParallelRows(pool, B * a.H, [=](int64_t i0, int64_t i1) {  // one (batch row, head) per work item
    std::vector<float> scratch;
    for (int64_t i = i0; i < i1; ++i) Head(a, i / a.H, i % a.H, scratch);
  }, 1);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxCausalAttention, CausalAttentionImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Ret<
                                  ffi::Buffer<ffi::F32>>());
