// Kernels shared by the quantized matmul ops (cpu_quant.cpp), the many-row products on AMX
// (cpu_prefill.cpp) and the fused decode step (cpu_decode.cpp): int8 activation quantization,
// one 16-row weight tile of an int4 / int8 matrix-vector product (AVX-512 VNNI or AVX2), and what the
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
#include <optional>
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

// f(static_cast<T*>(nullptr)) with T the tensor's dtype, float or bfloat16.
template <typename F>
void dispatch_float_types(const at::Tensor& t, const char* name, F f) {
  if (t.scalar_type() == at::kBFloat16) return f(static_cast<at::BFloat16*>(nullptr));
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected float32 or bfloat16, got ", t.scalar_type());
  f(static_cast<float*>(nullptr));
}

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

// x[0..n) as int16 at max_level, into dst; returns the scale. (8 at a time, then one by one: the
// same bits either way, as the conversion rounds to nearest even like nearbyint.)
inline float quantize_row(const float* x, int64_t n, float max_level, int16_t* dst) {
  const int64_t vector_end = n / 8 * 8;
  __m256 largest = _mm256_setzero_ps();
  for (int64_t i = 0; i < vector_end; i += 8) largest = _mm256_max_ps(largest, _mm256_andnot_ps(_mm256_set1_ps(-0.f), _mm256_loadu_ps(x + i)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, largest);
  float top = *std::max_element(lanes, lanes + 8);
  for (int64_t i = vector_end; i < n; ++i) top = std::max(top, std::abs(x[i]));
  const float inv = top > 0.f ? max_level / top : 0.f;
  for (int64_t i = 0; i < vector_end; i += 8) {
    const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(inv)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)));
  }
  for (int64_t i = vector_end; i < n; ++i) dst[i] = static_cast<int16_t>(std::nearbyint(x[i] * inv));
  return top / max_level;
}

// Two int16 values (one 32-bit word) in every lane: the broadcast operand of VPMADDWD.
inline __m256i pair_of(const int16_t* p) {
  int32_t word;
  std::memcpy(&word, p, 4);
  return _mm256_set1_epi32(word);
}

// fn(rows, m) over M activation rows in blocks of Block, then one block of what is left
// (rows: a std::integral_constant, the kernels' template argument).
template <int Block = kMaxRows, typename Fn>
void for_row_blocks(int64_t M, Fn fn) {
  static_assert(Block >= 1 && Block <= 4, "blocks of 1 to 4 rows");
  int64_t m = 0;
  for (; m + Block <= M; m += Block) fn(std::integral_constant<int, Block>{}, m);
  const int64_t left = M - m;
  if constexpr (Block > 3) if (left == 3) fn(std::integral_constant<int, 3>{}, m);
  if constexpr (Block > 2) if (left == 2) fn(std::integral_constant<int, 2>{}, m);
  if constexpr (Block > 1) if (left == 1) fn(std::integral_constant<int, 1>{}, m);
}

// The kernels written in one instruction set: AVX-512 (with VNNI) where the extension is built
// for it, else AVX2 (kernels.py builds one or the other for the CPU it runs on).
#if defined(__AVX512F__)
#include "cpu_kernels_avx512.h"
#else
#include "cpu_kernels_avx2.h"
#endif

// Output tile `tile` of M activation rows from m0 (row m0 + r to y + r * ldy), any M.
template <typename Out>
void int4_rows(const uint8_t* w, const at::BFloat16* scales, const at::BFloat16* zeros, const QuantizedRows& x,
               int64_t m0, int64_t M, int64_t K, int64_t group, Out* y, int64_t ldy, int64_t tile) {
#if !defined(__AVX512F__)
  if (M >= 2 * kMaxRows) return int4_tile_group_major(w, scales, zeros, x, m0, M, K, group, y, ldy, tile);
#endif
  for_row_blocks(M, [&](auto rows, int64_t m) {
    int4_tile<decltype(rows)::value>(w, scales, zeros, x, m0 + m, K, group, y + m * ldy, ldy, tile);
  });
}

// float and bfloat16 activations take the vector form of the quantization
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


// ---- cpu_prefill.cpp: products of many rows on AMX-INT8 tiles

// Whether the CPU has AMX-INT8, this process may use it, and it was not turned off.
bool amx_products_enabled();
// Whether a product of `rows` rows over `in` inputs in groups of `group` runs on AMX.
bool amx_products_apply(int64_t rows, int64_t in, int64_t group);
// y [heads, M, N] (or [M, N] for heads = 1) = x [heads * M, K] @ w[h].T for int4 (bits 4:
// scales, zeros) or int8 (bits 8: scales, sums) weights in the tile layout, stacked per head.
at::Tensor amx_linear(const at::Tensor& x, int bits, int64_t heads, const at::Tensor& packed, const at::Tensor& scales,
                      const at::Tensor& zeros_or_sums, int64_t group);

// ---- latent_attention: cpu_attention.cpp (AMX-BF16) and cpu_attention_avx2.cpp (AVX2)

// Its arguments (see cpu_attention.cpp), checked: D and L multiples of `multiple`.
struct LatentAttentionArgs {
  int64_t L, D, t, R, S;
  at::Tensor limits, slots;             // contiguous
  const float* int8_scales = nullptr;   // [slots, 2] of an int8 cache; null for bf16
};

inline LatentAttentionArgs check_latent_attention(const at::Tensor& q_latent, const at::Tensor& q_rope,
                                                  const at::Tensor& limits, const at::Tensor& cache,
                                                  const std::optional<at::Tensor>& scales,
                                                  const at::Tensor& context_slots, const at::Tensor& out,
                                                  int64_t multiple) {
  TORCH_CHECK(q_latent.dim() == 3 && q_rope.dim() == 3 && out.dim() == 3 && q_latent.size(0) == q_rope.size(0) &&
                  q_latent.size(1) == q_rope.size(1) && out.sizes() == q_latent.sizes(),
              "latent_attention: q_latent and out [H, t, L], q_rope [H, t, D - L]");
  TORCH_CHECK(q_latent.stride(2) == 1 && q_rope.stride(2) == 1 && out.stride(2) == 1,
              "latent_attention: rows must be contiguous");
  TORCH_CHECK(q_latent.scalar_type() == q_rope.scalar_type() &&
                  (q_latent.scalar_type() == at::kBFloat16 || q_latent.scalar_type() == at::kFloat) &&
                  (out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kFloat),
              "latent_attention: queries and out must be bf16 or float32");
  LatentAttentionArgs a;
  a.L = q_latent.size(2), a.D = a.L + q_rope.size(2), a.t = q_latent.size(1), a.R = q_latent.size(0) * a.t;
  a.S = context_slots.size(0);
  TORCH_CHECK(a.D % multiple == 0 && a.L % multiple == 0 && cache.dim() == 2 && cache.size(1) == a.D &&
                  cache.is_contiguous(),
              "latent_attention: cache must be contiguous [slots, D], D and L multiples of ", multiple);
  TORCH_CHECK(limits.scalar_type() == at::kLong && limits.numel() == a.R && context_slots.scalar_type() == at::kLong,
              "latent_attention: limits [H * t] and context_slots [S] must be int64");
  a.limits = limits.contiguous(), a.slots = context_slots.contiguous();
  TORCH_CHECK(a.R == 0 || (a.limits.min().item<int64_t>() >= 0 && a.limits.max().item<int64_t>() < a.S),
              "latent_attention: a row's limit is outside the context");
  if (cache.scalar_type() != at::kBFloat16) {
    TORCH_CHECK(cache.scalar_type() == at::kChar && scales && scales->scalar_type() == at::kFloat && scales->is_contiguous(),
                "latent_attention: the cache must be bf16, or int8 with float32 scales [slots, 2]");
    a.int8_scales = scales->data_ptr<float>();
  }
  return a;
}

}  // namespace glmcode_cpu
