// One decode step of one sequence through GLM-4.7-Flash on CPU (int4 / int8 / bfloat16
// weights), every layer in one call.
//
// A decoded token streams ~2 GB of int4 weights from memory through a few hundred small
// matrix-vector products. Run op by op from Python, the norms, rope, routing and the fork/join
// of every parallel region cost about as much as the weight reads themselves. Here the whole
// step runs inside one OpenMP parallel region:
//
// - every matrix-vector product (a "phase": one or more projections) is shared out in chunks
//   of whole 16-row tiles (each thread its own run first, then helping the others), writing a
//   shared output, and is followed by one barrier;
// - everything small (norms, rope, routing, silu, residual adds, activation quantization) is
//   computed by every thread on its own copy, identically, so it needs no barrier at all;
// - attention splits the heads between the threads, each reading the cached latents block by
//   block with an online softmax; over a long context the threads split the blocks instead
//   (each then reads its part of the cache once, for all heads) and merge their parts.
//
// Each product's outputs are computed by exactly one thread with the same code whatever the
// thread count; only the merge of long-context attention parts depends on it (float rounding).
// Activations stay float32 throughout.
#include "cpu_kernels.h"

#include <omp.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <atomic>
#include <functional>
#include <type_traits>
#include <limits>

namespace {

using namespace glmcode_cpu;


#define GLMCODE_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

// A product's input as its kernel wants it: int8 groups (int4 / int8 weights) or bfloat16
// zero-padded to a multiple of 32 values (bfloat16 weights).
struct Input {
  QuantizedRows quantized;
  std::vector<at::BFloat16> bf16;
};

// Rows [16t, 16t + 16) of y = w @ x for bfloat16 weights w [N, K], kRowsAtOnce rows at a time
// sharing each load of x. Rows past N are computed from row 16t and dropped (no reads past the
// end). Each row is one memory stream; prefetching the same place of the next group's rows keeps
// kRowsAtOnce streams in flight, which measured 20-35% more bandwidth per core than prefetching
// each row a fixed distance ahead (the first kilobytes of every row were never prefetched).
constexpr int kRowsAtOnce = 8;

GLMCODE_BF16 void bf16_tile(const at::BFloat16* w, int64_t N, int64_t K, int64_t t, const at::BFloat16* x, float* y) {
  const int64_t first = t * kTile, last = std::min(N, first + kTile), chunks = (K + 31) / 32;
  const __mmask32 tail = K % 32 ? (1u << (K % 32)) - 1 : 0xFFFFFFFFu;
  for (int64_t r = first; r < last; r += kRowsAtOnce) {
    const at::BFloat16* rows[kRowsAtOnce];
    __m512 acc[kRowsAtOnce];
    for (int k = 0; k < kRowsAtOnce; ++k) {
      rows[k] = w + (r + k < last ? r + k : first) * K;
      acc[k] = _mm512_setzero_ps();
    }
    for (int64_t c = 0; c < chunks; ++c) {
      const __mmask32 mask = c + 1 == chunks ? tail : 0xFFFFFFFFu;
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + c * 32);
      for (int k = 0; k < kRowsAtOnce; ++k) {
        _mm_prefetch(reinterpret_cast<const char*>(rows[k] + kRowsAtOnce * K + c * 32), _MM_HINT_T0);
        acc[k] = _mm512_dpbf16_ps(acc[k], (__m512bh)_mm512_maskz_loadu_epi16(mask, rows[k] + c * 32), xv);
      }
    }
    for (int k = 0; k < kRowsAtOnce && r + k < last; ++k) y[r + k] = _mm512_reduce_add_ps(acc[k]);
  }
}

// One projection: int4 / int8 in the tile layout of cpu_quant.py (see cpu_quant.cpp), or
// bfloat16 as stored ([N, K] rows).
struct Linear {
  int64_t bits = 0, rows = 0, in = 0, group = 0, tiles = 0;
  const uint8_t* packed = nullptr;  // int4 / int8 tiles, or the bf16 rows
  const at::BFloat16* scales4 = nullptr;  // int4: [tiles, in/group, 16]
  const at::BFloat16* zeros = nullptr;
  const float* scales8 = nullptr;  // int8: [tiles * 16]
  const int32_t* sums = nullptr;   // int8: [tiles, in/group, 16]

  int64_t padded_rows() const { return tiles * kTile; }
  int64_t tile_bytes() const { return in * bits / 8 * kTile; }

  void tile(int64_t t, const Input& x, float* y) const {
    const int64_t groups = in / group;
    if (bits == 4) {
      int4_tile<1>(packed + t * (in / 8) * 64, scales4 + t * groups * kTile, zeros + t * groups * kTile, x.quantized,
                   0, in, group, y, padded_rows(), t);
    } else if (bits == 8) {
      int8_tile<1>(reinterpret_cast<const int8_t*>(packed) + t * (in / 4) * 64, scales8, sums + t * groups * kTile,
                   x.quantized, 0, in, group, y, padded_rows(), t);
    } else {
      bf16_tile(reinterpret_cast<const at::BFloat16*>(packed), rows, in, t, x.bf16.data(), y);
    }
  }
};

// y = w @ x for one input row x (w->in floats) into y (w->padded_rows() floats).
struct Product {
  const Linear* w;
  const float* x;
  float* y;
};

struct Layer {
  std::vector<float> input_norm, post_norm, q_a_norm, kv_a_norm;
  Linear q_a, q_b, kv_a, o_proj;  // without q_lora, q_b is q_proj and q_a is unused
  std::vector<Linear> w_uk, w_uv;  // per head: [latent, nope] and [v, latent]
  bool dense = false;
  Linear gate_up, down;  // the dense MLP, or the shared expert of a MoE layer
  const float* router = nullptr;  // [experts, hidden]
  const float* router_bias = nullptr;
  std::vector<Linear> expert_gate_up, expert_down;
};

struct Config {
  int64_t hidden, heads, nope, rope, v_dim, latent, q_lora, experts, top_k, n_group, topk_group, normalize, vocab;
  double rms_eps, latent_eps, softmax_scale, routed_scaling;
};

// Reads the flat description that cpu_decode.py writes: tensors and integers in order.
struct Reader {
  const std::vector<at::Tensor>& tensors;
  const std::vector<int64_t>& ints;
  size_t next_tensor = 0, next_int = 0;

  at::Tensor tensor() {
    TORCH_CHECK(next_tensor < tensors.size(), "decode plan: too few tensors");
    at::Tensor t = tensors[next_tensor++];
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "decode plan: tensors must be contiguous CPU tensors");
    return t;
  }
  int64_t integer() {
    TORCH_CHECK(next_int < ints.size(), "decode plan: too few integers");
    return ints[next_int++];
  }
  std::vector<float> floats() {
    at::Tensor t = tensor();
    TORCH_CHECK(t.scalar_type() == at::kFloat, "decode plan: norm weights must be float32");
    return std::vector<float>(t.data_ptr<float>(), t.data_ptr<float>() + t.numel());
  }
  Linear linear() {
    Linear l;
    l.bits = integer();
    l.rows = integer();
    l.group = integer();
    const at::Tensor packed = tensor();
    if (l.bits == 16) {
      TORCH_CHECK(__builtin_cpu_supports("avx512bf16"), "decode plan: bfloat16 weights need AVX512_BF16");
      TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kBFloat16 && packed.size(0) == l.rows,
                  "decode plan: bfloat16 weights must be [rows, in]");
      l.in = l.group = packed.size(1);
      l.tiles = (l.rows + kTile - 1) / kTile;
      l.packed = static_cast<const uint8_t*>(packed.data_ptr());
      return l;
    }
    TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 64, "decode plan: packed weights must be [tiles, blocks, 64]");
    l.tiles = packed.size(0);
    l.packed = static_cast<const uint8_t*>(packed.data_ptr());
    TORCH_CHECK(l.rows <= l.padded_rows(), "decode plan: more rows than tiles");
    if (l.bits == 4) {
      l.in = packed.size(1) * 8;
      l.scales4 = tensor().data_ptr<at::BFloat16>();
      l.zeros = tensor().data_ptr<at::BFloat16>();
    } else {
      TORCH_CHECK(l.bits == 8, "decode plan: bits must be 4, 8 or 16");
      l.in = packed.size(1) * 4;
      l.scales8 = tensor().data_ptr<float>();
      l.sums = tensor().data_ptr<int32_t>();
    }
    TORCH_CHECK(l.group > 0 && l.in % l.group == 0, "decode plan: group must divide the input size");
    return l;
  }
  std::vector<Linear> linears(int64_t count) {
    std::vector<Linear> out;
    for (int64_t i = 0; i < count; ++i) out.push_back(linear());
    return out;
  }
};

// What each thread keeps for itself: the residual stream and its copies of small results.
struct ThreadState {
  int64_t phase = 0;  // products() calls so far this step: indexes the shared tickets
  std::vector<float> x, normed, q_a, q_nope, q_pe, cos, sin, values, act, attn_scores;
  std::vector<Input> inputs;
  std::vector<size_t> input_of;  // job -> the job whose prepared input it shares
};

void rms_norm(const float* x, const std::vector<float>& weight, double eps, float* out) {
  const int64_t n = static_cast<int64_t>(weight.size());
  const float inv = 1.f / std::sqrt(sum_of_squares(x, n) / n + static_cast<float>(eps));
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inv * weight[i];
}

// Interleaved pairs in, de-interleaved out (the engine's rope layout; see layers.Rotary).
void rope(const float* in, const std::vector<float>& cos, const std::vector<float>& sin, float* out) {
  const size_t half = cos.size();
  for (size_t i = 0; i < half; ++i) {
    const float even = in[2 * i], odd = in[2 * i + 1];
    out[i] = even * cos[i] - odd * sin[i];
    out[half + i] = odd * cos[i] + even * sin[i];
  }
}

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
constexpr int kFmaHeads = 5;   // heads per pass: 10 accumulators, and GLM-4.7-Flash's 20 heads in 4

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
//           (see pair_latents) and read from L1 by every group of heads.
constexpr int kInt8Heads = 5;  // heads per pass: 10 accumulators, as kFmaHeads

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

  const void* stored(int64_t id) const { return cache + id * block_size * D; }
  int64_t stored_bytes(int64_t count) const { return count * D * 2; }
  const at::BFloat16* rows(int64_t id, int64_t) { return cache + id * block_size * D; }
};

struct Int8Blocks {
  const int8_t* cache;
  const float* scales;  // [slots, 2]: latent part, rope part
  int64_t block_size, D, L;
  AlignedVector<at::BFloat16> scratch;

  Int8Blocks(const int8_t* cache, const float* scales, int64_t block_size, int64_t D, int64_t L)
      : cache(cache), scales(scales), block_size(block_size), D(D), L(L), scratch(block_size * D, at::BFloat16(0.f)) {}

  const void* stored(int64_t id) const { return cache + id * block_size * D; }
  int64_t stored_bytes(int64_t count) const { return count * D; }

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

// Quantizes one part of a cache row as quant/latent_cache.quantize_latent does (the same float32
// operations, so the same bits): a symmetric scale from the part's largest magnitude.
inline void quantize_latent_part(const float* x, int64_t n, int8_t* out, float* scale) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  *scale = std::max(amax, 1e-12f) / 127.0f;
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<int8_t>(std::clamp(std::nearbyint(x[i] / *scale), -127.f, 127.f));
}

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

// One attention call: heads [h0, h1) over the cache blocks [first_block, last_block) of a
// sequence of seq_len tokens, into out [heads][latent] (max and mass: see OnlineSoftmax::end).
struct AttendJob {
  int64_t h0, h1, first_block, last_block, seq_len, block_size;
  const int64_t* table;
  float* out;
  float* max = nullptr;
  float* mass = nullptr;

  int64_t count(int64_t block) const { return std::min(block_size, seq_len - block * block_size); }
};

constexpr int kTokens = 4;  // cache rows scored together, sharing each query load (attend_generic)
constexpr int kHeads = 8;   // heads accumulated together, sharing each cache load

class DecodePlan : public torch::CustomClassHolder {
 public:
  DecodePlan(std::vector<at::Tensor> tensors, std::vector<int64_t> ints, std::vector<double> floats)
      : tensors_(std::move(tensors)) {
    Reader r{tensors_, ints};
    TORCH_CHECK(floats.size() == 4, "decode plan: four floats expected");
    cfg_ = Config{r.integer(), r.integer(), r.integer(), r.integer(), r.integer(), r.integer(), r.integer(),
                  r.integer(), r.integer(), r.integer(), r.integer(), r.integer(), r.integer(),
                  floats[0], floats[1], floats[2], floats[3]};
    TORCH_CHECK(cfg_.latent % 32 == 0 && cfg_.hidden % 16 == 0,
                "decode plan: latent must be a multiple of 32 and hidden of 16");
    const int64_t num_layers = r.integer();
    use_amx_ = r.integer() != 0 && amx_support().bf16;
    inv_freq_ = r.floats();
    final_norm_ = r.floats();
    lm_head_ = r.linear();
    for (int64_t i = 0; i < num_layers; ++i) {
      Layer layer;
      layer.input_norm = r.floats();
      layer.post_norm = r.floats();
      if (cfg_.q_lora) {
        layer.q_a = r.linear();
        layer.q_a_norm = r.floats();
      }
      layer.q_b = r.linear();
      layer.kv_a = r.linear();
      layer.kv_a_norm = r.floats();
      layer.w_uk = r.linears(cfg_.heads);
      layer.w_uv = r.linears(cfg_.heads);
      layer.o_proj = r.linear();
      layer.dense = r.integer() != 0;
      layer.gate_up = r.linear();
      layer.down = r.linear();
      if (!layer.dense) {
        const at::Tensor router = r.tensor(), bias = r.tensor();
        TORCH_CHECK(router.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat, "router must be float32");
        layer.router = router.data_ptr<float>();
        layer.router_bias = bias.data_ptr<float>();
        layer.expert_gate_up = r.linears(cfg_.experts);
        layer.expert_down = r.linears(cfg_.experts);
      }
      layers_.push_back(std::move(layer));
    }
    TORCH_CHECK(r.next_tensor == tensors_.size() && r.next_int == ints.size(), "decode plan: unread entries");
    allocate();
  }

  // x: the token's embedding [hidden]; kv_cache: [layers, slots, latent + rope] (this token's
  // latent is written at its slot); block_table: the sequence's blocks. Returns float32 logits.
  // kv_scales: an int8 cache's scales [layers, slots, 2]; empty for a bfloat16 / float32 cache.
  at::Tensor step(const at::Tensor& x_in, int64_t position, const at::Tensor& block_table_in, int64_t block_size,
                  const at::Tensor& kv_cache, const at::Tensor& kv_scales) {
    const at::Tensor x = x_in.to(at::kFloat).contiguous();
    const at::Tensor block_table = block_table_in.to(at::kLong).contiguous();
    TORCH_CHECK(x.numel() == cfg_.hidden, "step: x must have hidden_size values");
    TORCH_CHECK(kv_cache.is_contiguous() && kv_cache.dim() == 3 && kv_cache.size(0) == (int64_t)layers_.size() &&
                    kv_cache.size(2) == cfg_.latent + cfg_.rope,
                "step: kv_cache must be [layers, slots, latent + rope]");
    const int64_t seq_len = position + 1;
    TORCH_CHECK(block_size > 0 && block_table.numel() * block_size >= seq_len, "step: block table too short");
    const int64_t* table = block_table.data_ptr<int64_t>();
    for (int64_t b = 0; b * block_size < seq_len; ++b)
      TORCH_CHECK(table[b] >= 0 && (table[b] + 1) * block_size <= kv_cache.size(1), "step: block out of range");
    at::Tensor logits = at::empty({lm_head_.padded_rows()}, x.options());
    if (kv_cache.scalar_type() == at::kBFloat16) {
      run(x.data_ptr<float>(), position, table, block_size, kv_cache.data_ptr<at::BFloat16>(), nullptr, kv_cache.size(1),
          logits.data_ptr<float>());
    } else if (kv_cache.scalar_type() == at::kChar) {
      TORCH_CHECK(kv_scales.scalar_type() == at::kFloat && kv_scales.is_contiguous() && kv_scales.dim() == 3 &&
                      kv_scales.size(0) == kv_cache.size(0) && kv_scales.size(1) == kv_cache.size(1) && kv_scales.size(2) == 2,
                  "step: an int8 cache needs its float32 scales [layers, slots, 2]");
      run(x.data_ptr<float>(), position, table, block_size, kv_cache.data_ptr<int8_t>(), kv_scales.data_ptr<float>(),
          kv_cache.size(1), logits.data_ptr<float>());
    } else {
      TORCH_CHECK(kv_cache.scalar_type() == at::kFloat, "step: kv_cache must be bfloat16, int8 or float32");
      run(x.data_ptr<float>(), position, table, block_size, kv_cache.data_ptr<float>(), nullptr, kv_cache.size(1),
          logits.data_ptr<float>());
    }
    return logits.narrow(0, 0, cfg_.vocab);
  }

 private:
  std::vector<at::Tensor> tensors_;  // keeps every weight alive
  Config cfg_;
  std::vector<float> inv_freq_, final_norm_;
  Linear lm_head_;
  std::vector<Layer> layers_;
  // Per products() call of a step and per thread share: how many chunks were taken from it.
  std::vector<std::atomic<int64_t>> tickets_;
  // Where another thread helps, each chunk starts a new memory stream: chunks of 256 KB measured
  // ~7% faster than 32 KB.
  static constexpr int64_t kChunkBytes = 256 << 10;
  bool has_bf16_ = __builtin_cpu_supports("avx512bf16");
  bool use_amx_ = false;
  // Outputs of the products, shared by the threads.
  std::vector<float> q_a_out_, q_out_, kv_a_out_, q_latent_, attn_latent_, v_out_, o_out_, router_out_,
      gate_up_out_, down_out_;
  std::vector<float> parts_out_, parts_max_, parts_mass_;  // per thread: its part of a long context
  int64_t q_stride_ = 0, uk_stride_ = 0, uv_stride_ = 0, gate_up_stride_ = 0, down_stride_ = 0;

  void allocate() {
    int64_t max_gate_up = 0, max_down = 0;
    for (const Layer& l : layers_) {
      q_a_out_.resize(std::max<size_t>(q_a_out_.size(), cfg_.q_lora ? l.q_a.padded_rows() : 0));
      q_out_.resize(std::max<size_t>(q_out_.size(), l.q_b.padded_rows()));
      kv_a_out_.resize(std::max<size_t>(kv_a_out_.size(), l.kv_a.padded_rows()));
      o_out_.resize(std::max<size_t>(o_out_.size(), l.o_proj.padded_rows()));
      uk_stride_ = std::max(uk_stride_, l.w_uk[0].padded_rows());
      uv_stride_ = std::max(uv_stride_, l.w_uv[0].padded_rows());
      max_gate_up = std::max(max_gate_up, l.gate_up.padded_rows());
      max_down = std::max(max_down, l.down.padded_rows());
      for (const Linear& e : l.expert_gate_up) max_gate_up = std::max(max_gate_up, e.padded_rows());
      for (const Linear& e : l.expert_down) max_down = std::max(max_down, e.padded_rows());
    }
    q_stride_ = cfg_.nope + cfg_.rope;
    q_latent_.resize(cfg_.heads * uk_stride_);
    attn_latent_.resize(cfg_.heads * cfg_.latent);
    v_out_.resize(cfg_.heads * uv_stride_);
    router_out_.resize(((cfg_.experts + kTile - 1) / kTile) * kTile);
    gate_up_stride_ = max_gate_up;
    down_stride_ = max_down;
    gate_up_out_.resize((cfg_.top_k + 1) * max_gate_up);
    down_out_.resize((cfg_.top_k + 1) * max_down);
  }

  // Every thread quantizes all inputs (identically), then works through its own share of the
  // tiles, chunk by chunk, then helps with what is left of the others' shares: each thread
  // mostly streams one contiguous run of weights, and a slower thread just does less. No
  // barrier: the caller puts one after.
  void products(const std::vector<Product>& jobs, ThreadState& state) {
    if (state.inputs.size() < jobs.size()) state.inputs.resize(jobs.size());
    state.input_of.resize(jobs.size());
    int64_t total_tiles = 0, total_bytes = 0;
    for (size_t j = 0; j < jobs.size(); ++j) {
      const Linear& w = *jobs[j].w;
      const Linear* previous = j > 0 ? jobs[j - 1].w : nullptr;
      const bool shared_input = previous != nullptr && jobs[j].x == jobs[j - 1].x && w.in == previous->in &&
                                w.group == previous->group && w.bits == previous->bits;
      state.input_of[j] = shared_input ? state.input_of[j - 1] : j;
      if (!shared_input) prepare(jobs[j].x, w, state.inputs[j]);
      total_tiles += w.tiles;
      total_bytes += w.tiles * w.tile_bytes();
    }
    const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t chunk_bytes = std::min(kChunkBytes, total_bytes / (4 * nth));
    const int64_t chunk = std::max<int64_t>(1, chunk_bytes / jobs[0].w->tile_bytes());
    std::atomic<int64_t>* taken = &tickets_[state.phase++ * nth];  // chunks taken from each thread's share
    for (int k = 0; k < nth; ++k) {
      const int owner = (tid + k) % nth;  // its own share first, then help the others
      const int64_t first = total_tiles * owner / nth, end = total_tiles * (owner + 1) / nth;
      for (int64_t c; first + (c = taken[owner].fetch_add(1, std::memory_order_relaxed)) * chunk < end;)
        tiles(jobs, state, first + c * chunk, std::min(end, first + (c + 1) * chunk));
    }
  }

  // Tiles [begin, end) of the jobs' tiles taken in order.
  static void tiles(const std::vector<Product>& jobs, ThreadState& state, int64_t begin, int64_t end) {
    size_t j = 0;
    int64_t job_first = 0;  // index of job j's first tile
    for (int64_t g = begin; g < end; ++g) {
      while (g >= job_first + jobs[j].w->tiles) job_first += jobs[j++].w->tiles;
      jobs[j].w->tile(g - job_first, state.inputs[state.input_of[j]], jobs[j].y);
    }
  }

  static void prepare(const float* x, const Linear& w, Input& input) {
    if (w.bits == 16) {
      input.bf16.assign((w.in + 31) / 32 * 32, at::BFloat16(0.f));
      to_bf16(x, w.in, input.bf16.data());
      return;
    }
    QuantizedRows& q = input.quantized;
    const int64_t groups = w.in / w.group;
    q.values.resize(w.in);
    q.scales.resize(groups);
    q.sums.resize(groups);
    for (int64_t g = 0; g < groups; ++g)
      q.sums[g] = quantize_group(x + g * w.group, w.group, w.bits == 8, q.values.data() + g * w.group, &q.scales[g]);
  }

  template <typename C>
  void run(const float* embedding, int64_t position, const int64_t* table, int64_t block_size, C* cache,
           float* scales, int64_t slots, float* logits) {
    const int nth = std::max(1, at::get_num_threads());
    parts_out_.resize(nth * cfg_.heads * cfg_.latent);
    parts_max_.resize(nth * cfg_.heads);
    parts_mass_.resize(nth * cfg_.heads);
    const size_t tickets = (16 * layers_.size() + 4) * nth;
    if (tickets_.size() < tickets) tickets_ = std::vector<std::atomic<int64_t>>(tickets);
    for (auto& ticket : tickets_) ticket.store(0, std::memory_order_relaxed);
#pragma omp parallel num_threads(nth)
    {
      const int tid = omp_get_thread_num(), threads = omp_get_num_threads();
      ThreadState s;
      s.x.assign(embedding, embedding + cfg_.hidden);
      s.normed.resize(cfg_.hidden);
      s.q_a.resize(q_a_out_.size());
      s.q_nope.resize(cfg_.heads * cfg_.nope);
      s.q_pe.resize(cfg_.heads * cfg_.rope);
      s.values.resize(cfg_.heads * cfg_.v_dim);
      s.act.resize((cfg_.top_k + 1) * gate_up_stride_ / 2);
      s.cos.resize(inv_freq_.size());
      s.sin.resize(inv_freq_.size());
      for (size_t i = 0; i < inv_freq_.size(); ++i) {
        const float angle = static_cast<float>(position) * inv_freq_[i];
        s.cos[i] = std::cos(angle);
        s.sin[i] = std::sin(angle);
      }
      const int64_t slot = table[position / block_size] * block_size + position % block_size;
      for (size_t i = 0; i < layers_.size(); ++i) {
        C* layer_cache = cache + i * slots * (cfg_.latent + cfg_.rope);
        float* layer_scales = scales == nullptr ? nullptr : scales + i * slots * 2;
        attention(layers_[i], s, tid, threads, position, table, block_size, layer_cache, layer_scales, slot);
        mlp(layers_[i], s, tid, threads);
      }
      rms_norm(s.x.data(), final_norm_, cfg_.rms_eps, s.normed.data());
      products({{&lm_head_, s.normed.data(), logits}}, s);
    }
  }

  template <typename C>
  void attention(const Layer& l, ThreadState& s, int tid, int nth, int64_t position, const int64_t* table,
                 int64_t block_size, C* cache, float* scales, int64_t slot) {
    const int64_t H = cfg_.heads, L = cfg_.latent, R = cfg_.rope;
    rms_norm(s.x.data(), l.input_norm, cfg_.rms_eps, s.normed.data());
    if (cfg_.q_lora) {
      products({{&l.q_a, s.normed.data(), q_a_out_.data()}, {&l.kv_a, s.normed.data(), kv_a_out_.data()}}, s);
#pragma omp barrier
      rms_norm(q_a_out_.data(), l.q_a_norm, cfg_.latent_eps, s.q_a.data());
      write_latent(l, cache, scales, slot, tid, s);
      products({{&l.q_b, s.q_a.data(), q_out_.data()}}, s);
    } else {
      products({{&l.q_b, s.normed.data(), q_out_.data()}, {&l.kv_a, s.normed.data(), kv_a_out_.data()}}, s);
#pragma omp barrier
      write_latent(l, cache, scales, slot, tid, s);
    }
#pragma omp barrier
    for (int64_t h = 0; h < H; ++h) {
      const float* q = q_out_.data() + h * q_stride_;
      std::copy(q, q + cfg_.nope, s.q_nope.begin() + h * cfg_.nope);
      rope(q + cfg_.nope, s.cos, s.sin, s.q_pe.data() + h * R);
    }
    std::vector<Product> absorb;
    for (int64_t h = 0; h < H; ++h) absorb.push_back({&l.w_uk[h], s.q_nope.data() + h * cfg_.nope, q_latent_.data() + h * uk_stride_});
    products(absorb, s);
#pragma omp barrier
    const int64_t seq_len = position + 1, blocks = (seq_len + block_size - 1) / block_size;
    if (blocks >= 2 * nth) {
      // Long context: each thread takes a run of blocks for all heads, so the cache is read
      // once; then each merges the parts of some heads.
      float* part = parts_out_.data() + tid * H * L;
      attend({0, H, blocks * tid / nth, blocks * (tid + 1) / nth, seq_len, block_size, table, part,
              parts_max_.data() + tid * H, parts_mass_.data() + tid * H}, s, cache, scales);
#pragma omp barrier
      merge_parts(H * tid / nth, H * (tid + 1) / nth, nth);
    } else {
      const int64_t h0 = H * tid / nth, h1 = H * (tid + 1) / nth;
      attend({h0, h1, 0, blocks, seq_len, block_size, table, attn_latent_.data() + h0 * L}, s, cache, scales);
    }
#pragma omp barrier
    std::vector<Product> values;
    for (int64_t h = 0; h < H; ++h) values.push_back({&l.w_uv[h], attn_latent_.data() + h * L, v_out_.data() + h * uv_stride_});
    products(values, s);
#pragma omp barrier
    for (int64_t h = 0; h < H; ++h)
      std::copy(v_out_.data() + h * uv_stride_, v_out_.data() + h * uv_stride_ + cfg_.v_dim, s.values.begin() + h * cfg_.v_dim);
    products({{&l.o_proj, s.values.data(), o_out_.data()}}, s);
#pragma omp barrier
    for (int64_t i = 0; i < cfg_.hidden; ++i) s.x[i] += o_out_[i];
  }

  // The new token's normed latent and roped key into its cache slot (thread 0; read only after
  // the barriers that follow).
  template <typename C>
  void write_latent(const Layer& l, C* cache, float* scales, int64_t slot, int tid, ThreadState& s) {
    if (tid != 0) return;
    const int64_t L = cfg_.latent, R = cfg_.rope;
    std::vector<float> entry(L + R);
    rms_norm(kv_a_out_.data(), l.kv_a_norm, cfg_.latent_eps, entry.data());
    rope(kv_a_out_.data() + L, s.cos, s.sin, entry.data() + L);
    C* dst = cache + slot * (L + R);
    if constexpr (std::is_same_v<C, int8_t>) {
      quantize_latent_part(entry.data(), L, dst, scales + 2 * slot);
      quantize_latent_part(entry.data() + L, R, dst + L, scales + 2 * slot + 1);
    } else {
      for (int64_t i = 0; i < L + R; ++i) dst[i] = static_cast<C>(entry[i]);
    }
  }

  // Heads attend over cached tokens (see AttendJob). q_latent_ holds each head's absorbed
  // query; the results are softmax-weighted latents.
  template <typename C>
  void attend(const AttendJob& job, ThreadState& s, const C* cache, const float* scales) {
    const int64_t L = cfg_.latent, D = L + cfg_.rope;
    if (job.h1 <= job.h0) return;
    if constexpr (std::is_same_v<C, int8_t>) {
      if (has_bf16_) return attend_blocks(job, s, Int8Blocks(cache, scales, job.block_size, D, L));
      attend_int8(job, s, cache, scales);
    } else {
      if constexpr (std::is_same_v<C, at::BFloat16>) {
        if (has_bf16_) return attend_blocks(job, s, Bf16Blocks{cache, job.block_size, D});
        return attend_fma(job, s, cache);
      }
      attend_generic(job, s, cache);
    }
  }

  // Attention over bfloat16 rows: on AMX tiles where the CPU has them, else on VDPBF16PS.
  template <typename Blocks>
  void attend_blocks(const AttendJob& job, ThreadState& s, Blocks blocks) {
    const int64_t L = cfg_.latent, D = L + cfg_.rope;
    if (!(use_amx_ && D % 32 == 0 && job.block_size % 32 == 0)) return attend_bf16(job, s, blocks);
    for (int64_t h = job.h0; h < job.h1; h += 32) {  // the tiles hold two groups of 16 heads
      AttendJob part = job;
      part.h0 = h, part.h1 = std::min(job.h1, h + 32), part.out = job.out + (h - job.h0) * L;
      if (job.max != nullptr) part.max = job.max + (h - job.h0), part.mass = job.mass + (h - job.h0);
      attend_amx(part, s, blocks);
    }
  }

  // out[h] = softmax-weighted latents of head h over the whole context, from the threads' parts
  void merge_parts(int64_t h0, int64_t h1, int nth) {
    const int64_t H = cfg_.heads, L = cfg_.latent;
    for (int64_t h = h0; h < h1; ++h) {
      float top = -std::numeric_limits<float>::infinity();
      for (int t = 0; t < nth; ++t) top = std::max(top, parts_max_[t * H + h]);
      float mass = 0.f;
      float* out = attn_latent_.data() + h * L;
      std::fill(out, out + L, 0.f);
      for (int t = 0; t < nth; ++t) {
        const float share = std::exp(parts_max_[t * H + h] - top);
        mass += share * parts_mass_[t * H + h];
        const float* part = parts_out_.data() + (t * H + h) * L;
        for (int64_t i = 0; i < L; ++i) out[i] += share * part[i];
      }
      for (int64_t i = 0; i < L; ++i) out[i] /= mass;
    }
  }

  template <typename C>
  void attend_generic(const AttendJob& job, ThreadState& s, const C* cache) {
    const int64_t L = cfg_.latent, D = L + cfg_.rope, n = job.h1 - job.h0, block_size = job.block_size;
    const std::vector<float> queries = scaled_queries(job.h0, n, s);
    OnlineSoftmax softmax(n, L, job.out);
    s.attn_scores.resize(n * block_size);
    std::vector<float> rows(kTokens * D);
    for (int64_t b = job.first_block; b < job.last_block; ++b) {
      const int64_t count = job.count(b);
      const C* block = cache + job.table[b] * block_size * D;
      float* scores = s.attn_scores.data();  // [head][token of this block]
      for (int64_t t = 0; t < count; t += kTokens) {
        const int64_t m = std::min<int64_t>(kTokens, count - t);
        for (int64_t i = 0; i < m * D; ++i) rows[i] = static_cast<float>(block[t * D + i]);
        for (int64_t i = m * D; i < kTokens * D; ++i) rows[i] = 0.f;
        for (int64_t h = 0; h < n; ++h) {
          float dots[kTokens];
          dot_rows<kTokens>(queries.data() + h * D, rows.data(), D, dots);
          for (int64_t k = 0; k < m; ++k) scores[h * block_size + t + k] = dots[k];
        }
      }
      softmax.block(scores, block_size, count);
      for_head_groups(n, [&](auto heads, int64_t h) {
        accumulate_values<decltype(heads)::value>(block, count, L, D, scores + h * block_size, block_size, job.out + h * L);
      });
    }
    softmax.end(job.max, job.mass);
  }

  // attend in float32 FMAs over a bfloat16 cache (see fma_scores / fma_values): the AVX2 form,
  // and AVX-512 CPUs without AVX512_BF16
  void attend_fma(const AttendJob& job, ThreadState& s, const at::BFloat16* cache) {
    const int64_t L = cfg_.latent, D = L + cfg_.rope, n = job.h1 - job.h0, block_size = job.block_size;
    const int64_t s_stride = (block_size + kPiece - 1) / kPiece * kPiece;
    const std::vector<float> queries = scaled_queries(job.h0, n, s);
    OnlineSoftmax softmax(n, L, job.out);
    s.attn_scores.resize(n * s_stride);
    AlignedVector<at::BFloat16> packed(D * kPiece);
    for (int64_t b = job.first_block; b < job.last_block; ++b) {
      const int64_t count = job.count(b);
      const at::BFloat16* block = cache + job.table[b] * block_size * D;
      float* scores = s.attn_scores.data();  // [head][token of this block]
      for (int64_t t = 0; t < count; t += kPiece) {
        const at::BFloat16* rows[kPiece];
        for (int k = 0; k < kPiece; ++k) rows[k] = t + k < count ? block + (t + k) * D : nullptr;
        pack_piece(rows, D, packed.data());
        for_head_groups<kFmaHeads>(n, [&](auto heads, int64_t h) {
          fma_scores<decltype(heads)::value>(queries.data() + h * D, packed.data(), D, scores + h * s_stride + t, s_stride);
        });
      }
      softmax.block(scores, s_stride, count);
      const bool last = b + 1 == job.last_block;
      LinePrefetch ahead(last ? nullptr : cache + job.table[b + 1] * block_size * D, last ? 0 : job.count(b + 1) * D * 2,
                         L / 16 * ((n + kFmaHeads - 1) / kFmaHeads));
      for_head_groups<kFmaHeads>(n, [&](auto heads, int64_t h) {
        fma_values<decltype(heads)::value>(block, count, D, L, scores + h * s_stride, s_stride, job.out + h * L, ahead);
      });
    }
    for (int64_t h = 0; h < n; ++h) unpermute_fma(job.out + h * L, L);  // linear: fine before normalizing
    softmax.end(job.max, job.mass);
  }

  // attend in 16-bit integers over an int8 cache (see int8_scores / int8_values): the AVX2 form,
  // and AVX-512 CPUs without AVX512_BF16
  void attend_int8(const AttendJob& job, ThreadState& s, const int8_t* cache, const float* scales) {
    const int64_t L = cfg_.latent, D = L + cfg_.rope, n = job.h1 - job.h0, block_size = job.block_size;
    const int64_t s_stride = (block_size + kPiece - 1) / kPiece * kPiece, w_stride = (block_size + 1) / 2 * 2;
    const std::vector<float> scaled = scaled_queries(job.h0, n, s);
    AlignedVector<int16_t> queries(n * D);
    std::vector<float> q_scales(2 * n);
    for (int64_t h = 0; h < n; ++h) {
      q_scales[2 * h] = quantize_row(scaled.data() + h * D, L, int16_levels(L), queries.data() + h * D);
      q_scales[2 * h + 1] = quantize_row(scaled.data() + h * D + L, D - L, int16_levels(D - L), queries.data() + h * D + L);
    }
    OnlineSoftmax softmax(n, L, job.out);
    s.attn_scores.resize(n * s_stride);
    AlignedVector<int16_t> packed(D * kPiece), paired(w_stride * 16), weights(n * w_stride, 0);
    std::vector<float> w_scales(n);
    for (int64_t b = job.first_block; b < job.last_block; ++b) {
      const int64_t count = job.count(b), first_slot = job.table[b] * block_size;
      const int8_t* block = cache + first_slot * D;
      const float* block_scales = scales + 2 * first_slot;  // [token][latent, rope]
      float* scores = s.attn_scores.data();  // [head][token of this block]
      for (int64_t t = 0; t < count; t += kPiece) {
        const int8_t* rows[kPiece];
        float row_scales[2 * kPiece];
        for (int k = 0; k < kPiece; ++k) {
          const bool live = t + k < count;
          rows[k] = live ? block + (t + k) * D : nullptr;
          row_scales[k] = live ? block_scales[2 * (t + k)] : 0.f;
          row_scales[kPiece + k] = live ? block_scales[2 * (t + k) + 1] : 0.f;
        }
        pack_int8_piece(rows, D, packed.data());
        for_head_groups<kInt8Heads>(n, [&](auto heads, int64_t h) {
          int8_scores<decltype(heads)::value>(queries.data() + h * D, q_scales.data() + 2 * h, packed.data(), D, L, row_scales,
                                              scores + h * s_stride + t, s_stride);
        });
      }
      softmax.block(scores, s_stride, count);
      for (int64_t h = 0; h < n; ++h) {  // probability times latent scale, as int16
        float* p = scores + h * s_stride;
        for (int64_t t = 0; t < count; ++t) p[t] *= block_scales[2 * t];
        w_scales[h] = quantize_row(p, count, int16_levels(block_size), weights.data() + h * w_stride);
        if (count % 2) weights[h * w_stride + count] = 0;
      }
      const bool last = b + 1 == job.last_block;
      LinePrefetch ahead(last ? nullptr : cache + job.table[b + 1] * block_size * D, last ? 0 : job.count(b + 1) * D,
                         L / 16 * ((n + kInt8Heads - 1) / kInt8Heads));
      for (int64_t i = 0; i < L; i += 16) {
        pair_latents(block, count, D, i, paired.data());
        for_head_groups<kInt8Heads>(n, [&](auto heads, int64_t h) {
          ahead.step();
          int8_values<decltype(heads)::value>(paired.data(), count, weights.data() + h * w_stride, w_stride, w_scales.data() + h,
                                              job.out + h * L + i, L);
        });
      }
    }
    softmax.end(job.max, job.mass);
  }

  // Queries of heads [h0, h0 + n) with the scale folded in, laid out [head][latent | rope] like
  // a cache row.
  std::vector<float> scaled_queries(int64_t h0, int64_t n, const ThreadState& s) const {
    const int64_t L = cfg_.latent, R = cfg_.rope, D = L + R;
    const float scale = static_cast<float>(cfg_.softmax_scale);
    std::vector<float> queries(n * D);
    for (int64_t h = 0; h < n; ++h) {
      for (int64_t i = 0; i < L; ++i) queries[h * D + i] = q_latent_[(h0 + h) * uk_stride_ + i] * scale;
      for (int64_t i = 0; i < R; ++i) queries[h * D + L + i] = s.q_pe[(h0 + h) * R + i] * scale;
    }
    return queries;
  }

  // fn(std::integral_constant<int, H>, first head) for groups of up to Most of n heads
  template <int Most = kHeads, typename Fn>
  static void for_head_groups(int64_t n, Fn fn) {
    for (int64_t h = 0; h < n; h += Most) with_heads<Most>(std::min<int64_t>(Most, n - h), h, fn);
  }

  // fn(std::integral_constant<int, m>, h) for a run-time m <= H
  template <int H, typename Fn>
  static void with_heads(int64_t m, int64_t h, Fn& fn) {
    if constexpr (H > 1) {
      if (m < H) return with_heads<H - 1>(m, h, fn);
    }
    fn(std::integral_constant<int, H>{}, h);
  }

  // attend on AMX tiles (bfloat16 cache), at most 32 heads (see amx_scores / amx_values)
  template <typename Blocks>
  GLMCODE_AMX void attend_amx(const AttendJob& job, ThreadState& s, Blocks& blocks) {
    const int64_t L = cfg_.latent, D = L + cfg_.rope, n = job.h1 - job.h0, block_size = job.block_size;
    const HeadGroups groups(n);
    const std::vector<float> queries = scaled_queries(job.h0, n, s);
    AlignedVector<at::BFloat16> pairs(2 * D / 32 * 16 * kPairLine);
    at::BFloat16* pairs1 = pairs.data() + D / 32 * 16 * kPairLine;
    query_pairs(queries.data(), groups.n0, D, pairs.data());
    query_pairs(queries.data() + groups.n0 * D, groups.n1, D, pairs1);
    OnlineSoftmax softmax(n, L, job.out);
    s.attn_scores.resize(n * block_size);
    const int64_t p_stride = block_size + 32;
    AlignedVector<at::BFloat16> weights(n * p_stride, at::BFloat16(0.f));
    const TileConfig scoring = score_tiles(groups), weighing = value_tiles(groups);
    for (int64_t b = job.first_block; b < job.last_block; ++b) {
      const int64_t count = job.count(b), padded = (count + 31) / 32 * 32;
      const at::BFloat16* block = blocks.rows(job.table[b], count);
      float* scores = s.attn_scores.data();
      _tile_loadconfig(&scoring);
      amx_scores(block, count, D, groups, pairs.data(), pairs1, scores, block_size);
      softmax.block(scores, block_size, count);
      for (int64_t h = 0; h < n; ++h) {
        at::BFloat16* row = weights.data() + h * p_stride;
        to_bf16(scores + h * block_size, count, row);
        std::fill(row + count, row + padded, at::BFloat16(0.f));
      }
      const bool last = b + 1 == job.last_block;
      LinePrefetch ahead(last ? nullptr : blocks.stored(job.table[b + 1]), last ? 0 : blocks.stored_bytes(job.count(b + 1)),
                         L / 16 * (padded / 32));
      _tile_loadconfig(&weighing);
      amx_values(block, count, D, L, weights.data(), p_stride, groups, job.out, ahead);
    }
    _tile_release();
    softmax.end(job.max, job.mass);
  }

  // attend on VDPBF16PS (bfloat16 cache; see bf16_scores / bf16_values)
  template <typename Blocks>
  GLMCODE_BF16 void attend_bf16(const AttendJob& job, ThreadState& s, Blocks& blocks) {
    const int64_t L = cfg_.latent, D = L + cfg_.rope, n = job.h1 - job.h0, padded = (D + 31) / 32 * 32;
    const int64_t block_size = job.block_size;
    const std::vector<float> scaled = scaled_queries(job.h0, n, s);
    std::vector<at::BFloat16> queries(n * padded, at::BFloat16(0.f));
    for (int64_t h = 0; h < n; ++h) to_bf16(scaled.data() + h * D, D, queries.data() + h * padded);
    float* out = job.out;
    OnlineSoftmax softmax(n, L, out);
    s.attn_scores.resize(n * block_size);
    const int64_t p_stride = block_size + 2;  // room for the zero that pairs an odd last token
    std::vector<at::BFloat16> weights(n * p_stride, at::BFloat16(0.f));
    for (int64_t b = job.first_block; b < job.last_block; ++b) {
      const int64_t count = job.count(b);
      const at::BFloat16* block = blocks.rows(job.table[b], count);
      float* scores = s.attn_scores.data();
      for_head_groups(n, [&](auto heads, int64_t h) {
        bf16_scores<decltype(heads)::value>(queries.data() + h * padded, padded, block, count, D, scores + h * block_size, block_size);
      });
      softmax.block(scores, block_size, count);
      for (int64_t h = 0; h < n; ++h) {
        to_bf16(scores + h * block_size, count, weights.data() + h * p_stride);
        weights[h * p_stride + count] = at::BFloat16(0.f);
      }
      const bool last = b + 1 == job.last_block;
      LinePrefetch ahead(last ? nullptr : blocks.stored(job.table[b + 1]), last ? 0 : blocks.stored_bytes(job.count(b + 1)),
                         L / 32 * ((n + kHeads - 1) / kHeads));
      for_head_groups(n, [&](auto heads, int64_t h) {
        bf16_values<decltype(heads)::value>(block, count, D, L, weights.data() + h * p_stride, p_stride, out + h * L, ahead);
      });
    }
    for (int64_t h = 0; h < n; ++h) unpermute(out + h * L, L);  // linear: fine before normalizing
    softmax.end(job.max, job.mass);
  }


  void mlp(const Layer& l, ThreadState& s, int tid, int nth) {
    rms_norm(s.x.data(), l.post_norm, cfg_.rms_eps, s.normed.data());
    if (l.dense) {
      gated(l.gate_up, l.down, s);
      return;
    }
    const int64_t E = cfg_.experts;
    // router: float32 weights, a product the threads split by rows
    const int64_t rows_per_thread = (E + nth - 1) / nth;
    for (int64_t e = tid * rows_per_thread; e < std::min(E, (tid + 1) * rows_per_thread); ++e) {
      const float* w = l.router + e * cfg_.hidden;
      router_out_[e] = dot(w, s.normed.data(), cfg_.hidden);
    }
#pragma omp barrier
    std::vector<int64_t> chosen;
    std::vector<float> weights;
    route(l, chosen, weights);
    // the chosen experts and the shared one, as one gate_up phase and one down phase
    std::vector<Product> up;
    for (size_t r = 0; r < chosen.size(); ++r) up.push_back({&l.expert_gate_up[chosen[r]], s.normed.data(), gate_up_out_.data() + r * gate_up_stride_});
    up.push_back({&l.gate_up, s.normed.data(), gate_up_out_.data() + chosen.size() * gate_up_stride_});
    products(up, s);
#pragma omp barrier
    std::vector<Product> down;
    for (size_t r = 0; r < up.size(); ++r) {
      const Linear& d = r < chosen.size() ? l.expert_down[chosen[r]] : l.down;
      float* act = s.act.data() + r * (gate_up_stride_ / 2);
      const float* gate = gate_up_out_.data() + r * gate_up_stride_;
      silu_mul(gate, gate + d.in, d.in, act);
      down.push_back({&d, act, down_out_.data() + r * down_stride_});
    }
    products(down, s);
#pragma omp barrier
    weights.push_back(1.f);  // the shared expert
    for (size_t r = 0; r < down.size(); ++r) {
      const float* y = down_out_.data() + r * down_stride_;
      for (int64_t i = 0; i < cfg_.hidden; ++i) s.x[i] += weights[r] * y[i];
    }
  }

  // x += down(silu(gate) * up) of normed x
  void gated(const Linear& gate_up, const Linear& down, ThreadState& s) {
    products({{&gate_up, s.normed.data(), gate_up_out_.data()}}, s);
#pragma omp barrier
    silu_mul(gate_up_out_.data(), gate_up_out_.data() + down.in, down.in, s.act.data());
    products({{&down, s.act.data(), down_out_.data()}}, s);
#pragma omp barrier
    for (int64_t i = 0; i < cfg_.hidden; ++i) s.x[i] += down_out_[i];
  }

  // The sigmoid router's choice (see moe.Router), from router_out_.
  void route(const Layer& l, std::vector<int64_t>& chosen, std::vector<float>& weights) const {
    const int64_t E = cfg_.experts;
    std::vector<float> scores(E), choice(E);
    for (int64_t e = 0; e < E; ++e) {
      scores[e] = 1.f / (1.f + std::exp(-router_out_[e]));
      choice[e] = scores[e] + l.router_bias[e];
    }
    if (cfg_.n_group > 1) {
      const int64_t per_group = E / cfg_.n_group;
      std::vector<std::pair<float, int64_t>> groups;
      for (int64_t g = 0; g < cfg_.n_group; ++g) {
        std::vector<float> members(choice.begin() + g * per_group, choice.begin() + (g + 1) * per_group);
        std::partial_sort(members.begin(), members.begin() + 2, members.end(), std::greater<float>());
        groups.push_back({members[0] + members[1], g});
      }
      std::partial_sort(groups.begin(), groups.begin() + cfg_.topk_group, groups.end(), std::greater<>());
      std::vector<bool> keep(cfg_.n_group, false);
      for (int64_t i = 0; i < cfg_.topk_group; ++i) keep[groups[i].second] = true;
      for (int64_t e = 0; e < E; ++e)
        if (!keep[e / per_group]) choice[e] = -std::numeric_limits<float>::infinity();
    }
    std::vector<int64_t> order(E);
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + cfg_.top_k, order.end(),
                      [&](int64_t a, int64_t b) { return choice[a] > choice[b] || (choice[a] == choice[b] && a < b); });
    chosen.assign(order.begin(), order.begin() + cfg_.top_k);
    float total = 0.f;
    for (int64_t e : chosen) total += scores[e];
    for (int64_t e : chosen) {
      const float w = cfg_.normalize ? scores[e] / (total + 1e-20f) : scores[e];
      weights.push_back(w * static_cast<float>(cfg_.routed_scaling));
    }
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(glmcode_cpu, m) {
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>>())
      .def("step", &DecodePlan::step);
}
