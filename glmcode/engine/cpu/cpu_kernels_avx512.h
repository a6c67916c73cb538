// cpu_kernels.h's kernels on AVX-512 (F, BW, VL, DQ and VNNI): the 16 rows of a weight tile are
// one 512-bit vector. Included by cpu_kernels.h only; its AVX2 twin is cpu_kernels_avx2.h.
#pragma once

// (cpu_kernels.h includes this inside namespace glmcode_cpu.)

// exp of 16 floats: 2^n * e^r with |r| <= ln2/2, e^r by its degree-6 Taylor polynomial
// (relative error ~1e-7, like expf).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // ln2 split in two for accuracy
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// out = silu(gate) * up for n values
inline void silu_mul(const float* gate, const float* up, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    const __m512 sigmoid = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid), _mm512_loadu_ps(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

inline __m512 load_bf16(const at::BFloat16* p);
inline __m512 load16_as_float(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16_as_float(const at::BFloat16* p) { return load_bf16(p); }

// The same 16 values at a time for float and bfloat16 input (bit-identical: max is exact, the
// bf16 widening too, and the conversion rounds to nearest even, as nearbyint does).
template <typename T>
inline int32_t quantize_group_vector(const T* src, int64_t group, bool biased, int8_t* dst, float* scale_out) {
  if (group % 16) return quantize_group_scalar(src, group, biased, dst, scale_out);
  __m512 amax = _mm512_setzero_ps();
  for (int64_t i = 0; i < group; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16_as_float(src + i)));
  const float max_abs = _mm512_reduce_max_ps(amax);
  const float scale = max_abs > 0.f ? max_abs / 127.f : 1.f;
  const __m512 inv = _mm512_set1_ps(1.f / scale);
  __m512i sum = _mm512_setzero_si512();
  const __m128i bias = _mm_set1_epi8(static_cast<char>(biased ? 0x80 : 0));
  for (int64_t i = 0; i < group; i += 16) {
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load16_as_float(src + i), inv));
    sum = _mm512_add_epi32(sum, q);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm_xor_si128(_mm512_cvtsepi32_epi8(q), bias));
  }
  *scale_out = scale;
  return _mm512_reduce_add_epi32(sum);
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

// v's bits rounded to bfloat16 in their high half (nearest even, as c10's float -> bfloat16
// conversion does, NaNs aside); the low half is left to the caller to drop.
inline __m512i bf16_rounded_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
}

template <>
inline void store_row<at::BFloat16>(at::BFloat16* dst, __m512 v) {
  const __m512i high = _mm512_srli_epi32(bf16_rounded_bits(v), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(high));
}

// dst[k] = src[k] * scale for K int8 values (K a multiple of 16).
template <typename Out>
inline void scale_int8(const int8_t* src, int64_t K, float scale, Out* dst) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t k = 0; k < K; k += 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k));
    store_row(dst + k, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), s));
  }
}

// One tile of 16 output rows for MB activation rows starting at m0: output row m0 + r goes to
// y + r * ldy, its 16 values at column 16 * tile.
template <int MB, typename Out>
void int4_tile(const uint8_t* w, const at::BFloat16* scales, const at::BFloat16* zeros,
               const QuantizedRows& x, int64_t m0, int64_t K, int64_t group, Out* y, int64_t ldy,
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
  for (int r = 0; r < MB; ++r) store_row(y + r * ldy + tile * kTile, acc[r]);
}

template <int MB, typename Out>
void int8_tile(const int8_t* w, const float* scales, const int32_t* sums, const QuantizedRows& x,
               int64_t m0, int64_t K, int64_t group, Out* y, int64_t ldy, int64_t tile) {
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
  for (int r = 0; r < MB; ++r) store_row(y + r * ldy + tile * kTile, _mm512_mul_ps(acc[r], s));
}

// ---- the small kernels of the fused decode step (cpu_decode.cpp)

// The sum of x[i]^2 over n values.
inline float sum_of_squares(const float* x, int64_t n) {
  __m512 squares = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) squares = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i), squares);
  float total = _mm512_reduce_add_ps(squares);
  for (; i < n; ++i) total += x[i] * x[i];
  return total;
}

// a . b over n values, n a multiple of 16.
inline float dot(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  return _mm512_reduce_add_ps(acc);
}

// p[t] = exp(p[t] - shift) for t < count; returns their sum.
inline float exp_shifted(float* p, int64_t count, float shift) {
  float total = 0.f;
  int64_t t = 0;
  const __m512 s = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  for (; t + 16 <= count; t += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p + t), s));
    _mm512_storeu_ps(p + t, e);
    sum = _mm512_add_ps(sum, e);
  }
  total = _mm512_reduce_add_ps(sum);
  for (; t < count; ++t) {
    p[t] = std::exp(p[t] - shift);
    total += p[t];
  }
  return total;
}

// dots[k] = q . rows[k] for T rows of D floats
template <int T>
inline void dot_rows(const float* q, const float* rows, int64_t D, float* dots) {
  __m512 acc[T];
  for (int k = 0; k < T; ++k) acc[k] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= D; i += 16) {
    const __m512 qv = _mm512_loadu_ps(q + i);
    for (int k = 0; k < T; ++k) acc[k] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(rows + k * D + i), acc[k]);
  }
  for (int k = 0; k < T; ++k) {
    dots[k] = _mm512_reduce_add_ps(acc[k]);
    for (int64_t j = i; j < D; ++j) dots[k] += q[j] * rows[k * D + j];
  }
}

// out[h][:L] += sum_t p[h][t] * block[t][:L] for M heads (rows of D values, float or bf16), 32
// latent values at a time, so that the accumulators stay in registers while the tokens stream by.
template <int M, typename C>
void accumulate_values(const C* block, int64_t count, int64_t L, int64_t D, const float* p, int64_t p_stride, float* out) {
  for (int64_t i = 0; i < L; i += 32) {
    __m512 acc[M][2];
    for (int k = 0; k < M; ++k) {
      acc[k][0] = _mm512_loadu_ps(out + k * L + i);
      acc[k][1] = _mm512_loadu_ps(out + k * L + i + 16);
    }
    for (int64_t t = 0; t < count; ++t) {
      const __m512 v0 = load16_as_float(block + t * D + i), v1 = load16_as_float(block + t * D + i + 16);
      for (int k = 0; k < M; ++k) {
        const __m512 w = _mm512_set1_ps(p[k * p_stride + t]);
        acc[k][0] = _mm512_fmadd_ps(w, v0, acc[k][0]);
        acc[k][1] = _mm512_fmadd_ps(w, v1, acc[k][1]);
      }
    }
    for (int k = 0; k < M; ++k) {
      _mm512_storeu_ps(out + k * L + i, acc[k][0]);
      _mm512_storeu_ps(out + k * L + i + 16, acc[k][1]);
    }
  }
}

// ---- the rows of the attention softmax (cpu_softmax.cpp)

// dst[j] = float(src[j]) for n values; returns the largest of them (-inf for none).
template <typename T>
inline float copy_as_float(const T* src, int64_t n, float* dst) {
  int64_t j = 0;
  __m512 peak = _mm512_set1_ps(-INFINITY);
  for (; j + 16 <= n; j += 16) {
    const __m512 v = load16_as_float(src + j);
    _mm512_storeu_ps(dst + j, v);
    peak = _mm512_max_ps(peak, v);
  }
  float top = _mm512_reduce_max_ps(peak);
  for (; j < n; ++j) top = std::max(top, dst[j] = static_cast<float>(src[j]));
  return top;
}

// dst[j] = T(src[j] * scale) for n values.
template <typename T>
inline void store_scaled(const float* src, int64_t n, float scale, T* dst) {
  const __m512 s = _mm512_set1_ps(scale);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) store_row(dst + j, _mm512_mul_ps(_mm512_loadu_ps(src + j), s));
  for (; j < n; ++j) dst[j] = T(src[j] * scale);
}
