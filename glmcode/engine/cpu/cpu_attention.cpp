// Absorbed MLA attention of a prefill chunk over the paged latent cache, on AMX-BF16 tiles.
//
// In the absorbed form every head attends over the same cached rows (the 512-d latent and the
// 64-d rope key), so a chunk's attention is one large product: R = heads x tokens query rows of
// 576 values against S cached rows, softmax, then the probabilities times the rows' latents.
// Torch computes that as two matmuls around a materialized [R, S] score matrix; here it is one
// pass in the style of flash attention, which never leaves the caches:
//
// - The context is packed once per call into the B-operand layouts TDPBF16PS wants: the keys
//   transposed in 32-bit pairs (16 keys x 32 values per tile) and the latents as pairs of
//   consecutive keys (32 keys x 16 values per tile). An int8 cache is dequantized on the way.
// - Each thread takes groups of 4 blocks of 32 query rows. A group walks the keys in pieces of
//   512 (packed, ~1.1 MB: they stay in L2 while the group's four blocks use them): scores of a
//   block (2 x 2 tiles at a time), an online softmax in float32 (running max and mass per row),
//   then the block's output [32 x 512] float32 += probabilities (bf16) x latents.
// - Row r attends the context positions 0..limits[r]: the causal mask of a chunk whose rows are
//   any mix of heads and tokens.
//
// All eight tiles are 16 rows of 64 bytes: 0-3 accumulate 2 x 2 output tiles, 4-5 hold A rows
// (queries, or probabilities), 6-7 the B tiles (keys, or latents). The B tiles come from L2 and
// are loaded with the streaming hint (TILELOADDT1), so that they do not push the block's
// queries or probabilities, which every B tile meets again, out of L1: measured 10% faster per
// tile product, in the scores and the values alike.
#include "cpu_kernels.h"

#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <type_traits>

namespace glmcode_cpu {

namespace {

#define GLMCODE_AMX_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))

constexpr int64_t kBlockRows = 32;   // query rows per block: two A tiles
constexpr int64_t kGroupBlocks = 4;  // blocks that share each piece of keys while it is in L2
constexpr int64_t kPiece = 512;      // keys per softmax step
constexpr int64_t kKeyTile = 16;     // keys per B tile of the scores
constexpr int64_t kPairTile = 32;    // keys per B tile of the values

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// The context in the two B layouts. keys: [S/16][D/32][16 pairs][16 keys][2];
// values: [S/32][L/16][16 key pairs][16 values][2]. Keys past S are zero.
struct PackedContext {
  int64_t S = 0, D = 0, L = 0;
  AlignedVector<at::BFloat16> keys, values;

  int64_t key_tile(int64_t key, int64_t chunk) const { return ((key / kKeyTile) * (D / 32) + chunk) * 512; }
  int64_t value_tile(int64_t key, int64_t dtile) const { return ((key / kPairTile) * (L / 16) + dtile) * 512; }
};

// Row `slot` of the cache as bfloat16: where it lies, or dequantized into `scratch` (int8
// latents with a scale for the latent part and one for the rope part, as quant/latent_cache.py).
struct CacheRows {
  const at::BFloat16* bf16 = nullptr;
  const int8_t* int8 = nullptr;
  const float* scales = nullptr;  // int8: [slots, 2]
  int64_t D = 0, L = 0;

  GLMCODE_AMX_BF16 const at::BFloat16* row(int64_t slot, at::BFloat16* scratch) const {
    if (bf16) return bf16 + slot * D;
    const int8_t* v = int8 + slot * D;
    for (int64_t i = 0; i < D; i += 16) {
      const float scale = scales[2 * slot + (i < L ? 0 : 1)];
      const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + i))));
      const __m256bh b = _mm512_cvtneps_pbh(_mm512_mul_ps(f, _mm512_set1_ps(scale)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(scratch + i), reinterpret_cast<const __m256i&>(b));
    }
    return scratch;
  }
};

GLMCODE_AMX_BF16 void pack_context(const CacheRows& cache, const int64_t* slots, int64_t S, PackedContext& out) {
  const int64_t D = cache.D, L = cache.L, Sp = round_up(S, kPiece);
  out.S = S, out.D = D, out.L = L;
  out.keys.assign(Sp * D, at::BFloat16(0.f));
  out.values.assign(Sp * L, at::BFloat16(0.f));
  alignas(64) int16_t order[32];  // word 2i of the result is a[i], word 2i + 1 is b[i]
  for (int i = 0; i < 16; ++i) order[2 * i] = static_cast<int16_t>(i), order[2 * i + 1] = static_cast<int16_t>(32 + i);
  // One pair of keys per step: their pair-interleaved latents, and their columns of the key tiles.
  at::parallel_for(0, (S + 1) / 2, 64, [&](int64_t begin, int64_t end) {
    const __m512i interleave = _mm512_load_si512(order);
    std::vector<at::BFloat16> scratch(2 * D);
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t k0 = 2 * pair;
      const at::BFloat16* a = cache.row(slots[k0], scratch.data());
      const at::BFloat16* b = k0 + 1 < S ? cache.row(slots[k0 + 1], scratch.data() + D) : nullptr;
      for (int64_t k = 0; k < 2; ++k) {
        const uint32_t* src = reinterpret_cast<const uint32_t*>(k ? b : a);
        if (!src) break;
        const int64_t key = k0 + k;
        for (int64_t chunk = 0; chunk < D / 32; ++chunk) {
          uint32_t* dst = reinterpret_cast<uint32_t*>(out.keys.data() + out.key_tile(key, chunk));
          for (int64_t r = 0; r < 16; ++r) dst[r * 16 + key % kKeyTile] = src[chunk * 16 + r];
        }
      }
      const int64_t line = (k0 % kPairTile) / 2;
      for (int64_t dtile = 0; dtile < L / 16; ++dtile) {
        const __m512i va = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + dtile * 16)));
        const __m512i vb = b ? _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + dtile * 16)))
                             : _mm512_setzero_si512();
        at::BFloat16* dst = out.values.data() + out.value_tile(k0, dtile) + line * 32;
        _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(va, interleave, vb));
      }
    }
  });
}

// What one thread keeps for its group of row blocks.
struct GroupState {
  AlignedVector<at::BFloat16> q;   // [group rows][D] the group's queries, scaled, zero past the last row
  AlignedVector<float> out;        // [group rows][L] float32, unnormalized
  std::vector<float> max, mass;    // running max score and softmax mass per row
  AlignedVector<float> scores = AlignedVector<float>(kBlockRows * kPiece);
  AlignedVector<at::BFloat16> probs = AlignedVector<at::BFloat16>(kBlockRows * kPiece);
};

// scores[32][count] = q[32 rows] . keys[first, first + count) (count a multiple of 32).
GLMCODE_AMX_BF16 void block_scores(const at::BFloat16* q, int64_t D, const PackedContext& ctx, int64_t first,
                                   int64_t count, float* scores) {
  for (int64_t k = 0; k < count; k += 2 * kKeyTile) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t chunk = 0; chunk < D / 32; ++chunk) {
      _tile_loadd(4, q + chunk * 32, D * 2);
      _tile_loadd(5, q + 16 * D + chunk * 32, D * 2);
      _tile_stream_loadd(6, ctx.keys.data() + ctx.key_tile(first + k, chunk), 64);
      _tile_stream_loadd(7, ctx.keys.data() + ctx.key_tile(first + k + kKeyTile, chunk), 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, scores + k, kPiece * 4);
    _tile_stored(1, scores + k + kKeyTile, kPiece * 4);
    _tile_stored(2, scores + 16 * kPiece + k, kPiece * 4);
    _tile_stored(3, scores + 16 * kPiece + k + kKeyTile, kPiece * 4);
  }
}

// out[32][L] += probs[32][count] x latents[first, first + count).
GLMCODE_AMX_BF16 void block_values(const at::BFloat16* probs, const PackedContext& ctx, int64_t first, int64_t count,
                                   float* out) {
  const int64_t L = ctx.L;
  for (int64_t d = 0; d < L / 16; d += 2) {
    _tile_loadd(0, out + d * 16, L * 4);
    _tile_loadd(1, out + (d + 1) * 16, L * 4);
    _tile_loadd(2, out + 16 * L + d * 16, L * 4);
    _tile_loadd(3, out + 16 * L + (d + 1) * 16, L * 4);
    for (int64_t k = 0; k < count; k += kPairTile) {
      _tile_loadd(4, probs + k, kPiece * 2);
      _tile_loadd(5, probs + 16 * kPiece + k, kPiece * 2);
      _tile_stream_loadd(6, ctx.values.data() + ctx.value_tile(first + k, d), 64);
      _tile_stream_loadd(7, ctx.values.data() + ctx.value_tile(first + k, d + 1), 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, out + d * 16, L * 4);
    _tile_stored(1, out + (d + 1) * 16, L * 4);
    _tile_stored(2, out + 16 * L + d * 16, L * 4);
    _tile_stored(3, out + 16 * L + (d + 1) * 16, L * 4);
  }
}

// One row's online softmax step over the piece's first `valid` keys (the rest are masked):
// the probabilities as bf16 (zero past `valid`, up to `count`), the row's output rescaled to
// the new running max.
GLMCODE_AMX_BF16 void softmax_step(float* scores, int64_t valid, int64_t count, float& max, float& mass, float* out,
                                   int64_t L, at::BFloat16* probs) {
  if (valid <= 0) {
    std::memset(static_cast<void*>(probs), 0, count * 2);
    return;
  }
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t t = 0;
  for (; t + 16 <= valid; t += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(scores + t));
  if (t < valid) vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(vmax, (1u << (valid - t)) - 1, scores + t));
  const float new_max = std::max(max, _mm512_reduce_max_ps(vmax));
  const __m512 shift = _mm512_set1_ps(new_max);
  __m512 sum = _mm512_setzero_ps();
  for (t = 0; t < count; t += 16) {
    const __mmask16 live = valid - t >= 16 ? 0xFFFF : valid - t > 0 ? (1u << (valid - t)) - 1 : 0;
    const __m512 p = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + t), shift)));
    sum = _mm512_add_ps(sum, p);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + t), (__m256i)_mm512_cvtneps_pbh(p));
  }
  if (new_max > max) {
    const float alpha = std::exp(max - new_max);  // 0 on the first piece (max = -inf)
    const __m512 a = _mm512_set1_ps(alpha);
    for (int64_t i = 0; i < L; i += 16) _mm512_storeu_ps(out + i, _mm512_mul_ps(a, _mm512_loadu_ps(out + i)));
    mass *= alpha;
    max = new_max;
  }
  mass += _mm512_reduce_add_ps(sum);
}

// The group's `rows` query rows (s.q) over the context; row r's normalized output goes to
// result_row(r) (for rows that are not padding).
template <typename ResultRow>
GLMCODE_AMX_BF16 void attend_group(const int64_t* limits, int64_t rows, int64_t D, const PackedContext& ctx,
                                   GroupState& s, ResultRow result_row) {
  const at::BFloat16* q = s.q.data();
  const int64_t L = ctx.L, blocks = rows / kBlockRows;
  s.out.assign(rows * L, 0.f);
  s.max.assign(rows, -std::numeric_limits<float>::infinity());
  s.mass.assign(rows, 0.f);
  std::vector<int64_t> block_last(blocks, 0);
  for (int64_t r = 0; r < rows; ++r) block_last[r / kBlockRows] = std::max(block_last[r / kBlockRows], limits[r]);
  const int64_t last = *std::max_element(block_last.begin(), block_last.end());
  for (int64_t first = 0; first <= last; first += kPiece) {
    for (int64_t b = 0; b < blocks; ++b) {
      if (block_last[b] < first) continue;
      const int64_t count = round_up(std::min(kPiece, block_last[b] + 1 - first), kPairTile);
      block_scores(q + b * kBlockRows * D, D, ctx, first, count, s.scores.data());
      for (int64_t i = 0; i < kBlockRows; ++i) {
        const int64_t r = b * kBlockRows + i;
        softmax_step(s.scores.data() + i * kPiece, std::min(count, limits[r] + 1 - first), count, s.max[r], s.mass[r],
                     s.out.data() + r * L, L, s.probs.data() + i * kPiece);
      }
      block_values(s.probs.data(), ctx, first, count, s.out.data() + b * kBlockRows * L);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    auto* result = result_row(r);
    if (!result) continue;
    const __m512 inv = _mm512_set1_ps(s.mass[r] > 0.f ? 1.f / s.mass[r] : 0.f);
    for (int64_t i = 0; i < L; i += 16) store_row(result + i, _mm512_mul_ps(inv, _mm512_loadu_ps(s.out.data() + r * L + i)));
  }
}

// Query rows [first, first + n) of the head-major rows (h, i) of q_latent [H, t, L] and q_rope
// [H, t, D - L], times `scale` and rounded to bf16 (as torch's bf16 multiply rounds), into
// s.q as whole cache-row-shaped lines; rows past R are zero.
template <typename In>
GLMCODE_AMX_BF16 void gather_queries(const at::Tensor& q_latent, const at::Tensor& q_rope, float scale, int64_t first,
                                     int64_t n, int64_t D, GroupState& s) {
  const int64_t t = q_latent.size(1), R = q_latent.size(0) * t, L = q_latent.size(2);
  const In* latent = q_latent.data_ptr<In>();
  const In* rope = q_rope.data_ptr<In>();
  const __m512 factor = _mm512_set1_ps(scale);
  s.q.resize(n * D);
  for (int64_t r = 0; r < n; ++r) {
    at::BFloat16* dst = s.q.data() + r * D;
    const int64_t row = first + r, h = row / t, i = row % t;
    if (row >= R) {
      std::fill_n(dst, D, at::BFloat16(0.f));
      continue;
    }
    const In* a = latent + h * q_latent.stride(0) + i * q_latent.stride(1);
    const In* b = rope + h * q_rope.stride(0) + i * q_rope.stride(1);
    for (int64_t k = 0; k < L; k += 16) store_row(dst + k, _mm512_mul_ps(load16_as_float(a + k), factor));
    for (int64_t k = L; k < D; k += 16) store_row(dst + k, _mm512_mul_ps(load16_as_float(b + k - L), factor));
  }
}

// Head-major query rows (h, i): q_latent [H, t, L] and q_rope [H, t, D - L] (bf16 or float32,
// each row contiguous; they are multiplied by `scale` here), limits [H * t] int64 (row r attends
// context positions 0..limits[r]), cache [slots, D] bf16 or int8 (with scales [slots, 2]),
// context_slots [S] int64 (the slot of each context position) -> out [H, t, L] (bf16 or float32,
// rows contiguous): the softmax-weighted latents.
void latent_attention(const at::Tensor& q_latent, const at::Tensor& q_rope, double scale, const at::Tensor& limits,
                      const at::Tensor& cache, const std::optional<at::Tensor>& scales, const at::Tensor& context_slots,
                      const at::Tensor& out) {
  TORCH_CHECK(amx_support().bf16, "latent_attention: needs AMX-BF16");
  const auto args = check_latent_attention(q_latent, q_rope, limits, cache, scales, context_slots, out, 32);
  const int64_t L = args.L, D = args.D, t = args.t, R = args.R, S = args.S;
  const at::Tensor& limit = args.limits;
  const at::Tensor& slots = args.slots;
  CacheRows rows;
  rows.D = D, rows.L = L;
  if (args.int8_scales) {
    rows.int8 = cache.data_ptr<int8_t>();
    rows.scales = args.int8_scales;
  } else {
    rows.bf16 = cache.data_ptr<at::BFloat16>();
  }
  PackedContext ctx;
  pack_context(rows, slots.data_ptr<int64_t>(), S, ctx);

  // Rows padded to whole blocks: zero queries that attend position 0 only.
  const int64_t group_rows = kGroupBlocks * kBlockRows;
  const int64_t Rb = round_up(R, kBlockRows), groups = (Rb + group_rows - 1) / group_rows;
  std::vector<int64_t> padded_limits(limit.data_ptr<int64_t>(), limit.data_ptr<int64_t>() + R);
  padded_limits.resize(groups * group_rows, 0);
  // Groups are handed out one at a time rather than split up front: the two cores of a VM often
  // run at very different speeds (measured: 4x), and a static split waits for the slower one.
  std::atomic<int64_t> next_group{0};
  auto attend_all = [&](auto* result) {
    using Out = std::remove_pointer_t<decltype(result)>;
    at::parallel_for(0, std::min<int64_t>(groups, at::get_num_threads()), 1, [&](int64_t, int64_t) {
      configure_square_tiles();
      GroupState state;
      for (int64_t g; (g = next_group.fetch_add(1)) < groups;) {
        const int64_t first = g * group_rows, n = std::min(group_rows, Rb - first);
        if (q_latent.scalar_type() == at::kBFloat16)
          gather_queries<at::BFloat16>(q_latent, q_rope, static_cast<float>(scale), first, n, D, state);
        else
          gather_queries<float>(q_latent, q_rope, static_cast<float>(scale), first, n, D, state);
        attend_group(padded_limits.data() + first, n, D, ctx, state, [&](int64_t r) -> Out* {
          const int64_t row = first + r;
          return row < R ? result + (row / t) * out.stride(0) + (row % t) * out.stride(1) : nullptr;
        });
      }
      release_tiles();
    });
  };
  if (out.scalar_type() == at::kBFloat16) attend_all(out.data_ptr<at::BFloat16>()); else attend_all(out.data_ptr<float>());
}

bool latent_attention_available() { return amx_support().bf16 && amx_products_enabled(); }

}  // namespace
}  // namespace glmcode_cpu

TORCH_LIBRARY_FRAGMENT(glmcode_cpu, m) {
  m.def("latent_attention(Tensor q_latent, Tensor q_rope, float scale, Tensor limits, Tensor cache, Tensor? scales, "
        "Tensor context_slots, Tensor(a!) out) -> ()", &glmcode_cpu::latent_attention);
  m.def("latent_attention_available() -> bool", &glmcode_cpu::latent_attention_available);
}
