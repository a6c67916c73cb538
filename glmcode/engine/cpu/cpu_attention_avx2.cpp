// Absorbed MLA attention of a prefill chunk over the paged latent cache, on AVX2, in 16-bit
// fixed point: the AVX2 form's latent_attention (cpu_attention.cpp is the AMX-BF16 one; the same
// op, the same arguments).
//
// AVX2 has no bf16 products. VPMADDWD does 16 multiply-adds an instruction (int16 x int16, pairs
// summed into int32) where a float32 FMA does 8, and Zen 3 issues both twice a cycle (measured on
// an EPYC Milan core: 6.4 of either a ns; 5.1 VPMADDWD a ns with the VPADDD that accumulates).
// Part of the gain over torch's float32 matmuls (1.2-1.4x) is the one pass that keeps the scores
// in L1 and the operands at half the bytes. Both products of
// attention run on it, each operand quantized with a scale per row:
//
// - scores: the queries (times the softmax scale) at 12 bits and sign, the cached keys at 13 (a
//   bf16 cache has 8 significant bits), or an int8 cache's own values and the queries at 14.
// - values: the probabilities times each key's latent scale at 13 bits, per row and piece of 64
//   keys (so a piece of small probabilities keeps its own precision), the latents at 12, or an
//   int8 cache's own values and the weights at 15.
// A lane sums 64 products in int32 before they go to float (the bounds at Levels). Over random
// data the result is within 1e-3 of float64 over a bf16 cache, 2e-4 over an int8 one.
//
// In the style of flash attention, without a score matrix: the context is packed once per call
// (keys as 8 keys x one pair of values a register, latents as one pair of keys x 8 values a
// register), each thread takes groups of 64 query rows and walks the keys in pieces of 64 with
// an online softmax in float32; a piece (72 KB of keys, 64 KB of latents) stays in L2 while the
// group's 16 blocks of 4 rows use it. Row r attends the context positions 0..limits[r].
#include "cpu_kernels.h"

#include <torch/library.h>

#include <atomic>
#include <limits>
#include <type_traits>

namespace glmcode_cpu {
namespace {

constexpr int64_t kRows = 4;          // query rows per block
constexpr int64_t kGroupRows = 64;    // rows that share each piece of keys while it is in L2
constexpr int64_t kPiece = 64;        // keys per softmax step (and per int32 sum of the values)
constexpr int64_t kChunk = 64;        // values per int32 sum of a score
// The levels (a row's largest magnitude) of each operand, so that no int32 lane overflows. A
// score lane sums 64 products, at most 64 * 4095 * 8191 over a bf16 cache; a value lane sums a
// piece of 64 keys, at most 64 * 8191 * 4095. An int8 cache's values are at most 127, so the
// queries and weights meeting them get more bits.
struct Levels {
  float query, key, weight, latent;
};
constexpr Levels kOverBf16{4095.f, 8191.f, 8191.f, 4095.f};
constexpr Levels kOverInt8{16383.f, 127.f, 32767.f, 127.f};

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// The context, quantized and in the two layouts the products read. keys: [S/8][D/2][8 keys][2];
// latents: [L/16][S/2][16 values][2] (a key pair's 16 values of one block of 16, as two
// registers of 8 values x 2 keys). S is padded to whole pieces with zeros.
struct PackedContext {
  int64_t S = 0, D = 0, L = 0;
  AlignedVector<int16_t> keys, latents;
  std::vector<float> latent_scale, rope_scale, value_scale;  // per key
  Levels levels = kOverBf16;

  const int16_t* key_group(int64_t key) const { return keys.data() + (key / 8) * D * 8; }
  const int16_t* latent_block(int64_t block, int64_t key) const { return latents.data() + (block * S + key) * 16; }
};

void pack_context(const at::Tensor& cache, const float* int8_scales, const int64_t* slots, int64_t S, int64_t L,
                  PackedContext& ctx) {
  const int64_t D = cache.size(1), Sp = round_up(std::max<int64_t>(S, 1), kPiece);
  ctx.S = Sp, ctx.D = D, ctx.L = L;
  const bool int8 = cache.scalar_type() == at::kChar;
  ctx.levels = int8 ? kOverInt8 : kOverBf16;
  ctx.keys.assign(Sp * D, 0);
  ctx.latents.assign(Sp * L, 0);
  ctx.latent_scale.assign(Sp, 0.f), ctx.rope_scale.assign(Sp, 0.f), ctx.value_scale.assign(Sp, 0.f);
  at::parallel_for(0, S, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    std::vector<int16_t> latent(L), quantized(D);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t slot = slots[k];
      int16_t* key = ctx.keys.data() + (k / 8) * D * 8 + (k % 8) * 2;  // value d at (d / 2) * 16 + d % 2
      auto put_key = [&](int64_t d, int16_t v) { key[(d / 2) * 16 + d % 2] = v; };
      if (int8) {
        const int8_t* v = cache.data_ptr<int8_t>() + slot * D;
        for (int64_t d = 0; d < D; ++d) put_key(d, v[d]);
        for (int64_t d = 0; d < L; ++d) latent[d] = v[d];
        ctx.latent_scale[k] = ctx.value_scale[k] = int8_scales[2 * slot];
        ctx.rope_scale[k] = int8_scales[2 * slot + 1];
      } else {
        const at::BFloat16* v = cache.data_ptr<at::BFloat16>() + slot * D;
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(v[d]);
        ctx.latent_scale[k] = quantize_row(row.data(), L, kOverBf16.key, quantized.data());
        ctx.rope_scale[k] = quantize_row(row.data() + L, D - L, kOverBf16.key, quantized.data() + L);
        for (int64_t d = 0; d < D; ++d) put_key(d, quantized[d]);
        ctx.value_scale[k] = quantize_row(row.data(), L, kOverBf16.latent, latent.data());
      }
      for (int64_t d = 0; d < L; ++d) {  // block d / 16; within the key pair: value d % 8 of register (d % 16) / 8
        int16_t* dst = ctx.latents.data() + ((d / 16) * Sp + k - k % 2) * 16;
        dst[((d % 16) / 8) * 16 + (d % 8) * 2 + k % 2] = latent[d];
      }
    }
  });
}

// What one thread keeps for its group of rows.
struct GroupState {
  AlignedVector<int16_t> q;                 // [kGroupRows][D]
  std::vector<float> q_latent_scale, q_rope_scale;
  AlignedVector<float> out;                 // [kGroupRows][L] float32, unnormalized
  std::vector<float> max, mass;             // running max score and softmax mass per row
  alignas(32) float scores[kGroupRows][kPiece];
  alignas(32) int16_t weights[kGroupRows][kPiece];
  float weight_scale[kGroupRows], alpha[kGroupRows];
};

// acc[r][j] = the int32 dots of `pairs` pairs: row r's pair p (rows + r * row_stride + 2p) times
// the 8 lanes of a + p * step (j = 0) or b + p * step (j = 1), for a block's 4 rows: the step of
// both products. Out of line and with named accumulators, so that the 8 of them have the
// registers to themselves: one spilled to the stack makes the loop wait on a store each pass,
// and with an array GCC copies each sum from register to register every pass.
__attribute__((noinline)) void pair_dots(const int16_t* rows, int64_t row_stride, const int16_t* a, const int16_t* b,
                                         int64_t step, int64_t pairs, __m256i (*acc)[2]) {
  static_assert(kRows == 4, "pair_dots takes 4 rows");
  __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
  for (int64_t p = 0; p < pairs; ++p, a += step, b += step, rows += 2) {
    const __m256i k_a = _mm256_load_si256(reinterpret_cast<const __m256i*>(a));
    const __m256i k_b = _mm256_load_si256(reinterpret_cast<const __m256i*>(b));
    __m256i x = pair_of(rows);
    a00 = _mm256_add_epi32(a00, _mm256_madd_epi16(x, k_a)), a01 = _mm256_add_epi32(a01, _mm256_madd_epi16(x, k_b));
    x = pair_of(rows + row_stride);
    a10 = _mm256_add_epi32(a10, _mm256_madd_epi16(x, k_a)), a11 = _mm256_add_epi32(a11, _mm256_madd_epi16(x, k_b));
    x = pair_of(rows + 2 * row_stride);
    a20 = _mm256_add_epi32(a20, _mm256_madd_epi16(x, k_a)), a21 = _mm256_add_epi32(a21, _mm256_madd_epi16(x, k_b));
    x = pair_of(rows + 3 * row_stride);
    a30 = _mm256_add_epi32(a30, _mm256_madd_epi16(x, k_a)), a31 = _mm256_add_epi32(a31, _mm256_madd_epi16(x, k_b));
  }
  acc[0][0] = a00, acc[0][1] = a01, acc[1][0] = a10, acc[1][1] = a11;
  acc[2][0] = a20, acc[2][1] = a21, acc[3][0] = a30, acc[3][1] = a31;
}

// scores[r][column..+16) for the block's 4 rows (q, stride D) and keys k0..k0+15.
void block_scores(const int16_t* q, const float* q_latent_scale, const float* q_rope_scale, const PackedContext& ctx,
                  int64_t k0, float (*scores)[kPiece], int64_t column) {
  const int64_t D = ctx.D, L = ctx.L;
  const int16_t* g0 = ctx.key_group(k0);
  const int16_t* g1 = ctx.key_group(k0 + 8);
  __m256 total[kRows][2];
  for (int r = 0; r < kRows; ++r) total[r][0] = total[r][1] = _mm256_setzero_ps();
  for (int64_t c0 = 0; c0 < D; c0 += kChunk) {
    const int64_t c1 = std::min(c0 + kChunk, c0 < L ? L : D);
    __m256i acc[kRows][2];
    pair_dots(q + c0, D, g0 + c0 * 8, g1 + c0 * 8, 16, (c1 - c0) / 2, acc);
    const float* key_scale = (c0 < L ? ctx.latent_scale : ctx.rope_scale).data() + k0;
    const __m256 ks_a = _mm256_loadu_ps(key_scale), ks_b = _mm256_loadu_ps(key_scale + 8);
    for (int r = 0; r < kRows; ++r) {
      const __m256 qs = _mm256_set1_ps(c0 < L ? q_latent_scale[r] : q_rope_scale[r]);
      total[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][0]), _mm256_mul_ps(ks_a, qs), total[r][0]);
      total[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][1]), _mm256_mul_ps(ks_b, qs), total[r][1]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    _mm256_store_ps(scores[r] + column, total[r][0]);
    _mm256_store_ps(scores[r] + column + 8, total[r][1]);
  }
}

// Values 16 * b.. of rows r0..r0+3: out[r] = out[r] * alpha[r] + weight_scale[r] * (weights[r] .
// latents of keys first..first+count).
void block_values(const GroupState& s, const PackedContext& ctx, int64_t first, int64_t count, int64_t b, int64_t r0,
                  float* out) {
  const int64_t L = ctx.L;
  const int16_t* v = ctx.latent_block(b, first);
  __m256i acc[kRows][2];
  pair_dots(s.weights[r0], kPiece, v, v + 16, 32, count / 2, acc);
  for (int r = 0; r < kRows; ++r) {
    float* o = out + (r0 + r) * L + b * 16;
    const __m256 a = _mm256_set1_ps(s.alpha[r0 + r]), ws = _mm256_set1_ps(s.weight_scale[r0 + r]);
    _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][0]), ws, _mm256_mul_ps(_mm256_loadu_ps(o), a)));
    _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][1]), ws, _mm256_mul_ps(_mm256_loadu_ps(o + 8), a)));
  }
}

// Row r of the group: the online softmax step over the piece's first `valid` of `count` keys
// (first..): its weights (probability times the key's latent scale) as int16 and their scale,
// and alpha, the factor that takes its output to the new running max.
void softmax_step(GroupState& s, int64_t r, const PackedContext& ctx, int64_t first, int64_t valid, int64_t count) {
  float* scores = s.scores[r];
  s.alpha[r] = 1.f;
  s.weight_scale[r] = 0.f;
  if (valid <= 0) {
    std::memset(s.weights[r], 0, sizeof(s.weights[r]));
    return;
  }
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < valid; ++k) top = std::max(top, scores[k]);
  const float new_max = std::max(s.max[r], top);
  const __m256 shift = _mm256_set1_ps(new_max);
  __m256 sum = _mm256_setzero_ps(), largest = _mm256_setzero_ps();
  for (int64_t k = 0; k < count; k += 8) {
    const __m256i lane = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(k)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid)), lane));
    const __m256 p = _mm256_and_ps(live, exp8(_mm256_sub_ps(_mm256_load_ps(scores + k), shift)));
    sum = _mm256_add_ps(sum, p);
    const __m256 w = _mm256_mul_ps(p, _mm256_loadu_ps(ctx.value_scale.data() + first + k));
    _mm256_store_ps(scores + k, w);
    largest = _mm256_max_ps(largest, w);
  }
  const float top_weight = reduce_max8(largest);
  const __m256 inv = _mm256_set1_ps(top_weight > 0.f ? ctx.levels.weight / top_weight : 0.f);
  for (int64_t k = 0; k < count; k += 8) {
    const __m256i w = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(scores + k), inv));
    const __m128i packed = _mm_packs_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_store_si128(reinterpret_cast<__m128i*>(s.weights[r] + k), packed);
  }
  s.weight_scale[r] = top_weight / ctx.levels.weight;
  if (new_max > s.max[r]) {
    s.alpha[r] = std::exp(s.max[r] - new_max);  // 0 on the first piece (max = -inf)
    s.mass[r] *= s.alpha[r];
    s.max[r] = new_max;
  }
  s.mass[r] += reduce_add8(sum);
}

// The group's `rows` query rows (s.q) over the context; row r's normalized output goes to
// result_row(r) (for rows that are not padding).
template <typename ResultRow>
void attend_group(const int64_t* limits, int64_t rows, const PackedContext& ctx, GroupState& s, ResultRow result_row) {
  const int64_t L = ctx.L, D = ctx.D, blocks = rows / kRows;
  s.out.assign(rows * L, 0.f);
  s.max.assign(rows, -std::numeric_limits<float>::infinity());
  s.mass.assign(rows, 0.f);
  std::vector<int64_t> block_last(blocks, 0);
  for (int64_t r = 0; r < rows; ++r) block_last[r / kRows] = std::max(block_last[r / kRows], limits[r]);
  const int64_t last = *std::max_element(block_last.begin(), block_last.end());
  std::vector<int64_t> count(blocks);
  // Each product takes its operand of the piece (16 keys of scores, 16 values of latents) from L1
  // for every block of rows in turn.
  for (int64_t first = 0; first <= last; first += kPiece) {
    int64_t most = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      count[b] = block_last[b] < first ? 0 : round_up(std::min(kPiece, block_last[b] + 1 - first), 16);
      most = std::max(most, count[b]);
    }
    for (int64_t k = 0; k < most; k += 16)
      for (int64_t b = 0; b < blocks; ++b)
        if (k < count[b])
          block_scores(s.q.data() + b * kRows * D, s.q_latent_scale.data() + b * kRows, s.q_rope_scale.data() + b * kRows,
                       ctx, first + k, s.scores + b * kRows, k);  // fmt: skip
    for (int64_t r = 0; r < rows; ++r)
      if (count[r / kRows]) softmax_step(s, r, ctx, first, std::min(count[r / kRows], limits[r] + 1 - first), count[r / kRows]);
    for (int64_t v = 0; v < L / 16; ++v)
      for (int64_t b = 0; b < blocks; ++b)
        if (count[b]) block_values(s, ctx, first, count[b], v, b * kRows, s.out.data());
  }
  for (int64_t r = 0; r < rows; ++r) {
    auto* result = result_row(r);
    if (!result) continue;
    const __m256 inv = _mm256_set1_ps(s.mass[r] > 0.f ? 1.f / s.mass[r] : 0.f);
    for (int64_t i = 0; i < L; i += 8) store8(result + i, _mm256_mul_ps(inv, _mm256_loadu_ps(s.out.data() + r * L + i)));
  }
}

// Query rows [first, first + n) of the head-major rows (h, i) of q_latent [H, t, L] and q_rope
// [H, t, D - L], times `scale`, quantized at `level` into s.q; rows past R are zero.
template <typename In>
void gather_queries(const at::Tensor& q_latent, const at::Tensor& q_rope, float scale, float level, int64_t first,
                    int64_t n, int64_t D, GroupState& s) {
  const int64_t t = q_latent.size(1), R = q_latent.size(0) * t, L = q_latent.size(2);
  const In* latent = q_latent.data_ptr<In>();
  const In* rope = q_rope.data_ptr<In>();
  s.q.assign(n * D, 0);
  s.q_latent_scale.assign(n, 0.f), s.q_rope_scale.assign(n, 0.f);
  std::vector<float> row(D);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t index = first + r, h = index / t, i = index % t;
    if (index >= R) continue;
    const In* a = latent + h * q_latent.stride(0) + i * q_latent.stride(1);
    const In* b = rope + h * q_rope.stride(0) + i * q_rope.stride(1);
    for (int64_t k = 0; k < L; ++k) row[k] = static_cast<float>(a[k]) * scale;
    for (int64_t k = L; k < D; ++k) row[k] = static_cast<float>(b[k - L]) * scale;
    s.q_latent_scale[r] = quantize_row(row.data(), L, level, s.q.data() + r * D);
    s.q_rope_scale[r] = quantize_row(row.data() + L, D - L, level, s.q.data() + r * D + L);
  }
}

// The arguments and result of cpu_attention.cpp's latent_attention; the cache bf16, or int8 with
// float32 scales [slots, 2].
void latent_attention(const at::Tensor& q_latent, const at::Tensor& q_rope, double scale, const at::Tensor& limits,
                      const at::Tensor& cache, const std::optional<at::Tensor>& scales, const at::Tensor& context_slots,
                      const at::Tensor& out) {
  const auto args = check_latent_attention(q_latent, q_rope, limits, cache, scales, context_slots, out, 16);
  const int64_t L = args.L, D = args.D, t = args.t, R = args.R, S = args.S;
  const at::Tensor& limit = args.limits;
  const at::Tensor& slots = args.slots;
  const float* int8_scales = args.int8_scales;
  if (R == 0) return;
  PackedContext ctx;
  pack_context(cache, int8_scales, slots.data_ptr<int64_t>(), S, L, ctx);

  // Rows padded to whole blocks: zero queries that attend position 0 only.
  const int64_t Rb = round_up(R, kRows), groups = (Rb + kGroupRows - 1) / kGroupRows;
  std::vector<int64_t> padded_limits(limit.data_ptr<int64_t>(), limit.data_ptr<int64_t>() + R);
  padded_limits.resize(groups * kGroupRows, 0);
  std::atomic<int64_t> next_group{0};  // handed out one at a time: a VM's two cores often differ in speed
  auto attend_all = [&](auto* result) {
    using Out = std::remove_pointer_t<decltype(result)>;
    at::parallel_for(0, std::min<int64_t>(groups, at::get_num_threads()), 1, [&](int64_t, int64_t) {
      GroupState state;
      for (int64_t g; (g = next_group.fetch_add(1)) < groups;) {
        const int64_t first = g * kGroupRows, n = std::min(kGroupRows, Rb - first);
        if (q_latent.scalar_type() == at::kBFloat16)
          gather_queries<at::BFloat16>(q_latent, q_rope, static_cast<float>(scale), ctx.levels.query, first, n, D, state);
        else
          gather_queries<float>(q_latent, q_rope, static_cast<float>(scale), ctx.levels.query, first, n, D, state);
        attend_group(padded_limits.data() + first, n, ctx, state, [&](int64_t r) -> Out* {
          const int64_t row = first + r;
          return row < R ? result + (row / t) * out.stride(0) + (row % t) * out.stride(1) : nullptr;
        });
      }
    });
  };
  if (out.scalar_type() == at::kBFloat16) attend_all(out.data_ptr<at::BFloat16>()); else attend_all(out.data_ptr<float>());
}

bool latent_attention_available() { return true; }

}  // namespace
}  // namespace glmcode_cpu

TORCH_LIBRARY_FRAGMENT(glmcode_cpu, m) {
  m.def("latent_attention(Tensor q_latent, Tensor q_rope, float scale, Tensor limits, Tensor cache, Tensor? scales, "
        "Tensor context_slots, Tensor(a!) out) -> ()", &glmcode_cpu::latent_attention);
  m.def("latent_attention_available() -> bool", &glmcode_cpu::latent_attention_available);
}
