// The gradient of a bfloat16 embedding table's row lookup for XLA:CPU (gptjax.backends.jax.bf16_train's lookup,
// the bf16 train step), called through the XLA FFI; compiled into gptjax._cpu_kernels beside cpu_matmul.cc.
//
//   gptjax_bf16_rows_add: base bfloat16 [V, D], ids int32 [...] (N ids), g float32 [..., D] -> bfloat16 [V, D]
//     (written over base): row v is base[v] plus the float32 sum of g's rows whose id is v (ids wrapped from the
//     end when negative, then clamped to [0, V), as the lookup gathered them), rounded to nearest even once; the
//     rows no id names are base's, untouched.
//
// The base is the tied head's gradient (the lookup hands the head its table, so both gradients come back to the
// lookup together) or zeros. JAX's own transpose is a scatter-add into a bfloat16 zero table plus a sum with the
// head's gradient, which XLA:CPU runs in float32: on gpt2, float32 [50257, 768] zero table, scatter, sum, and
// rounding copies, 440 MB of the train step's 720 MB of temporaries (each step's fresh pages fault in again).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "bf16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// out[v] = round(out[v] + sum of g[t] over the run of ids v), D floats per row.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void AddRow(const float* g, const int64_t* run, int64_t n,
                                                                 int64_t D, uint16_t* out) {
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 k = D - d >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (D - d)) - 1);
    __m512 acc = gptjax::LoadBf16(out + d, k);
    for (int64_t i = 0; i < n; ++i) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(k, g + run[i] * D + d));
    _mm256_mask_storeu_epi16(out + d, k, gptjax::RoundToBf16(acc));
  }
}

ffi::Error RowsAddImpl(ffi::Buffer<ffi::BF16> base, ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> g,
                       ffi::ResultBuffer<ffi::BF16> out) {
  const auto od = out->dimensions(), gd = g.dimensions();
  const int64_t N = ids.element_count();
  if (od.size() != 2 || base.element_count() != out->element_count() || gd.size() != ids.dimensions().size() + 1 ||
      gd.back() != od[1] || static_cast<int64_t>(g.element_count()) != N * od[1] || (od[0] == 0 && N > 0))
    return ffi::Error::InvalidArgument("gptjax_bf16_rows_add: base and out [V, D] (V > 0), ids [...] and g [..., D] "
                                       "expected");
  if (base.typed_data() != out->typed_data())
    return ffi::Error::InvalidArgument("gptjax_bf16_rows_add: base must be aliased to the output");
  const int64_t V = od[0], D = od[1];
  std::vector<int64_t> row(N), order(N);  // each id's table row; the ids' positions sorted by row
  for (int64_t t = 0; t < N; ++t) {
    const int64_t id = ids.typed_data()[t];
    row[t] = std::clamp<int64_t>(id < 0 ? id + V : id, 0, V - 1);
  }
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return row[a] < row[b]; });
  auto* table = reinterpret_cast<uint16_t*>(out->typed_data());
  for (int64_t i = 0; i < N;) {
    int64_t j = i;
    while (j < N && row[order[j]] == row[order[i]]) ++j;
    AddRow(g.typed_data(), order.data() + i, j - i, D, table + row[order[i]] * D);
    i = j;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxBf16RowsAdd, RowsAddImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());
