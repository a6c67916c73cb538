// cpu_kernels.h's kernels on AVX2 and FMA, for x86 CPUs without AVX-512 (AMD Zen 2 and 3, Intel
// client cores): the same weight layouts and the same integer dot product per group as
// cpu_kernels_avx512.h, so every op gives the same results on either build.
//
// A weight tile's 16 rows are two 256-bit halves of 8 rows, done one after the other. AVX2 has
// no VPDPBUSD: VPMADDUBSW multiplies unsigned by signed bytes and adds pairs into 16 bits, and
// VPMADDWD with ones adds those pairs into 32 bits. The 16-bit sums must not saturate:
//   int4: q (0..15) x activation (-127..127), four products a lane: at most 4 * 2 * 15 * 127.
//   int8: the activations come biased (unsigned, 0..255), which could saturate; they are unbiased
//         and the sign moved onto them (VPSIGNB), so |w| x (+-x) is at most 2 * 128 * 127.
#pragma once

// (cpu_kernels.h includes this inside namespace glmcode_cpu.)

// 8 bf16 values as floats.
inline __m256 load8_bf16(const at::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline __m256 load8_as_float(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8_as_float(const at::BFloat16* p) { return load8_bf16(p); }

inline float reduce_max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline int32_t reduce_add8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// exp of 8 floats, as exp16 of the AVX-512 build: 2^n * e^r, e^r by its degree-6 Taylor polynomial.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));  // 2^n stays a normal float
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  // 2^n through the exponent bits
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

// out = silu(gate) * up for n values
inline void silu_mul(const float* gate, const float* up, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 sigmoid = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

// One group of activations to int8, 16 values at a time; bit-identical to quantize_group_scalar
// (max and the bf16 widening are exact; the conversion rounds to nearest even, as nearbyint).
template <typename T>
inline int32_t quantize_group_vector(const T* src, int64_t group, bool biased, int8_t* dst, float* scale_out) {
  if (group % 16) return quantize_group_scalar(src, group, biased, dst, scale_out);
  const __m256 sign_bit = _mm256_set1_ps(-0.f);
  __m256 amax = _mm256_setzero_ps();
  for (int64_t i = 0; i < group; i += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, load8_as_float(src + i)));
  const float max_abs = reduce_max8(amax);
  const float scale = max_abs > 0.f ? max_abs / 127.f : 1.f;
  const __m256 inv = _mm256_set1_ps(1.f / scale);
  __m256i sum = _mm256_setzero_si256();
  const __m128i bias = _mm_set1_epi8(static_cast<char>(biased ? 0x80 : 0));
  for (int64_t i = 0; i < group; i += 16) {
    const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(load8_as_float(src + i), inv));
    const __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(load8_as_float(src + i + 8), inv));
    sum = _mm256_add_epi32(sum, _mm256_add_epi32(q0, q1));
    // packs works within 128-bit lanes: reorder the 64-bit quarters to get q0 then q1
    const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0xD8);
    const __m128i bytes = _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm_xor_si128(bytes, bias));
  }
  *scale_out = scale;
  return reduce_add8(sum);
}

// 8 outputs (float stores as they are; bf16 rounds to nearest even, as c10 does).
template <typename Out>
inline void store8(Out* dst, __m256 v) {
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  for (int j = 0; j < 8; ++j) dst[j] = static_cast<Out>(tmp[j]);
}

template <>
inline void store8<float>(float* dst, __m256 v) { _mm256_storeu_ps(dst, v); }

// dst[k] = src[k] * scale for K int8 values (K a multiple of 16).
template <typename Out>
inline void scale_int8(const int8_t* src, int64_t K, float scale, Out* dst) {
  const __m256 s = _mm256_set1_ps(scale);
  for (int64_t k = 0; k < K; k += 8) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + k));
    store8(dst + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), s));
  }
}

inline __m256i broadcast_word(const int8_t* p) {
  int32_t word;
  std::memcpy(&word, p, 4);
  return _mm256_set1_epi32(word);
}

// One tile of 16 output rows for MB activation rows starting at m0: output row m0 + r goes to
// y + r * ldy, its 16 values at column 16 * tile. (The layouts: cpu_quant.cpp.)
template <int MB, typename Out>
void int4_tile(const uint8_t* w, const at::BFloat16* scales, const at::BFloat16* zeros,
               const QuantizedRows& x, int64_t m0, int64_t K, int64_t group, Out* y, int64_t ldy,
               int64_t tile) {
  const int64_t G = K / group;
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int half = 0; half < 2; ++half) {  // rows 8 * half .. 8 * half + 7 of the tile
    __m256 acc[MB];
    for (int r = 0; r < MB; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m256i dot[MB];
      for (int r = 0; r < MB; ++r) dot[r] = _mm256_setzero_si256();
      const uint8_t* wg = w + g * (group / 8) * 64 + half * 32;
      for (int64_t b = 0; b < group / 8; b += 2) {  // group is a multiple of 32: b pairs exist
        if (half == 0) {
          prefetch(wg + b * 64);
          prefetch(wg + (b + 1) * 64);
        }
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + b * 64));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + (b + 1) * 64));
        const __m256i lo0 = _mm256_and_si256(v0, low_nibbles);
        const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low_nibbles);
        const __m256i lo1 = _mm256_and_si256(v1, low_nibbles);
        const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low_nibbles);
        for (int r = 0; r < MB; ++r) {
          const int8_t* xp = x.values.data() + (m0 + r) * K + g * group + b * 8;
          const __m256i pairs0 = _mm256_add_epi16(_mm256_maddubs_epi16(lo0, broadcast_word(xp)),
                                                  _mm256_maddubs_epi16(hi0, broadcast_word(xp + 4)));
          const __m256i pairs1 = _mm256_add_epi16(_mm256_maddubs_epi16(lo1, broadcast_word(xp + 8)),
                                                  _mm256_maddubs_epi16(hi1, broadcast_word(xp + 12)));
          dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(_mm256_add_epi16(pairs0, pairs1), ones));
        }
      }
      const __m256 s = load8_bf16(scales + g * kTile + half * 8);
      const __m256 z = load8_bf16(zeros + g * kTile + half * 8);
      for (int r = 0; r < MB; ++r) {
        const int64_t mg = (m0 + r) * G + g;
        const float xs = x.scales[mg];
        const int32_t xsum = x.sums[mg];
        // group term = xs * (s * (dot - 8 * xsum) + z * xsum)
        const __m256 d = _mm256_cvtepi32_ps(_mm256_sub_epi32(dot[r], _mm256_set1_epi32(8 * xsum)));
        acc[r] = _mm256_fmadd_ps(d, _mm256_mul_ps(s, _mm256_set1_ps(xs)), acc[r]);
        acc[r] = _mm256_fmadd_ps(z, _mm256_set1_ps(xs * static_cast<float>(xsum)), acc[r]);
      }
    }
    for (int r = 0; r < MB; ++r) store8(y + r * ldy + tile * kTile + half * 8, acc[r]);
  }
}

// int4_tile for many activation rows (a prefill chunk), group by group: each group of the tile is
// unpacked once into bytes that all the rows then read from L1, each broadcast activation word
// feeds both 8-row halves, and a lane sums 16 products (4 blocks) in 16 bits before VPMADDWD
// widens them: at most 16 * 15 * 127. The same integer sums and float steps as int4_tile, so the
// same results; ~20% more multiply-adds a cycle than int4_tile's 4 rows at a time (in L1, Zen 3).
// Two rows at a time: their 16- and 32-bit sums, the block's four registers and the two
// broadcast words take 14 of the 16 registers. At four rows GCC kept the 16-bit sums on the
// stack, and the products took 1.2-1.8x as long (bench_prefill_kernels.py, Zen 3).
constexpr int64_t kGroupRowsBlock = 64;  // rows per pass over a tile: their float sums stay in L1
constexpr int kGroupRowsPass = 2;        // rows that share each pass over a group's blocks

// acc [MB, 16] += group g's terms for rows m.. m + MB - 1; unpacked: the group's blocks, each
// as the low nibbles of rows 0-7 and 8-15, then the high ones.
template <int MB>
inline void int4_group_rows(const __m256i* unpacked, const at::BFloat16* scales, const at::BFloat16* zeros,
                            const QuantizedRows& x, int64_t m, int64_t K, int64_t group, int64_t g, float* acc) {
  const int64_t G = K / group;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i dot[MB][2];
  for (int r = 0; r < MB; ++r) dot[r][0] = dot[r][1] = _mm256_setzero_si256();
  for (int64_t b0 = 0; b0 < group / 8; b0 += 4) {
    __m256i pairs[MB][2];
    for (int r = 0; r < MB; ++r) pairs[r][0] = pairs[r][1] = _mm256_setzero_si256();
    for (int64_t b = b0; b < b0 + 4; ++b) {
      const __m256i* block = unpacked + 4 * b;
      for (int r = 0; r < MB; ++r) {
        const int8_t* xp = x.values.data() + (m + r) * K + g * group + b * 8;
        const __m256i x0 = broadcast_word(xp), x1 = broadcast_word(xp + 4);
        for (int h = 0; h < 2; ++h)
          pairs[r][h] = _mm256_add_epi16(pairs[r][h], _mm256_add_epi16(_mm256_maddubs_epi16(block[h], x0),
                                                                       _mm256_maddubs_epi16(block[2 + h], x1)));
      }
    }
    for (int r = 0; r < MB; ++r)
      for (int h = 0; h < 2; ++h) dot[r][h] = _mm256_add_epi32(dot[r][h], _mm256_madd_epi16(pairs[r][h], ones));
  }
  for (int h = 0; h < 2; ++h) {
    const __m256 s = load8_bf16(scales + g * kTile + h * 8), z = load8_bf16(zeros + g * kTile + h * 8);
    for (int r = 0; r < MB; ++r) {
      const int64_t mg = (m + r) * G + g;
      const float xs = x.scales[mg];
      const int32_t xsum = x.sums[mg];
      const __m256 d = _mm256_cvtepi32_ps(_mm256_sub_epi32(dot[r][h], _mm256_set1_epi32(8 * xsum)));
      float* out = acc + r * kTile + h * 8;
      __m256 sum = _mm256_fmadd_ps(d, _mm256_mul_ps(s, _mm256_set1_ps(xs)), _mm256_load_ps(out));
      sum = _mm256_fmadd_ps(z, _mm256_set1_ps(xs * static_cast<float>(xsum)), sum);
      _mm256_store_ps(out, sum);
    }
  }
}

template <typename Out>
void int4_tile_group_major(const uint8_t* w, const at::BFloat16* scales, const at::BFloat16* zeros,
                           const QuantizedRows& x, int64_t m0, int64_t M, int64_t K, int64_t group, Out* y,
                           int64_t ldy, int64_t tile) {
  const int64_t G = K / group, blocks = group / 8;
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
  AlignedVector<__m256i> unpacked(4 * blocks);
  alignas(64) float acc[kGroupRowsBlock * kTile];
  for (int64_t first = 0; first < M; first += kGroupRowsBlock) {
    const int64_t rows = std::min(kGroupRowsBlock, M - first);
    std::fill(acc, acc + rows * kTile, 0.f);
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* wg = w + g * blocks * 64;
      for (int64_t b = 0; b < blocks; ++b) {
        prefetch(wg + b * 64);
        for (int h = 0; h < 2; ++h) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + b * 64 + h * 32));
          unpacked[4 * b + h] = _mm256_and_si256(v, low_nibbles);
          unpacked[4 * b + 2 + h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low_nibbles);
        }
      }
      for_row_blocks<kGroupRowsPass>(rows, [&](auto mb, int64_t r) {
        int4_group_rows<decltype(mb)::value>(unpacked.data(), scales, zeros, x, m0 + first + r, K, group, g, acc + r * kTile);
      });
    }
    for (int64_t r = 0; r < rows; ++r)
      for (int h = 0; h < 2; ++h) store8(y + (first + r) * ldy + tile * kTile + h * 8, _mm256_load_ps(acc + r * kTile + h * 8));
  }
}

template <int MB, typename Out>
void int8_tile(const int8_t* w, const float* scales, const int32_t* sums, const QuantizedRows& x,
               int64_t m0, int64_t K, int64_t group, Out* y, int64_t ldy, int64_t tile) {
  (void)sums;  // the activations are unbiased here, so there is no +128 to undo
  const int64_t G = K / group;
  const __m256i unbias = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
  for (int half = 0; half < 2; ++half) {
    __m256 acc[MB];
    for (int r = 0; r < MB; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m256i dot[MB];
      for (int r = 0; r < MB; ++r) dot[r] = _mm256_setzero_si256();
      const int8_t* wg = w + g * (group / 4) * 64 + half * 32;
      for (int64_t b = 0; b < group / 4; ++b) {
        if (half == 0) prefetch(wg + b * 64);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + b * 64));
        const __m256i magnitude = _mm256_abs_epi8(v);
        for (int r = 0; r < MB; ++r) {
          const int8_t* xp = x.values.data() + (m0 + r) * K + g * group + b * 4;
          const __m256i signed_x = _mm256_sign_epi8(_mm256_xor_si256(broadcast_word(xp), unbias), v);
          dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, signed_x), ones));
        }
      }
      for (int r = 0; r < MB; ++r)
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), _mm256_set1_ps(x.scales[(m0 + r) * G + g]), acc[r]);
    }
    const __m256 s = _mm256_loadu_ps(scales + tile * kTile + half * 8);
    for (int r = 0; r < MB; ++r) store8(y + r * ldy + tile * kTile + half * 8, _mm256_mul_ps(acc[r], s));
  }
}

// ---- the small kernels of the fused decode step (cpu_decode.cpp)

inline float reduce_add8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The sum of x[i]^2 over n values.
inline float sum_of_squares(const float* x, int64_t n) {
  __m256 squares = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) squares = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(x + i), squares);
  float total = reduce_add8(squares);
  for (; i < n; ++i) total += x[i] * x[i];
  return total;
}

// a . b over n values, n a multiple of 16.
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  return reduce_add8(_mm256_add_ps(acc0, acc1));
}

// p[t] = exp(p[t] - shift) for t < count; returns their sum.
inline float exp_shifted(float* p, int64_t count, float shift) {
  int64_t t = 0;
  const __m256 s = _mm256_set1_ps(shift);
  __m256 sum = _mm256_setzero_ps();
  for (; t + 8 <= count; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), s));
    _mm256_storeu_ps(p + t, e);
    sum = _mm256_add_ps(sum, e);
  }
  float total = reduce_add8(sum);
  for (; t < count; ++t) {
    p[t] = std::exp(p[t] - shift);
    total += p[t];
  }
  return total;
}

// dots[k] = q . rows[k] for T rows of D floats
template <int T>
inline void dot_rows(const float* q, const float* rows, int64_t D, float* dots) {
  __m256 acc[T];
  for (int k = 0; k < T; ++k) acc[k] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    for (int k = 0; k < T; ++k) acc[k] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows + k * D + i), acc[k]);
  }
  for (int k = 0; k < T; ++k) {
    dots[k] = reduce_add8(acc[k]);
    for (int64_t j = i; j < D; ++j) dots[k] += q[j] * rows[k * D + j];
  }
}

// out[h][:L] += sum_t p[h][t] * block[t][:L] for M heads (rows of D values, float or bf16), 8
// latent values at a time: M accumulators and the row's values fill the 16 registers.
template <int M, typename C>
void accumulate_values(const C* block, int64_t count, int64_t L, int64_t D, const float* p, int64_t p_stride, float* out) {
  for (int64_t i = 0; i < L; i += 8) {
    __m256 acc[M];
    for (int k = 0; k < M; ++k) acc[k] = _mm256_loadu_ps(out + k * L + i);
    for (int64_t t = 0; t < count; ++t) {
      const __m256 v = load8_as_float(block + t * D + i);
      for (int k = 0; k < M; ++k) acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(p[k * p_stride + t]), v, acc[k]);
    }
    for (int k = 0; k < M; ++k) _mm256_storeu_ps(out + k * L + i, acc[k]);
  }
}

// ---- the rows of the attention softmax (cpu_softmax.cpp)

// dst[j] = float(src[j]) for n values; returns the largest of them (-inf for none).
template <typename T>
inline float copy_as_float(const T* src, int64_t n, float* dst) {
  int64_t j = 0;
  __m256 peak = _mm256_set1_ps(-INFINITY);
  for (; j + 8 <= n; j += 8) {
    const __m256 v = load8_as_float(src + j);
    _mm256_storeu_ps(dst + j, v);
    peak = _mm256_max_ps(peak, v);
  }
  float top = reduce_max8(peak);
  for (; j < n; ++j) top = std::max(top, dst[j] = static_cast<float>(src[j]));
  return top;
}

// dst[j] = T(src[j] * scale) for n values.
template <typename T>
inline void store_scaled(const float* src, int64_t n, float scale, T* dst) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) store8(dst + j, _mm256_mul_ps(_mm256_loadu_ps(src + j), s));
  for (; j < n; ++j) dst[j] = T(src[j] * scale);
}
