// The AdamW update of one parameter for XLA:CPU (gptjax.backends.jax.adamw.fused_update), called from the jitted
// train step through the XLA FFI; compiled into gptjax._cpu_kernels beside cpu_matmul.cc.
//
//   gptjax_adamw: p, m, v float32 [...] and g float32 or bfloat16 (a bf16 pass's gradients, widened exactly as
//     they are read) of one shape, h float32 [12] -> p', m', v' (written over p, m, v)
//     h: finite, |grads| (global norm), max_norm (0: no clipping), b1, b2, 1 - b1, 1 - b2 (each rounded from the
//     Python float, as optax's constants are), 1 - b1^t, 1 - b2^t, eps, lr, wd (0: not
//     decayed). The operations of optax.chain(clip_by_global_norm, adamw) in optax's order, each rounded to float32:
//       g = |grads| < max_norm ? g : (g / |grads|) * max_norm
//       m' = (1 - b1) g + b1 m;  v' = (1 - b2) g^2 + b2 v
//       u = (m' / (1 - b1^t)) / (sqrt(v' / (1 - b2^t)) + eps) [+ wd p];  p' = p + (-lr) u
//     XLA:CPU compiles the same expressions with its own rewrites (a division by a scalar as a multiplication by
//     its reciprocal, multiply-adds contracted by LLVM, differently in different fusions), so the two agree to
//     float32 rounding, not bit for bit.
//     A step whose loss or gradient norm is not finite (finite = 0) changes nothing.
//
// XLA:CPU ran optax's update as a few loops per parameter at about 6 GB/s (gpt2: 124M parameters, 0.4-0.6 s of a
// 1.3 s bf16 train step); this reads p, g, m, v and writes p, m, v once, on XLA's intra-op pool: 94 ms for gpt2's
// update (2 Zen 4 cores).
#include <immintrin.h>

#include <cstdint>

#include "bf16.h"
#include "parallel_rows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using gptjax::ParallelRows;

constexpr int64_t kChunk = 1 << 15;  // elements per work item (4 x 128 KB read)
constexpr int kHyper = 12;

struct Hyper {
  float norm, max_norm, b1, b2, omb1, omb2, bc1, bc2, eps, neg_lr, wd;
  bool clip, decay;
};

// The gradient's 16 lanes from i as float32 (a bfloat16 is the high half of its float32).
__attribute__((target("avx512f"))) inline __m512 LoadGrad(const float* g, int64_t i, __mmask16 k) {
  return _mm512_maskz_loadu_ps(k, g + i);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 LoadGrad(const uint16_t* g, int64_t i,
                                                                              __mmask16 k) {
  return gptjax::LoadBf16(g + i, k);
}

template <typename G>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void Update(const Hyper& h, float* p, const G* g, float* m,
                                                                 float* v, int64_t n) {
  const __m512 norm = _mm512_set1_ps(h.norm), max_norm = _mm512_set1_ps(h.max_norm), b1 = _mm512_set1_ps(h.b1),
               b2 = _mm512_set1_ps(h.b2), omb1 = _mm512_set1_ps(h.omb1), omb2 = _mm512_set1_ps(h.omb2),
               bc1 = _mm512_set1_ps(h.bc1), bc2 = _mm512_set1_ps(h.bc2), eps = _mm512_set1_ps(h.eps),
               neg_lr = _mm512_set1_ps(h.neg_lr), wd = _mm512_set1_ps(h.wd);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    __m512 gi = LoadGrad(g, i, k);
    if (h.clip) gi = _mm512_mul_ps(_mm512_div_ps(gi, norm), max_norm);
    const __m512 pi = _mm512_maskz_loadu_ps(k, p + i);
    const __m512 mi = _mm512_add_ps(_mm512_mul_ps(omb1, gi), _mm512_mul_ps(b1, _mm512_maskz_loadu_ps(k, m + i)));
    const __m512 vi = _mm512_add_ps(_mm512_mul_ps(omb2, _mm512_mul_ps(gi, gi)),
                                    _mm512_mul_ps(b2, _mm512_maskz_loadu_ps(k, v + i)));
    __m512 u = _mm512_div_ps(_mm512_div_ps(mi, bc1), _mm512_add_ps(_mm512_sqrt_ps(_mm512_div_ps(vi, bc2)), eps));
    if (h.decay) u = _mm512_add_ps(u, _mm512_mul_ps(wd, pi));
    _mm512_mask_storeu_ps(p + i, k, _mm512_add_ps(pi, _mm512_mul_ps(neg_lr, u)));
    _mm512_mask_storeu_ps(m + i, k, mi);
    _mm512_mask_storeu_ps(v + i, k, vi);
  }
}

ffi::Error AdamWImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::AnyBuffer g, ffi::Buffer<ffi::F32> m,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> hyper, ffi::ResultBuffer<ffi::F32> p_out,
                     ffi::ResultBuffer<ffi::F32> m_out, ffi::ResultBuffer<ffi::F32> v_out) {
  const int64_t n = p.element_count();
  if (g.element_count() != n || m.element_count() != n || v.element_count() != n || p_out->element_count() != n ||
      m_out->element_count() != n || v_out->element_count() != n || hyper.element_count() != kHyper)
    return ffi::Error::InvalidArgument("gptjax_adamw: p, g, m, v and the outputs of one size, and h [12], expected");
  if (g.element_type() != ffi::DataType::F32 && g.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("gptjax_adamw: float32 or bfloat16 gradients expected");
  if (p_out->typed_data() != p.typed_data() || m_out->typed_data() != m.typed_data() ||
      v_out->typed_data() != v.typed_data())
    return ffi::Error::InvalidArgument("gptjax_adamw: p, m and v must be aliased to the outputs");
  const float* h = hyper.typed_data();
  if (h[0] == 0.0f || n == 0) return ffi::Error::Success();  // not finite: the state stays as it was
  const Hyper hp{h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9], -h[10], h[11], h[2] > 0.0f && !(h[1] < h[2]),
                 h[11] != 0.0f};
  float *pd = p_out->typed_data(), *md = m_out->typed_data(), *vd = v_out->typed_data();
  const auto run = [&](const auto* gd) {
    ParallelRows(pool, n, [=](int64_t i0, int64_t i1) { Update(hp, pd + i0, gd + i0, md + i0, vd + i0, i1 - i0); },
                 kChunk);
  };
  if (g.element_type() == ffi::DataType::F32)
    run(static_cast<const float*>(g.untyped_data()));
  else
    run(static_cast<const uint16_t*>(g.untyped_data()));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxAdamW, AdamWImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
