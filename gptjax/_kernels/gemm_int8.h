// Int8Gemm: the GEMM-shaped int8 kernel (gemm_int8.cc) that cpu_matmul.cc's int8 handlers take for many rows of x.
#pragma once

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace gptjax {

// From this many rows of x (prompt tokens) on, gptjax_int8_matmul runs Int8Gemm instead of its GEMV-shaped blocks
// (4 rows of x by 4 of w, a horizontal sum per output: right for decode, where w's bytes are the cost). With the
// weights hot in cache the two cross at 12-24 rows, but a decode step streams them from memory and packing adds a
// pass over them: at 16 rows (weight-only int8 decode at B=8, whose activations are two int8 terms) the gpt2 decode
// measured 0.90x of the GEMV's tokens/s, so the GEMM starts at 64 rows (a prefill, or a decode batch of 32+ rows).
constexpr int64_t kInt8GemmMinRows = 64;

// out int32 [M, N] = x int8 [M, K] . w int8 [N, K]^T, exactly (wrapping int32 arithmetic, as XLA's int8 dot).
void Int8Gemm(const int8_t* x, const int8_t* w, int32_t* out, int64_t M, int64_t K, int64_t N,
              xla::ffi::ThreadPool& pool);

}  // namespace gptjax
