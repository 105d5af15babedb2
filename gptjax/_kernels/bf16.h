// bfloat16 <-> float32 for 16 lanes, shared by the kernels: LoadBf16 widens exactly (a bfloat16 is the high half
// of its float32); RoundToBf16 rounds to nearest even as XLA's convert rounds (the bf16 GEMM's bfloat16 outputs, the
// embedding gradient).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace gptjax {

// The float32 values of the bfloat16 bits p[0..16) (lanes outside k read as 0).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 LoadBf16(const uint16_t* p, __mmask16 k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}

// 16 float32 lanes -> 16 bfloat16 bits, to nearest even, a NaN kept a (quiet) NaN: XLA's convert bit for bit on
// any input (vcvtneps2bf16 reads float32 subnormals as zero, whatever MXCSR says).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m256i RoundToBf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));  // quiet NaN
  return _mm512_cvtepi32_epi16(r);
}

}  // namespace gptjax
