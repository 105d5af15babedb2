// The gradient of a bfloat16 embedding table's row lookup for XLA:CPU (gptjax.backends.jax.bf16_train's lookup,
// the bf16 train step), called through the XLA FFI; compiled into gptjax._cpu_kernels beside cpu_matmul.cc.
//
//   gptjax_bf16_rows_grad: ids int32 [...] (N ids), g float32 [..., D] -> bfloat16 [V, D]: row v is the float32 sum
//     of g's rows whose id is v (ids wrapped from the end when negative, then clamped to [0, V), as the lookup
//     gathered them), rounded to nearest even once; every other row zero.
//
// JAX transposes the lookup into a scatter-add into a bfloat16 zero table, which XLA:CPU runs in float32: a float32
// zero table, the scatter, a rounding copy, then (the tied head's gradient being bfloat16 too) a float32 sum of the
// two [V, D] gradients and another rounding copy; on gpt2 four [50257, 768] float32 buffers, 440 MB of the train
// step's 720 MB of temporaries (each step's fresh pages cost page faults too). This writes the bfloat16 table
// once; only the sum with the head's gradient stays in XLA.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "bf16.h"
#include "parallel_rows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kZeroRows = 256;  // rows of the table zeroed per work item

// out[v] = round(sum of g[t] over `order`'s run of equal ids v), D floats per row.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void SumRow(const float* g, const int64_t* run, int64_t n,
                                                                 int64_t D, uint16_t* out) {
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 k = D - d >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (D - d)) - 1);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; ++i) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(k, g + run[i] * D + d));
    _mm256_mask_storeu_epi16(out + d, k, gptjax::RoundToBf16(acc));
  }
}

ffi::Error RowsGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> g,
                        ffi::ResultBuffer<ffi::BF16> out) {
  const auto od = out->dimensions(), gd = g.dimensions();
  const int64_t N = ids.element_count();
  if (od.size() != 2 || gd.size() != ids.dimensions().size() + 1 || gd.back() != od[1] ||
      static_cast<int64_t>(g.element_count()) != N * od[1] || (od[0] == 0 && N > 0))
    return ffi::Error::InvalidArgument("gptjax_bf16_rows_grad: ids [...], g [..., D] and a non-empty out [V, D] "
                                       "expected");
  const int64_t V = od[0], D = od[1];
  auto* table = reinterpret_cast<uint16_t*>(out->typed_data());
  gptjax::ParallelRows(pool, V, [=](int64_t v0, int64_t v1) {
    std::memset(table + v0 * D, 0, size_t((v1 - v0) * D) * sizeof(uint16_t));
  }, kZeroRows);
  std::vector<int64_t> row(N), order(N);  // each id's table row; the ids' positions sorted by row
  for (int64_t t = 0; t < N; ++t) {
    const int64_t id = ids.typed_data()[t];
    row[t] = std::clamp<int64_t>(id < 0 ? id + V : id, 0, V - 1);
  }
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return row[a] < row[b]; });
  for (int64_t i = 0; i < N;) {
    int64_t j = i;
    while (j < N && row[order[j]] == row[order[i]]) ++j;
    SumRow(g.typed_data(), order.data() + i, j - i, D, table + row[order[i]] * D);
    i = j;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxBf16RowsGrad, RowsGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());
