// Kernels shared by the quantized matmul ops (cpu_quant.cpp), the many-row products on AMX
// (cpu_prefill.cpp) and the fused decode step (cpu_decode.cpp): int8 activation quantization,
// one 16-row weight tile of an int4 / int8 matrix-vector product on AVX-512 VNNI, and what the
// AMX code needs to know about the CPU. The weight layouts are described in cpu_quant.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

namespace glmcode_cpu {

constexpr int kTile = 16;
constexpr int kMaxRows = 4;  // activation rows sharing one pass over a weight tile
constexpr int64_t kAmxMinRows = 8;  // products of at least this many rows run on AMX tiles
// Weights stream from memory once per token: prefetching this far ahead keeps enough cache-line
// requests in flight for one core to approach its memory bandwidth (the hardware prefetcher
// alone stops at page boundaries).
constexpr int64_t kPrefetchBytes = 3072;

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0); }

// Storage for what AMX tiles load and store. malloc aligns to 16 bytes only, and a tile line that
// straddles two cache lines makes the whole load several times slower (a 1 KB tile from L1:
// 3.7 ns aligned, 22 ns 16 bytes off, measured on Sapphire Rapids).
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, size_t) { ::operator delete(p, kAlign); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
};
template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

struct QuantizedRows {
  AlignedVector<int8_t> values;  // [M, K]
  std::vector<float> scales;   // [M, G]
  std::vector<int32_t> sums;   // [M, G]
};

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

// ---- AMX

// The tile registers' shapes (the LDTILECFG operand, palette 1).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// All eight tile registers as 16 rows of 64 bytes (the shape of every tile product in the
// many-row kernels), and their release.
__attribute__((target("amx-tile"))) inline void configure_square_tiles() {
  TileConfig config;
  for (int i = 0; i < 8; ++i) config.rows[i] = 16, config.bytes_per_row[i] = 64;
  // GCC's _tile_loadconfig tells the compiler it reads 8 bytes: without this barrier the stores
  // above are dropped as dead.
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

__attribute__((target("amx-tile"))) inline void release_tiles() { _tile_release(); }

// Which AMX units this CPU has that the kernel lets this process use (the tile registers must
// be requested once per process).
struct AmxSupport {
  bool bf16 = false, int8 = false;
};

inline const AmxSupport& amx_support() {
  static const AmxSupport support = [] {
    AmxSupport s;
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 24))) return s;  // AMX-TILE
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    if (syscall(SYS_arch_prctl, kRequestPermission, kTileData) != 0) return s;
    s.bf16 = edx & (1u << 22);
    s.int8 = edx & (1u << 25);
    return s;
  }();
  return support;
}

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

template <>
inline int32_t quantize_group<float>(const float* src, int64_t group, bool biased, int8_t* dst, float* scale_out) {
  return quantize_group_vector(src, group, biased, dst, scale_out);
}

template <>
inline int32_t quantize_group<at::BFloat16>(const at::BFloat16* src, int64_t group, bool biased, int8_t* dst,
                                            float* scale_out) {
  return quantize_group_vector(src, group, biased, dst, scale_out);
}

// Rows of x [M, K] to int8, one scale and sum per group of `group` inputs, into values [M, K],
// scales and sums [M, K / group].
template <typename T>
void quantize_rows_into(const T* x, int64_t M, int64_t K, int64_t group, bool biased, int8_t* values, float* scales,
                        int32_t* sums) {
  const int64_t G = K / group;
  at::parallel_for(0, M * G, 64, [&](int64_t begin, int64_t end) {
    for (int64_t mg = begin; mg < end; ++mg) {
      const int64_t offset = (mg / G) * K + (mg % G) * group;
      sums[mg] = quantize_group(x + offset, group, biased, values + offset, &scales[mg]);
    }
  });
}

// The same into `out`, sized for padded_rows >= M rows (AMX reads whole blocks of 16; rows past
// M are zero).
template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int64_t group, QuantizedRows& out, bool biased = false,
                   int64_t padded_rows = 0) {
  const int64_t G = K / group, rows = std::max(M, padded_rows);
  out.values.assign(rows * K, 0);
  out.scales.assign(rows * G, 0.f);
  out.sums.assign(rows * G, 0);
  quantize_rows_into(x, M, K, group, biased, out.values.data(), out.scales.data(), out.sums.data());
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


// ---- cpu_prefill.cpp: products of many rows on AMX-INT8 tiles

// Whether the CPU has AMX-INT8, this process may use it, and it was not turned off.
bool amx_products_enabled();
// Whether a product of `rows` rows over `in` inputs in groups of `group` runs on AMX.
bool amx_products_apply(int64_t rows, int64_t in, int64_t group);
// y [heads, M, N] (or [M, N] for heads = 1) = x [heads * M, K] @ w[h].T for int4 (bits 4:
// scales, zeros) or int8 (bits 8: scales, sums) weights in the tile layout, stacked per head.
at::Tensor amx_linear(const at::Tensor& x, int bits, int64_t heads, const at::Tensor& packed, const at::Tensor& scales,
                      const at::Tensor& zeros_or_sums, int64_t group);

}  // namespace glmcode_cpu
