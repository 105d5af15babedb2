// Bf16Gemm: the GEMM-shaped bfloat16 matmul (prefill, training), defined in gemm_bf16.cc; cpu_matmul.cc's
// gptjax_bf16_matmul takes it for M >= kBf16GemmMinRows and keeps its GEMV-shaped blocks for decode.
#pragma once

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace gptjax {

// Rows of x from which the GEMM takes over from the GEMV blocks. Measured on gpt2's shapes (CPU time of one thread on
// 2 busy Zen 4 cores, GFLOP/s GEMV -> GEMM): M = 32: 166 -> 81 (K = 768), 137 -> 82 (K = 3072), packing the
// weights costs more than it saves; M = 128: 153 -> 126 (K = 768), 133 -> 167 (K = 3072); M = 512: 139 -> 173,
// 135 -> 192. Level at 256 on K = 768, ahead from there.
constexpr int64_t kBf16GemmMinRows = 256;

// out float32 [M, N] = x bf16 [M, K] . w bf16 [N, K]^T (bfloat16 as uint16 bits), float32 accumulation.
void Bf16Gemm(const uint16_t* x, const uint16_t* w, float* out, int64_t M, int64_t K, int64_t N,
              xla::ffi::ThreadPool& pool);

}  // namespace gptjax
