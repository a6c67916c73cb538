// Kernels shared by the quantized matmul ops (cpu_quant.cpp) and the fused decode step
// (cpu_decode.cpp): int8 activation quantization and one 16-row weight tile of an int4 / int8
// matrix-vector product on AVX-512 VNNI. The weight layouts are described in cpu_quant.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace glmcode_cpu {

constexpr int kTile = 16;
constexpr int kMaxRows = 4;  // activation rows sharing one pass over a weight tile
// Weights stream from memory once per token: prefetching this far ahead keeps enough cache-line
// requests in flight for one core to approach its memory bandwidth (the hardware prefetcher
// alone stops at page boundaries).
constexpr int64_t kPrefetchBytes = 3072;

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0); }

struct QuantizedRows {
  std::vector<int8_t> values;  // [M, K]
  std::vector<float> scales;   // [M, G]
  std::vector<int32_t> sums;   // [M, G]
};

template <typename T>
float to_float(T v) { return static_cast<float>(v); }

// One group of activations to int8 with one scale; returns the sum of the int8 values.
// biased: store q + 128 (as the byte q ^ 0x80), the unsigned operand the int8 kernel wants.
template <typename T>
int32_t quantize_group_scalar(const T* src, int64_t group, bool biased, int8_t* dst, float* scale_out) {
  float amax = 0.f;
  for (int64_t i = 0; i < group; ++i) amax = std::max(amax, std::fabs(to_float(src[i])));
  const float scale = amax > 0.f ? amax / 127.f : 1.f;
  const float inv = 1.f / scale;
  int32_t sum = 0;
  for (int64_t i = 0; i < group; ++i) {
    const int32_t q = static_cast<int32_t>(std::nearbyint(to_float(src[i]) * inv));
    dst[i] = static_cast<int8_t>(biased ? q ^ 0x80 : q);
    sum += q;
  }
  *scale_out = scale;
  return sum;
}

template <typename T>
int32_t quantize_group(const T* src, int64_t group, bool biased, int8_t* dst, float* scale_out) {
  return quantize_group_scalar(src, group, biased, dst, scale_out);
}

// The same for float input, 16 values at a time (bit-identical: max is exact and the
// conversion rounds to nearest even, as nearbyint does).
template <>
inline int32_t quantize_group<float>(const float* src, int64_t group, bool biased, int8_t* dst, float* scale_out) {
  if (group % 16) return quantize_group_scalar(src, group, biased, dst, scale_out);
  __m512 amax = _mm512_setzero_ps();
  for (int64_t i = 0; i < group; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(src + i)));
  const float max_abs = _mm512_reduce_max_ps(amax);
  const float scale = max_abs > 0.f ? max_abs / 127.f : 1.f;
  const __m512 inv = _mm512_set1_ps(1.f / scale);
  __m512i sum = _mm512_setzero_si512();
  const __m128i bias = _mm_set1_epi8(static_cast<char>(biased ? 0x80 : 0));
  for (int64_t i = 0; i < group; i += 16) {
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src + i), inv));
    sum = _mm512_add_epi32(sum, q);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm_xor_si128(_mm512_cvtsepi32_epi8(q), bias));
  }
  *scale_out = scale;
  return _mm512_reduce_add_epi32(sum);
}

template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int64_t group, QuantizedRows& out, bool biased = false) {
  const int64_t G = K / group;
  out.values.resize(M * K);
  out.scales.resize(M * G);
  out.sums.resize(M * G);
  at::parallel_for(0, M * G, 64, [&](int64_t begin, int64_t end) {
    for (int64_t mg = begin; mg < end; ++mg) {
      const int64_t offset = (mg / G) * K + (mg % G) * group;
      out.sums[mg] = quantize_group(x + offset, group, biased, out.values.data() + offset, &out.scales[mg]);
    }
  });
}

inline __m512 load_bf16(const at::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __m512i broadcast_word(const int8_t* p) {
  int32_t word;
  std::memcpy(&word, p, 4);
  return _mm512_set1_epi32(word);
}

template <typename Out>
inline void store_row(Out* dst, __m512 v) {
  alignas(64) float tmp[kTile];
  _mm512_store_ps(tmp, v);
  for (int j = 0; j < kTile; ++j) dst[j] = static_cast<Out>(tmp[j]);
}

template <>
inline void store_row<float>(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }

// One tile of 16 output rows for MB activation rows starting at m0.
template <int MB, typename Out>
void int4_tile(const uint8_t* w, const at::BFloat16* scales, const at::BFloat16* zeros,
               const QuantizedRows& x, int64_t m0, int64_t K, int64_t group, Out* y, int64_t N,
               int64_t tile) {
  const int64_t G = K / group;
  // The high nibble is used in place (16 * q): one AND instead of a shift and an AND. Its
  // chains' sums are exact multiples of 16, shifted back once per group.
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F), high_nibbles = _mm512_set1_epi8(static_cast<char>(0xF0));
  __m512 acc[MB];
  for (int r = 0; r < MB; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    // Four independent accumulator chains per row: one chain would wait on VPDPBUSD latency.
    __m512i dot[MB][4];
    for (int r = 0; r < MB; ++r)
      for (int c = 0; c < 4; ++c) dot[r][c] = _mm512_setzero_si512();
    const uint8_t* wg = w + g * (group / 8) * 64;
    for (int64_t b = 0; b < group / 8; b += 2) {  // group is a multiple of 32: b pairs exist
      prefetch(wg + b * 64);
      prefetch(wg + (b + 1) * 64);
      const __m512i v0 = _mm512_loadu_si512(wg + b * 64);
      const __m512i v1 = _mm512_loadu_si512(wg + (b + 1) * 64);
      const __m512i lo0 = _mm512_and_si512(v0, low_nibbles);
      const __m512i hi0 = _mm512_and_si512(v0, high_nibbles);
      const __m512i lo1 = _mm512_and_si512(v1, low_nibbles);
      const __m512i hi1 = _mm512_and_si512(v1, high_nibbles);
      for (int r = 0; r < MB; ++r) {
        const int8_t* xp = x.values.data() + (m0 + r) * K + g * group + b * 8;
        dot[r][0] = _mm512_dpbusd_epi32(dot[r][0], lo0, broadcast_word(xp));
        dot[r][1] = _mm512_dpbusd_epi32(dot[r][1], hi0, broadcast_word(xp + 4));
        dot[r][2] = _mm512_dpbusd_epi32(dot[r][2], lo1, broadcast_word(xp + 8));
        dot[r][3] = _mm512_dpbusd_epi32(dot[r][3], hi1, broadcast_word(xp + 12));
      }
    }
    const __m512 s = load_bf16(scales + g * kTile);
    const __m512 z = load_bf16(zeros + g * kTile);
    for (int r = 0; r < MB; ++r) {
      const int64_t mg = (m0 + r) * G + g;
      const float xs = x.scales[mg];
      const int32_t xsum = x.sums[mg];
      // group term = xs * (s * (dot - 8 * xsum) + z * xsum)
      const __m512i high = _mm512_srai_epi32(_mm512_add_epi32(dot[r][1], dot[r][3]), 4);
      const __m512i total = _mm512_add_epi32(_mm512_add_epi32(dot[r][0], dot[r][2]), high);
      const __m512 d = _mm512_cvtepi32_ps(_mm512_sub_epi32(total, _mm512_set1_epi32(8 * xsum)));
      acc[r] = _mm512_fmadd_ps(d, _mm512_mul_ps(s, _mm512_set1_ps(xs)), acc[r]);
      acc[r] = _mm512_fmadd_ps(z, _mm512_set1_ps(xs * static_cast<float>(xsum)), acc[r]);
    }
  }
  for (int r = 0; r < MB; ++r) store_row(y + (m0 + r) * N + tile * kTile, acc[r]);
}

template <int MB, typename Out>
void int8_tile(const int8_t* w, const float* scales, const int32_t* sums, const QuantizedRows& x,
               int64_t m0, int64_t K, int64_t group, Out* y, int64_t N, int64_t tile) {
  const int64_t G = K / group;
  __m512 acc[MB];
  for (int r = 0; r < MB; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i dot[MB][4];
    for (int r = 0; r < MB; ++r)
      for (int c = 0; c < 4; ++c) dot[r][c] = _mm512_setzero_si512();
    const int8_t* wg = w + g * (group / 4) * 64;
    // the activations were stored biased (x + 128, unsigned): see quantize_input
    auto step = [&](int64_t b, int chain) {
      prefetch(wg + b * 64);
      const __m512i v = _mm512_loadu_si512(wg + b * 64);
      for (int r = 0; r < MB; ++r) {
        const int8_t* xp = x.values.data() + (m0 + r) * K + g * group + b * 4;
        dot[r][chain] = _mm512_dpbusd_epi32(dot[r][chain], broadcast_word(xp), v);
      }
    };
    int64_t b = 0;
    for (; b + 4 <= group / 4; b += 4) {
      step(b, 0);
      step(b + 1, 1);
      step(b + 2, 2);
      step(b + 3, 3);
    }
    for (; b < group / 4; ++b) step(b, 0);
    const __m512i wsum128 = _mm512_slli_epi32(
        _mm512_loadu_si512(sums + g * kTile), 7);
    for (int r = 0; r < MB; ++r) {
      const float xs = x.scales[(m0 + r) * G + g];
      const __m512i total = _mm512_add_epi32(_mm512_add_epi32(dot[r][0], dot[r][1]), _mm512_add_epi32(dot[r][2], dot[r][3]));
      const __m512 d = _mm512_cvtepi32_ps(_mm512_sub_epi32(total, wsum128));
      acc[r] = _mm512_fmadd_ps(d, _mm512_set1_ps(xs), acc[r]);
    }
  }
  const __m512 s = _mm512_loadu_ps(scales + tile * kTile);
  for (int r = 0; r < MB; ++r) store_row(y + (m0 + r) * N + tile * kTile, _mm512_mul_ps(acc[r], s));
}


}  // namespace glmcode_cpu
