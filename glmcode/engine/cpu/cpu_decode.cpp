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
//   block with an online softmax (the kernels: cpu_decode_attention.h); over a long context the
//   threads split the blocks instead (each then reads its part of the cache once, for all heads)
//   and merge their parts.
//
// Each product's outputs are computed by exactly one thread with the same code whatever the
// thread count; only the merge of long-context attention parts depends on it (float rounding).
// Activations stay float32 throughout.
#include "cpu_decode_attention.h"
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

// Quantizes one part of a cache row as quant/latent_cache.quantize_latent does (the same float32
// operations, so the same bits): a symmetric scale from the part's largest magnitude.
inline void quantize_latent_part(const float* x, int64_t n, int8_t* out, float* scale) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  *scale = std::max(amax, 1e-12f) / 127.0f;
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<int8_t>(std::clamp(std::nearbyint(x[i] / *scale), -127.f, 127.f));
}

// One attention call: heads [h0, h1) over the cache blocks [first_block, last_block) of a
// sequence of seq_len tokens, into out [heads][latent] (max and mass: see OnlineSoftmax::end).
struct AttendJob {
  int64_t h0, h1, first_block, last_block, seq_len, block_size;
  const int64_t* table;
  float* out;
  float* max = nullptr;
  float* mass = nullptr;

  int64_t count(int64_t block) const { return std::min(block_size, seq_len - block * block_size); }

  // The prefetch of the block after `block` (nothing after the last) from a cache of row_bytes a
  // token, spread over `steps` (see LinePrefetch)
  LinePrefetch prefetch_after(int64_t block, const void* cache, int64_t row_bytes, int64_t steps) const {
    if (block + 1 == last_block) return LinePrefetch(nullptr, 0, steps);
    return LinePrefetch(static_cast<const char*>(cache) + table[block + 1] * block_size * row_bytes, count(block + 1) * row_bytes,
                        steps);
  }
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
        for_head_groups<kAvx2Heads>(n, [&](auto heads, int64_t h) {
          fma_scores<decltype(heads)::value>(queries.data() + h * D, packed.data(), D, scores + h * s_stride + t, s_stride);
        });
      }
      softmax.block(scores, s_stride, count);
      LinePrefetch ahead = job.prefetch_after(b, cache, D * 2, L / 16 * ((n + kAvx2Heads - 1) / kAvx2Heads));
      for_head_groups<kAvx2Heads>(n, [&](auto heads, int64_t h) {
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
        for_head_groups<kAvx2Heads>(n, [&](auto heads, int64_t h) {
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
      LinePrefetch ahead = job.prefetch_after(b, cache, D, L / 16 * ((n + kAvx2Heads - 1) / kAvx2Heads));
      for (int64_t i = 0; i < L; i += 16) {
        pair_latents(block, count, D, i, paired.data());
        for_head_groups<kAvx2Heads>(n, [&](auto heads, int64_t h) {
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
      LinePrefetch ahead = job.prefetch_after(b, blocks.cache, blocks.row_bytes(), L / 16 * (padded / 32));
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
      LinePrefetch ahead = job.prefetch_after(b, blocks.cache, blocks.row_bytes(), L / 32 * ((n + kHeads - 1) / kHeads));
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
