// The decode step's attention kernels (cpu_decode.cpp): the work over one block of cached rows
// for every head of a pass, in each instruction set the step may run on, and the online softmax
// that joins the blocks. DecodePlan::attend picks one:
//   bf16 cache:  AMX tiles (TDPBF16PS), else VDPBF16PS (AVX512_BF16), else float32 FMAs (AVX2)
//   int8 cache:  each block dequantized to bf16 for the same kernels where the CPU has
//                AVX512_BF16, else 16-bit integers (VPMADDWD, AVX2)
//   float32 cache: cpu_kernels.h's dot_rows / accumulate_values (DecodePlan::attend_generic)
// Only cpu_decode.cpp includes this.
#pragma once

#include "cpu_kernels.h"

#include <limits>

#define GLMCODE_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

namespace glmcode_cpu {
namespace {

// The next cache block into L2, a few lines per step of this block's work: its reads overlap
// the work instead of stalling the next block's first tile loads (blocks are pages scattered
// in memory, which the hardware prefetcher cannot follow).
struct LinePrefetch {
  const char* next;
  int64_t bytes, per_step, done = 0;

  LinePrefetch(const void* block, int64_t block_bytes, int64_t steps)
      : next(static_cast<const char*>(block)), bytes(block_bytes), per_step((block_bytes / 64 + steps - 1) / steps * 64) {}

  void step() {
    for (const int64_t end = std::min(bytes, done + per_step); done < end; done += 64) _mm_prefetch(next + done, _MM_HINT_T1);
  }
};

// Attention over a bfloat16 cache with VDPBF16PS, which multiplies and sums pairs of bf16: the
// cache is read as stored, and one instruction does the work of two float FMAs and their
// conversions. Queries and softmax weights are rounded to bf16 first, as the module path does.
// Scores: dots[h][t] = q[h] . row[t] over D values (q zero-padded to a multiple of 32), for T
// rows at once. KD is D known at compile time (GLM-4.7-Flash's 576), or 0. With KD the chunk
// loop has a fixed trip count and the compiler keeps all H * T accumulators in registers; two
// rows then share each query load and twice the dot-product chains are in flight, which measured
// 1.7x faster on AVX-512 (the instruction's latency bounds one chain per head). With D known
// only at run time the compiler spills an accumulator array on every chunk, so T stays 1.
template <int H, int T, int KD>
GLMCODE_BF16 void bf16_score_rows(const at::BFloat16* q, int64_t q_stride, const at::BFloat16* rows, int64_t runtime_D,
                                  float* scores, int64_t s_stride) {
  const int64_t D = KD ? KD : runtime_D, chunks = (D + 31) / 32;
  const __mmask32 tail = D % 32 ? (1u << (D % 32)) - 1 : 0xFFFFFFFFu;
  __m512 acc[T][H];
  for (int k = 0; k < T; ++k)
    for (int h = 0; h < H; ++h) acc[k][h] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const __mmask32 mask = c + 1 == chunks ? tail : 0xFFFFFFFFu;
    __m512i r[T];
    for (int k = 0; k < T; ++k) r[k] = _mm512_maskz_loadu_epi16(mask, rows + k * D + c * 32);
    for (int h = 0; h < H; ++h) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + h * q_stride + c * 32);
      for (int k = 0; k < T; ++k) acc[k][h] = _mm512_dpbf16_ps(acc[k][h], qv, (__m512bh)r[k]);
    }
  }
  for (int k = 0; k < T; ++k)
    for (int h = 0; h < H; ++h) scores[h * s_stride + k] = _mm512_reduce_add_ps(acc[k][h]);
}

constexpr int64_t kModelCacheWidth = 576;  // GLM-4.7-Flash's cached values per token: 512 latent + 64 rope

template <int H>
GLMCODE_BF16 void bf16_scores(const at::BFloat16* q, int64_t q_stride, const at::BFloat16* block, int64_t count,
                              int64_t D, float* scores, int64_t s_stride) {
  int64_t t = 0;
  if (D == kModelCacheWidth) {
    constexpr int kRows = H <= 4 ? 4 : 2;  // up to 16 accumulators
    for (; t + kRows <= count; t += kRows)
      bf16_score_rows<H, kRows, kModelCacheWidth>(q, q_stride, block + t * D, D, scores + t, s_stride);
    for (; t < count; ++t) bf16_score_rows<H, 1, kModelCacheWidth>(q, q_stride, block + t * D, D, scores + t, s_stride);
  }
  for (; t < count; ++t) bf16_score_rows<H, 1, 0>(q, q_stride, block + t * D, D, scores + t, s_stride);
}

// out[h] += sum_t p[h][t] * latent[t][:L] for H heads, tokens in pairs: two cache rows
// interleaved by 16-bit unpacks meet one broadcast pair (p[t], p[t+1]). The unpacks permute
// the output dims within each 128-bit lane; `out` keeps that order (see unpermute).
template <int H>
GLMCODE_BF16 void bf16_values(const at::BFloat16* block, int64_t count, int64_t D, int64_t L, const at::BFloat16* p,
                              int64_t p_stride, float* out, LinePrefetch& ahead) {
  for (int64_t i = 0; i < L; i += 32) {
    ahead.step();
    __m512 lo_acc[H], hi_acc[H];
    for (int h = 0; h < H; ++h) {
      lo_acc[h] = _mm512_loadu_ps(out + h * L + i);
      hi_acc[h] = _mm512_loadu_ps(out + h * L + i + 16);
    }
    for (int64_t t = 0; t < count; t += 2) {
      const __m512i a = _mm512_loadu_si512(block + t * D + i);
      const __m512i b = t + 1 < count ? _mm512_loadu_si512(block + (t + 1) * D + i) : _mm512_setzero_si512();
      const __m512i lo = _mm512_unpacklo_epi16(a, b), hi = _mm512_unpackhi_epi16(a, b);
      for (int h = 0; h < H; ++h) {
        int32_t pair;
        std::memcpy(&pair, p + h * p_stride + t, 4);  // p is zero-padded past count
        const __m512bh w = (__m512bh)_mm512_set1_epi32(pair);
        lo_acc[h] = _mm512_dpbf16_ps(lo_acc[h], (__m512bh)lo, w);
        hi_acc[h] = _mm512_dpbf16_ps(hi_acc[h], (__m512bh)hi, w);
      }
    }
    for (int h = 0; h < H; ++h) {
      _mm512_storeu_ps(out + h * L + i, lo_acc[h]);
      _mm512_storeu_ps(out + h * L + i + 16, hi_acc[h]);
    }
  }
}

// bf16_values' order back to natural: in each 32-value chunk, slot 4j+m of the first 16 holds
// value 8j+m and slot 4j+m of the second 16 holds value 8j+4+m.
inline void unpermute(float* out, int64_t L) {
  float tmp[32];
  for (int64_t i = 0; i < L; i += 32) {
    for (int j = 0; j < 4; ++j)
      for (int m = 0; m < 4; ++m) {
        tmp[8 * j + m] = out[i + 4 * j + m];
        tmp[8 * j + 4 + m] = out[i + 16 + 4 * j + m];
      }
    std::copy(tmp, tmp + 32, out + i);
  }
}

GLMCODE_BF16 void to_bf16(const float* in, int64_t n, at::BFloat16* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(in + i)));
  for (; i < n; ++i) out[i] = at::BFloat16(in[i]);
}

// ---- AVX2: attention over a bfloat16 cache in float32 FMAs, for CPUs without VDPBF16PS
//
// All the heads attend over the same cached rows, so both products are small matrix products
// (20 heads by a block of tokens) and are laid out so that the FMAs need no horizontal sums and
// few loads. A bf16 value is the top half of a float: of a 32-bit lane holding two bf16 values,
// a shift left by 16 gives the first as a float and a mask the second. So 16 bf16 values load as
// two float vectors, "even" and "odd", in two integer ops.
//   scores: a piece of 16 cached rows is transposed once into [D][16] (see pack_piece); then for
//           each d one load gives the piece's 16 keys at d, which meet each head's query value
//           at d, broadcast: 2 FMAs a head, no sums across lanes.
//   values: each row's 16 latent values at a time, read as stored, meet each head's weight of
//           that token, broadcast. The even / odd split leaves `out` in its own order (see
//           unpermute_fma).
constexpr int kPiece = 16;     // cached rows scored together (two float vectors)
constexpr int kAvx2Heads = 5;  // heads per pass of both AVX2 kernels: 10 accumulators, and GLM-4.7-Flash's 20 heads in 4

inline __m256 even_bf16(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
inline __m256 odd_bf16(__m256i v) { return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(-65536))); }

inline void transpose8x32(__m256i r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(_mm256_castsi256_ps(r[i]), _mm256_castsi256_ps(r[i + 1]));
    t[i + 1] = _mm256_unpackhi_ps(_mm256_castsi256_ps(r[i]), _mm256_castsi256_ps(r[i + 1]));
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_castps_si256(_mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
    r[i + 4] = _mm256_castps_si256(_mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
  }
}

// rows [16][D] (row t at rows[t], null: zeros) -> packed [D][16]: at each d, 32-bit word j holds
// rows j and j + 8, so even_bf16 gives rows 0-7 and odd_bf16 rows 8-15 as floats.
inline void pack_piece(const at::BFloat16* const rows[kPiece], int64_t D, at::BFloat16* packed) {
  static const at::BFloat16 zeros[16] = {};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    // per 128-bit lane, unpacklo pairs values 0-3 of that lane's 8, unpackhi values 4-7
    __m256i lo[8], hi[8];
    for (int j = 0; j < 8; ++j) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[j] ? rows[j] + d : zeros));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[j + 8] ? rows[j + 8] + d : zeros));
      lo[j] = _mm256_unpacklo_epi16(a, b);
      hi[j] = _mm256_unpackhi_epi16(a, b);
    }
    transpose8x32(lo);  // lo[c]: d + c for c < 4, d + 4 + c after
    transpose8x32(hi);  // hi[c]: d + 4 + c for c < 4, d + 8 + c after
    for (int c = 0; c < 4; ++c) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed + (d + c) * kPiece), lo[c]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed + (d + 8 + c) * kPiece), lo[c + 4]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed + (d + 4 + c) * kPiece), hi[c]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed + (d + 12 + c) * kPiece), hi[c + 4]);
    }
  }
  for (; d < D; ++d)
    for (int j = 0; j < 8; ++j) {
      packed[d * kPiece + 2 * j] = rows[j] ? rows[j][d] : at::BFloat16(0.f);
      packed[d * kPiece + 2 * j + 1] = rows[j + 8] ? rows[j + 8][d] : at::BFloat16(0.f);
    }
}

// acc[h] += w[h] * (the 16 bf16 values in v, as even_bf16 then odd_bf16) for H heads, each
// head's factor w[h * w_stride] broadcast: the step of both products
template <int H>
__attribute__((always_inline)) inline void fma_heads(__m256 (&acc)[H][2], __m256i v, const float* w, int64_t w_stride) {
  const __m256 even = even_bf16(v), odd = odd_bf16(v);
  for (int h = 0; h < H; ++h) {
    const __m256 wv = _mm256_broadcast_ss(w + h * w_stride);
    acc[h][0] = _mm256_fmadd_ps(wv, even, acc[h][0]);
    acc[h][1] = _mm256_fmadd_ps(wv, odd, acc[h][1]);
  }
}

// scores[h][0..16) = q[h] . row for the piece's 16 rows, H heads (q [H][D] float, stride D)
template <int H>
void fma_scores(const float* q, const at::BFloat16* packed, int64_t D, float* scores, int64_t s_stride) {
  __m256 acc[H][2];
  for (int h = 0; h < H; ++h) acc[h][0] = acc[h][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d)
    fma_heads<H>(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + d * kPiece)), q + d, D);
  for (int h = 0; h < H; ++h) {
    _mm256_storeu_ps(scores + h * s_stride, acc[h][0]);
    _mm256_storeu_ps(scores + h * s_stride + 8, acc[h][1]);
  }
}

// out[h] += sum_t p[h][t] * row[t][:L] for H heads, 16 latent values at a time (out in
// unpermute_fma's order)
template <int H>
void fma_values(const at::BFloat16* block, int64_t count, int64_t D, int64_t L, const float* p, int64_t p_stride,
                float* out, LinePrefetch& ahead) {
  for (int64_t i = 0; i < L; i += 16) {
    ahead.step();
    __m256 acc[H][2];
    for (int h = 0; h < H; ++h) {
      acc[h][0] = _mm256_loadu_ps(out + h * L + i);
      acc[h][1] = _mm256_loadu_ps(out + h * L + i + 8);
    }
    for (int64_t t = 0; t < count; ++t)
      fma_heads<H>(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + t * D + i)), p + t, p_stride);
    for (int h = 0; h < H; ++h) {
      _mm256_storeu_ps(out + h * L + i, acc[h][0]);
      _mm256_storeu_ps(out + h * L + i + 8, acc[h][1]);
    }
  }
}

// fma_values' order back to natural: each 16 values hold the even ones, then the odd ones
inline void unpermute_fma(float* out, int64_t L) {
  float tmp[16];
  for (int64_t i = 0; i < L; i += 16) {
    for (int j = 0; j < 8; ++j) {
      tmp[2 * j] = out[i + j];
      tmp[2 * j + 1] = out[i + 8 + j];
    }
    std::copy(tmp, tmp + 16, out + i);
  }
}

// ---- AVX2: attention over an int8 cache in 16-bit integers, for CPUs without VDPBF16PS
//
// VPMADDWD multiplies 16 pairs of int16 and adds each pair into an int32 lane: 16 multiply-adds
// an instruction where a float32 FMA does 8, and Zen 3 issues both twice a cycle. An int8 cache's
// values are exact in int16, so only the other operand of each product is quantized: each head's
// query per part (latent, rope) and each head's weights (probability times the token's latent
// scale) per block, with the most levels that keep every int32 sum in range (int16_levels).
// The loops are those of the float kernels, with VPMADDWD and VPADDD for the FMA:
//   scores: a piece of 16 rows is packed once into [D/2][16][2] (see pack_int8_piece); at each
//           pair of values two loads give the 16 rows' pairs, which meet each head's pair of
//           query values, broadcast.
//   values: 16 latent values of the block's rows at a time are interleaved by pairs of tokens
//           (see pair_latents) and read from L1 by every group of kAvx2Heads heads.
// The most levels of an int16 operand that meets `terms` int8 values in one int32 sum
inline float int16_levels(int64_t terms) { return std::min(32767.f, std::floor(2147483647.f / (127.f * terms))); }

// acc[h] += the pairs of a and b, each times head h's pair w[h * w_stride], summed into int32
// lanes, for H heads: the step of both products
template <int H>
__attribute__((always_inline)) inline void madd_heads(__m256i (&acc)[H][2], __m256i a, __m256i b, const int16_t* w,
                                                      int64_t w_stride) {
  for (int h = 0; h < H; ++h) {
    const __m256i x = pair_of(w + h * w_stride);
    acc[h][0] = _mm256_add_epi32(acc[h][0], _mm256_madd_epi16(x, a));
    acc[h][1] = _mm256_add_epi32(acc[h][1], _mm256_madd_epi16(x, b));
  }
}

// rows [16][D] int8 (null: zeros) -> packed [D/2][16][2] int16: at each pair of values, 32-bit
// word t holds row t's pair
inline void pack_int8_piece(const int8_t* const rows[kPiece], int64_t D, int16_t* packed) {
  static const int8_t zeros[16] = {};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16)
    for (int half = 0; half < 2; ++half) {
      __m256i r[8];  // r[j]: pairs d / 2 .. d / 2 + 7 of row 8 * half + j
      for (int j = 0; j < 8; ++j) {
        const int8_t* row = rows[8 * half + j];
        r[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row ? row + d : zeros)));
      }
      transpose8x32(r);  // r[c]: pair d / 2 + c of the 8 rows
      for (int c = 0; c < 8; ++c) _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed + d * 16 + c * 32 + half * 16), r[c]);
    }
  for (; d < D; ++d)
    for (int t = 0; t < kPiece; ++t) packed[(d / 2) * 32 + t * 2 + d % 2] = rows[t] ? rows[t][d] : 0;
}

// scores[h][0..16) = the H heads' queries (int16 [H][D], scales [H][2]: latent, rope) dotted with
// the packed piece's 16 rows (their scales [2][16]: latent, rope)
template <int H>
void int8_scores(const int16_t* q, const float* q_scales, const int16_t* packed, int64_t D, int64_t L,
                 const float* row_scales, float* scores, int64_t s_stride) {
  for (int part = 0; part < 2; ++part) {  // in int32 sums of their own: the parts' scales differ
    __m256i acc[H][2];
    for (int h = 0; h < H; ++h) acc[h][0] = acc[h][1] = _mm256_setzero_si256();
    for (int64_t d = part ? L : 0; d < (part ? D : L); d += 2)
      madd_heads<H>(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + d * 16)),
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + d * 16 + 16)), q + d, D);
    for (int h = 0; h < H; ++h)
      for (int k = 0; k < 2; ++k) {
        const __m256 scale = _mm256_mul_ps(_mm256_loadu_ps(row_scales + part * 16 + 8 * k), _mm256_set1_ps(q_scales[2 * h + part]));
        float* dst = scores + h * s_stride + 8 * k;
        const __m256 before = part ? _mm256_loadu_ps(dst) : _mm256_setzero_ps();
        _mm256_storeu_ps(dst, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[h][k]), scale, before));
      }
  }
}

// latent values [i, i + 16) of a block's `count` rows, interleaved by pairs of tokens into
// [count / 2 rounded up][16][2] (values 0-7 of the pair, then 8-15; a zero row pairs an odd last one)
inline void pair_latents(const int8_t* block, int64_t count, int64_t D, int64_t i, int16_t* paired) {
  for (int64_t t = 0; t < count; t += 2) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + t * D + i));
    const __m128i b = t + 1 < count ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + (t + 1) * D + i))
                                    : _mm_setzero_si128();
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(paired + t * 16), _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a, b)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(paired + t * 16 + 16), _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(a, b)));
  }
}

// out[h][0..16) += w_scales[h] * sum_t w[h][t] * latent[t] for H heads (w int16 [H][w_stride],
// zero-padded to an even count; out stride L), over a block's paired latents
template <int H>
void int8_values(const int16_t* paired, int64_t count, const int16_t* w, int64_t w_stride, const float* w_scales,
                 float* out, int64_t L) {
  __m256i acc[H][2];
  for (int h = 0; h < H; ++h) acc[h][0] = acc[h][1] = _mm256_setzero_si256();
  for (int64_t t = 0; t < count; t += 2)
    madd_heads<H>(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(paired + t * 16)),
                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(paired + t * 16 + 16)), w + t, w_stride);
  for (int h = 0; h < H; ++h)
    for (int k = 0; k < 2; ++k) {
      float* dst = out + h * L + 8 * k;
      _mm256_storeu_ps(dst, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[h][k]), _mm256_set1_ps(w_scales[h]), _mm256_loadu_ps(dst)));
    }
}

// ---- AMX: attention as tile products (TDPBF16PS: a 16x32 by 32x16 bf16 product per instruction)

#define GLMCODE_AMX __attribute__((target("avx512f,avx512bw,avx512bf16,amx-tile,amx-bf16")))

// The heads of one attend_amx call, in the two groups that the tiles hold (a tile has at most
// 16 rows and 16 float columns): up to 32 heads share each pass over the cache.
struct HeadGroups {
  int64_t n0, n1;  // heads in group 0 and group 1 (n1 may be 0)
  explicit HeadGroups(int64_t n) : n0(std::min<int64_t>(n, 16)), n1(n - std::min<int64_t>(n, 16)) {}
};

// Scores phase tiles: 0 and 3 scores [16 tokens x heads] f32 (group 0, group 1), 1 cache rows
// [16 tokens x 32 values] bf16, 2 and 4 queries as pairs [16 value pairs x heads].
GLMCODE_AMX TileConfig score_tiles(HeadGroups g) {
  TileConfig config;
  const uint16_t bytes[5] = {static_cast<uint16_t>(g.n0 * 4), 64, static_cast<uint16_t>(g.n0 * 4),
                             static_cast<uint16_t>(g.n1 * 4), static_cast<uint16_t>(g.n1 * 4)};
  const uint8_t rows[5] = {16, 16, 16, static_cast<uint8_t>(g.n1 ? 16 : 0), static_cast<uint8_t>(g.n1 ? 16 : 0)};
  for (int i = 0; i < 5; ++i) config.bytes_per_row[i] = bytes[i], config.rows[i] = rows[i];
  return config;
}

// Values phase tiles: 0 and 3 outputs [heads x 16 latent values] f32, 1 and 4 weights
// [heads x 32 tokens] bf16, 2 cache values as pairs [16 token pairs x 16 values].
GLMCODE_AMX TileConfig value_tiles(HeadGroups g) {
  TileConfig config;
  const uint8_t rows[5] = {static_cast<uint8_t>(g.n0), static_cast<uint8_t>(g.n0), 16, static_cast<uint8_t>(g.n1),
                           static_cast<uint8_t>(g.n1)};
  for (int i = 0; i < 5; ++i) config.bytes_per_row[i] = rows[i] ? 64 : 0, config.rows[i] = rows[i];
  return config;
}

// Queries [n][D] (float, scale applied, n <= 16) to the pair layout of tiles 2 and 4, one 16-line
// block per 32 values, each line padded to 64 bytes so that it starts a cache line:
// pairs[c][k][h] = (q[h][32c + 2k], q[h][32c + 2k + 1]).
constexpr int64_t kPairLine = 32;  // bf16 per line of a query-pair tile
GLMCODE_AMX void query_pairs(const float* q, int64_t n, int64_t D, at::BFloat16* pairs) {
  for (int64_t c = 0; c < D / 32; ++c)
    for (int64_t k = 0; k < 16; ++k)
      for (int64_t h = 0; h < n; ++h)
        for (int64_t e = 0; e < 2; ++e)
          pairs[(c * 16 + k) * kPairLine + h * 2 + e] = at::BFloat16(q[h * D + c * 32 + 2 * k + e]);
}

// scores[h][t] = q[h] . row[t] for the block's first `count` tokens (count rounded up to 16
// rows are read: block sizes are multiples of 16, so they stay inside the block). pairs0 and
// pairs1 are the query_pairs of the two head groups.
GLMCODE_AMX void amx_scores(const at::BFloat16* block, int64_t count, int64_t D, HeadGroups g, const at::BFloat16* pairs0,
                            const at::BFloat16* pairs1, float* scores, int64_t s_stride) {
  alignas(64) float tile[16 * 16];
  auto scatter = [&](int64_t t, int64_t n, float* dst) {
    for (int64_t r = 0; r < std::min<int64_t>(16, count - t); ++r)
      for (int64_t h = 0; h < n; ++h) dst[h * s_stride + t + r] = tile[r * 16 + h];
  };
  for (int64_t t = 0; t < count; t += 16) {
    _tile_zero(0);
    if (g.n1) _tile_zero(3);
    for (int64_t c = 0; c < D / 32; ++c) {
      _tile_loadd(1, block + t * D + c * 32, D * 2);
      _tile_loadd(2, pairs0 + c * 16 * kPairLine, 64);
      _tile_dpbf16ps(0, 1, 2);
      if (g.n1) {
        _tile_loadd(4, pairs1 + c * 16 * kPairLine, 64);
        _tile_dpbf16ps(3, 1, 4);
      }
    }
    _tile_stored(0, tile, 64);
    scatter(t, g.n0, scores);
    if (g.n1) {
      _tile_stored(3, tile, 64);
      scatter(t, g.n1, scores + g.n0 * s_stride);
    }
  }
}

// Attention reads cache blocks through one of these. Bf16Blocks: the bfloat16 cache as stored.
// Int8Blocks: an int8 block (two scales per token, see quant/latent_cache.py) dequantized into a
// bfloat16 scratch block that stays in L2, so the bf16 kernels run on it unchanged while memory
// traffic halves. int8 values are exact in bf16; value times scale is rounded once, to bf16.
struct Bf16Blocks {
  const at::BFloat16* cache;
  int64_t block_size, D;

  int64_t row_bytes() const { return D * 2; }
  const at::BFloat16* rows(int64_t id, int64_t) { return cache + id * block_size * D; }
};

struct Int8Blocks {
  const int8_t* cache;
  const float* scales;  // [slots, 2]: latent part, rope part
  int64_t block_size, D, L;
  AlignedVector<at::BFloat16> scratch;

  Int8Blocks(const int8_t* cache, const float* scales, int64_t block_size, int64_t D, int64_t L)
      : cache(cache), scales(scales), block_size(block_size), D(D), L(L), scratch(block_size * D, at::BFloat16(0.f)) {}

  int64_t row_bytes() const { return D; }

  GLMCODE_BF16 const at::BFloat16* rows(int64_t id, int64_t count) {
    for (int64_t t = 0; t < count; ++t) {
      const int64_t slot = id * block_size + t;
      const int8_t* v = cache + slot * D;
      at::BFloat16* out = scratch.data() + t * D;
      const float latent_scale = scales[2 * slot], rope_scale = scales[2 * slot + 1];
      int64_t i = 0;
      for (; i + 16 <= D; i += 16) {
        const float scale = i + 16 <= L ? latent_scale : rope_scale;  // L is a multiple of 32
        const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + i))));
        const __m256bh b = _mm512_cvtneps_pbh(_mm512_mul_ps(f, _mm512_set1_ps(scale)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), reinterpret_cast<const __m256i&>(b));
      }
      for (; i < D; ++i) out[i] = at::BFloat16(static_cast<float>(v[i]) * (i < L ? latent_scale : rope_scale));
    }
    return scratch.data();
  }
};

// out[h][:L] += sum_t p[h][t] * latent[t] over the block's first `count` tokens; p is bf16
// [n][p_stride], zero from count up to the next multiple of 32. Each 16 latent values of 32
// tokens are interleaved into pairs once, for both head groups.
GLMCODE_AMX void amx_values(const at::BFloat16* block, int64_t count, int64_t D, int64_t L, const at::BFloat16* p,
                            int64_t p_stride, HeadGroups g, float* out, LinePrefetch& ahead) {
  alignas(64) at::BFloat16 pairs[16 * 32];
  alignas(64) float tile[16 * 16];
  // word 2i of the result is a[i], word 2i + 1 is b[i]: two tokens' values interleaved
  alignas(64) int16_t order[32];
  for (int i = 0; i < 16; ++i) {
    order[2 * i] = static_cast<int16_t>(i);
    order[2 * i + 1] = static_cast<int16_t>(32 + i);
  }
  const __m512i interleave = _mm512_load_si512(order);
  auto add_out = [&](int64_t h0, int64_t n, int64_t d) {
    for (int64_t h = 0; h < n; ++h)
      for (int64_t i = 0; i < 16; ++i) out[(h0 + h) * L + d + i] += tile[h * 16 + i];
  };
  for (int64_t d = 0; d < L; d += 16) {
    _tile_zero(0);
    if (g.n1) _tile_zero(3);
    for (int64_t t = 0; t < count; t += 32) {
      for (int64_t k = 0; k < 16; ++k) {
        const int64_t first = t + 2 * k;
        const __m512i a = first < count ? _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + first * D + d)))
                                        : _mm512_setzero_si512();
        const __m512i b = first + 1 < count ? _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + (first + 1) * D + d)))
                                            : _mm512_setzero_si512();
        _mm512_store_si512(pairs + k * 32, _mm512_permutex2var_epi16(a, interleave, b));
      }
      ahead.step();
      _tile_loadd(2, pairs, 64);
      _tile_loadd(1, p + t, p_stride * 2);
      _tile_dpbf16ps(0, 1, 2);
      if (g.n1) {
        _tile_loadd(4, p + g.n0 * p_stride + t, p_stride * 2);
        _tile_dpbf16ps(3, 4, 2);
      }
    }
    _tile_stored(0, tile, 64);
    add_out(0, g.n0, d);
    if (g.n1) {
      _tile_stored(3, tile, 64);
      add_out(g.n0, g.n1, d);
    }
  }
}

// Softmax attention over a context taken block by block: each block's scores are exponentiated
// against the running max of their head, and what was accumulated before is rescaled whenever
// that max grows. `out` [heads][width] accumulates the weighted values.
class OnlineSoftmax {
 public:
  OnlineSoftmax(int64_t heads, int64_t width, float* out)
      : heads_(heads), width_(width), out_(out), max_(heads, -std::numeric_limits<float>::infinity()), mass_(heads, 0.f) {
    std::fill(out, out + heads * width, 0.f);
  }

  // scores [heads][stride], the first `count` of each row valid: exponentiated in place
  void block(float* scores, int64_t stride, int64_t count) {
    for (int64_t h = 0; h < heads_; ++h) {
      float* row = scores + h * stride;
      const float new_max = std::max(max_[h], *std::max_element(row, row + count));
      const float correction = std::exp(max_[h] - new_max);
      mass_[h] = mass_[h] * correction + exp_shifted(row, count, new_max);
      max_[h] = new_max;
      if (correction != 1.f)
        for (int64_t i = 0; i < width_; ++i) out_[h * width_ + i] *= correction;
    }
  }

  // Normalizes out, or, for a part of a context (max and mass given), leaves it as it is and
  // saves each head's running max and mass for merging (see DecodePlan::merge_parts).
  void end(float* max, float* mass) {
    if (max != nullptr) {
      std::copy(max_.begin(), max_.end(), max);
      std::copy(mass_.begin(), mass_.end(), mass);
      return;
    }
    for (int64_t h = 0; h < heads_; ++h)
      for (int64_t i = 0; i < width_; ++i) out_[h * width_ + i] /= mass_[h];
  }

 private:
  int64_t heads_, width_;
  float* out_;
  std::vector<float> max_, mass_;
};

}  // namespace
}  // namespace glmcode_cpu
