// Bf16Gemm: the GEMM-shaped bfloat16 matmul (prefill, training), defined in gemm_bf16.cc; cpu_matmul.cc's
// gptjax_bf16_matmul takes it for M >= kBf16GemmMinRows and keeps its GEMV-shaped blocks for decode.
#pragma once

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace gptjax {

// Rows of x from which the GEMM takes over from the GEMV blocks. Measured on gpt2's shapes (GFLOP/s of 2 Zen 4
// cores, weights in cache, GEMV -> GEMM, after the panels were packed by 16 x 16 transposes instead of gathers):
// M = 128: 263-352 -> 342-377 (K = 768, N = 2304), 147-270 -> 357-386 (K = 3072, N = 768); M = 32 and 64 level
// within the noise (200-340 both). A decode batch streams the weights from memory, where packing is one more
// pass over them (the int8 GEMM at 16 rows lost 10% at B = 8), so the GEMM starts at 128.
constexpr int64_t kBf16GemmMinRows = 128;

// out float32 [M, N] = x bf16 [M, K] . w bf16 [N, K]^T (bfloat16 as uint16 bits), float32 accumulation.
void Bf16Gemm(const uint16_t* x, const uint16_t* w, float* out, int64_t M, int64_t K, int64_t N,
              xla::ffi::ThreadPool& pool);

// The same with w stored in-major, bf16 [K, N] (Conv1D layout): out [M, N] = x [M, K] . w, for any M (training's
// x.W and x^T.dy without transposing w or dy; gptjax_bf16_matmul_kn). Out: float, or uint16_t for bfloat16 sums
// rounded to nearest even as XLA's convert rounds (a bf16 weight's gradient, written once at half the bytes).
template <typename Out>
void Bf16GemmKN(const uint16_t* x, const uint16_t* w, Out* out, int64_t M, int64_t K, int64_t N,
                xla::ffi::ThreadPool& pool);

}  // namespace gptjax
