// Products of many activation rows with int4 / int8 weights on AMX-INT8 tiles: the projections
// of a prefill chunk, and a chunk's routed experts grouped by expert.
//
// The weights stay in the tile layout the matrix-vector kernels read (cpu_quant.cpp), because
// AMX's B operand is that layout: a tile of 16 lines of 64 bytes holds 4 consecutive inputs of
// 16 output rows per line, which is one 64-byte vector of the int8 layout as stored, and the
// low or the high nibbles of one vector of the int4 layout. So int8 tiles are loaded where they
// lie, and int4 ones are unpacked (an AND, or a shift and an AND, per 64 weights) into a small
// per-thread panel: there is never a second copy of the weights.
//
// Activations are quantized to int8 per row and group of inputs exactly as for the
// matrix-vector kernels, so both compute the same integer dot product per group. The tile
// products (TDPBSUD / TDPBSSD: int8 x uint8 / int8 -> int32, 16 x 16 outputs over 64 inputs)
// sum one group at a time, and each group's sums are scaled into float accumulators:
//   int4: y += xs * (s * dot + (z - 8 s) * xsum)   (w = (q - 8) s + z, q unsigned 0..15)
//   int8: y += xs * dot, times the weight row's scale at the end.
//
// A pass covers a "panel" of up to two weight tiles (32 outputs) and up to 32 activation rows:
// tiles 0-3 accumulate the 2 x 2 blocks of outputs, 4-5 hold activations, 6-7 weights.
#include "cpu_kernels.h"

#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>

namespace glmcode_cpu {
namespace {

#define GLMCODE_AMX_INT8 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-int8")))

std::atomic<bool> amx_turned_on{true};

// Whether the CPU has AMX-INT8 and this build the kernels for it (see below).
bool amx_int8_present() {
#if defined(__AVX512F__)
  return amx_support().int8;
#else
  return false;
#endif
}

constexpr int64_t kStep = 64;         // inputs per tile product
constexpr int64_t kTileBytes = 1024;  // 16 lines of 64 bytes
constexpr int64_t kBlockRows = 32;    // activation rows per pass (two A tiles)
// groups whose tile sums are added to a block's float accumulators at once: each accumulator
// row is loaded and stored once per four groups instead of once per group (~10% faster products)
constexpr int64_t kChunk = 4;

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// One weight matrix in the tile layout of cpu_quant.cpp.
struct Weights {
  int bits = 4;
  int64_t tiles = 0, in = 0, group = 0;
  const uint8_t* packed = nullptr;
  const at::BFloat16* scales4 = nullptr;  // int4: [tiles, in / group, 16]
  const at::BFloat16* zeros = nullptr;
  const float* scales8 = nullptr;  // int8: [tiles * 16]
  const int32_t* sums = nullptr;   // int8: [tiles, in / group, 16] (for the vector kernel)

  int64_t groups() const { return in / group; }
  int64_t panels() const { return (tiles + 1) / 2; }
  const uint8_t* tile(int64_t t) const { return packed + t * in * bits / 8 * kTile; }
};

// Matrix `index` of weights stacked [matrices, tiles, ...] (or the only one: index 0).
Weights stacked_weights(int bits, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros_or_sums,
                        int64_t group, int64_t index) {
  Weights w;
  const int64_t dims = packed.dim();
  w.bits = bits, w.group = group;
  w.tiles = packed.size(dims - 3);
  w.in = packed.size(dims - 2) * 64 * 8 / bits / kTile;
  const int64_t groups = w.tiles * w.groups() * kTile;
  w.packed = static_cast<const uint8_t*>(packed.data_ptr()) + index * w.tiles * w.in * bits / 8 * kTile;
  if (bits == 4) {
    w.scales4 = scales.data_ptr<at::BFloat16>() + index * groups;
    w.zeros = zeros_or_sums.data_ptr<at::BFloat16>() + index * groups;
  } else {
    w.scales8 = scales.data_ptr<float>() + index * w.tiles * kTile;
    w.sums = zeros_or_sums.data_ptr<int32_t>() + index * groups;
  }
  return w;
}

// What one thread keeps between passes.
struct Scratch {
  AlignedVector<uint8_t> unpacked;  // int4: [2 tiles][K / 64][1 KB], the panel's B tiles
  std::vector<float> scale, bias;  // int4: [2 tiles][groups][16]: s and z - 8 s
  alignas(64) int32_t dots[2 * kChunk][4][kTile * kTile];  // two chunks' tile sums: one stored while one is added
  alignas(64) float acc[4][kTile * kTile];
};

// Rows of int8 activations [M, K] in whole blocks of 16 rows, rearranged for AMX: in each
// block, the 16 x 64 values of each step are one contiguous kilobyte (an A operand). Left as
// rows, a tile load reads 16 lines K bytes apart, which fall into the same few L1 sets.
void to_tiles(AlignedVector<int8_t>& values, int64_t K) {
  const int64_t blocks = static_cast<int64_t>(values.size()) / (kTile * K), steps = K / kStep;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> block(kTile * K);
    for (int64_t b = begin; b < end; ++b) {
      int8_t* rows = values.data() + b * kTile * K;
      std::copy_n(rows, kTile * K, block.data());
      for (int64_t r = 0; r < kTile; ++r)
        for (int64_t step = 0; step < steps; ++step)
          std::memcpy(rows + step * kTileBytes + r * kStep, block.data() + r * K + step * kStep, kStep);
    }
  });
}

// Activation rows of a product: `count` rows from `first` of q (whose buffers hold whole
// 16-row blocks past them, zero; for AMX in tiles, see to_tiles).
struct Rows {
  const QuantizedRows& q;
  const float* offsets;  // int4 on AMX: xs * xsum of each row and group
  int64_t first, count;
};

// q's xs * xsum per row and group (the int4 zero-point term's activation factor).
void offsets_of(const QuantizedRows& q, std::vector<float>& out) {
  out.resize(q.scales.size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = q.scales[i] * static_cast<float>(q.sums[i]);
}

// The AMX-INT8 kernels. They are compiled for AMX by their target attribute, but they use
// cpu_kernels_avx512.h too, so the AVX2 build of the extension leaves them out.
#if defined(__AVX512F__)

// The per-group scales of the int4 panel of tiles [t, t + n) as floats: s and z - 8 s.
GLMCODE_AMX_INT8 void panel_scales(const Weights& w, int64_t t, int n, Scratch& s) {
  const int64_t G = w.groups();
  s.scale.resize(2 * G * kTile);
  s.bias.resize(2 * G * kTile);
  for (int j = 0; j < n; ++j) {
    const at::BFloat16* scales = w.scales4 + (t + j) * G * kTile;
    const at::BFloat16* zeros = w.zeros + (t + j) * G * kTile;
    for (int64_t g = 0; g < G; ++g) {
      const __m512 sv = load_bf16(scales + g * kTile), zv = load_bf16(zeros + g * kTile);
      _mm512_storeu_ps(s.scale.data() + (j * G + g) * kTile, sv);
      _mm512_storeu_ps(s.bias.data() + (j * G + g) * kTile, _mm512_fnmadd_ps(_mm512_set1_ps(8.f), sv, zv));
    }
  }
}

// Group g of int4 tile t as B tiles (group / 64 of them) at dst. Packed vector b holds inputs
// 8b..8b+7: its low nibbles are line 2b of the B operand, its high ones line 2b + 1.
GLMCODE_AMX_INT8 inline void unpack_group(const Weights& w, int64_t t, int64_t g, uint8_t* dst) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  const uint8_t* src = w.tile(t) + g * (w.group / 8) * 64;
  for (int64_t b = 0; b < w.group / 8; ++b) {
    prefetch(src + b * 64);
    const __m512i v = _mm512_loadu_si512(src + b * 64);
    _mm512_storeu_si512(dst + 2 * b * 64, _mm512_and_si512(v, low));
    _mm512_storeu_si512(dst + (2 * b + 1) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
  }
}

GLMCODE_AMX_INT8 inline void store_out(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }
GLMCODE_AMX_INT8 inline void store_out(at::BFloat16* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
}

// One 32-row pass of a panel: the tile products of group g into the four accumulator tiles.
template <int Bits>
GLMCODE_AMX_INT8 inline void multiply_group(const int8_t* a0, const int8_t* a1, const int8_t* b0, const int8_t* b1,
                                            int64_t g, int64_t per_group, bool two_m, bool two_n) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t step = g * per_group; step < (g + 1) * per_group; ++step) {
    // the next step's activations (from L2) and int8 weights (read where they lie, from memory);
    // the weight tiles are loaded with the streaming hint, which keeps them from evicting the
    // activations from L1 (measured 3-4% faster on the dense products, the same on the experts)
    for (int64_t line = 0; line < kTileBytes; line += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(a0 + (step + 1) * kTileBytes + line), _MM_HINT_T0);
      if (two_m) _mm_prefetch(reinterpret_cast<const char*>(a1 + (step + 1) * kTileBytes + line), _MM_HINT_T0);
      if constexpr (Bits == 8) {
        prefetch(b0 + step * kTileBytes + line);
        if (two_n) prefetch(b1 + step * kTileBytes + line);
      }
    }
    _tile_loadd(4, a0 + step * kTileBytes, 64);
    _tile_stream_loadd(6, b0 + step * kTileBytes, 64);
    if constexpr (Bits == 4) _tile_dpbsud(0, 4, 6); else _tile_dpbssd(0, 4, 6);
    if (two_n) {
      _tile_stream_loadd(7, b1 + step * kTileBytes, 64);
      if constexpr (Bits == 4) _tile_dpbsud(1, 4, 7); else _tile_dpbssd(1, 4, 7);
    }
    if (two_m) {
      _tile_loadd(5, a1 + step * kTileBytes, 64);
      if constexpr (Bits == 4) _tile_dpbsud(2, 5, 6); else _tile_dpbssd(2, 5, 6);
      if (two_n) {
        if constexpr (Bits == 4) _tile_dpbsud(3, 5, 7); else _tile_dpbssd(3, 5, 7);
      }
    }
  }
}

GLMCODE_AMX_INT8 inline void store_group(int32_t (*dots)[kTile * kTile], bool two_m, bool two_n) {
  _tile_stored(0, dots[0], 64);
  if (two_n) _tile_stored(1, dots[1], 64);
  if (two_m) {
    _tile_stored(2, dots[2], 64);
    if (two_n) _tile_stored(3, dots[3], 64);
  }
}

// y[r, 16 j ..] = x[r] . w[16 (t + j) ..] for the panel of tiles [t, t + n) (n = 1 or 2) and
// every row r of x; y points at the panel's first output of row 0, lines ldy apart.
//
// The passes are software-pipelined so that the tile unit and the vector units work at once:
// group g + 1's tile products are issued before group g's sums are scaled into the float
// accumulators, and (in the first pass, which unpacks the int4 weights for the later ones) group
// g + 2 is unpacked while they run.
template <int Bits, typename Out>
GLMCODE_AMX_INT8 void panel(const Weights& w, int64_t t, int n, const Rows& x, Out* y, int64_t ldy, Scratch& s) {
  const int64_t K = w.in, G = w.groups(), per_group = w.group / kStep, steps = K / kStep;
  const int8_t* b0;
  const int8_t* b1;
  if constexpr (Bits == 4) {
    s.unpacked.resize(2 * steps * kTileBytes);
    panel_scales(w, t, n, s);
    b0 = reinterpret_cast<const int8_t*>(s.unpacked.data());
    b1 = b0 + steps * kTileBytes;
  } else {
    b0 = reinterpret_cast<const int8_t*>(w.tile(t));
    b1 = reinterpret_cast<const int8_t*>(w.tile(t + n - 1));
  }
  const bool two_n = n == 2;
  auto unpack = [&](int64_t g) {
    if constexpr (Bits == 4) {
      if (g >= G) return;
      unpack_group(w, t, g, s.unpacked.data() + g * per_group * kTileBytes);
      if (two_n) unpack_group(w, t + 1, g, s.unpacked.data() + (steps + g * per_group) * kTileBytes);
    }
  };
  for (int64_t m0 = 0; m0 < x.count; m0 += kBlockRows) {
    const int64_t valid = std::min(kBlockRows, x.count - m0);
    const bool two_m = valid > kTile, first_pass = m0 == 0;
    const int8_t* a0 = x.q.values.data() + (x.first + m0) * K;
    const int8_t* a1 = a0 + kTile * K;
    const int64_t row0 = (x.first + m0) * G;
    // locals, so that the stores into the accumulators do not make the compiler reload them
    const float* __restrict row_scales = x.q.scales.data() + row0;
    const float* __restrict row_offsets = Bits == 4 ? x.offsets + row0 : nullptr;
    if (first_pass) {
      unpack(0);
      unpack(1);
    }
    // chunk k's sums (groups [k C, k C + C)) into block b's float accumulators (chunk 0 starts them)
    const float* __restrict scales = s.scale.data();
    const float* __restrict biases = s.bias.data();
    auto add_chunk = [&](int b, int64_t k) {
      const int i = b / n, j = b % n;
      const int64_t rows = std::min<int64_t>(kTile, valid - i * kTile), g0 = k * kChunk, count = std::min(G - g0, kChunk);
      float* __restrict acc = s.acc[2 * i + j];
      // the chunk's tile sums, and (int4) its weight scales and biases in registers over the rows
      // (~12% faster int4 products than loading them again for every row)
      const int32_t* dots[kChunk];
      __m512 sv[kChunk], bv[kChunk];
      for (int64_t c = 0; c < count; ++c) {
        dots[c] = s.dots[(g0 + c) % (2 * kChunk)][2 * i + j];
        if constexpr (Bits == 4) {
          sv[c] = _mm512_loadu_ps(scales + (j * G + g0 + c) * kTile);
          bv[c] = _mm512_loadu_ps(biases + (j * G + g0 + c) * kTile);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t m = (i * kTile + r) * G + g0;
        __m512 a = k == 0 ? _mm512_setzero_ps() : _mm512_load_ps(acc + r * kTile);
        for (int64_t c = 0; c < count; ++c) {
          const __m512 dot = _mm512_cvtepi32_ps(_mm512_load_si512(dots[c] + r * kTile));
          if constexpr (Bits == 4) {
            a = _mm512_fmadd_ps(dot, _mm512_mul_ps(sv[c], _mm512_set1_ps(row_scales[m + c])), a);
            a = _mm512_fmadd_ps(bv[c], _mm512_set1_ps(row_offsets[m + c]), a);
          } else {
            a = _mm512_fmadd_ps(dot, _mm512_set1_ps(row_scales[m + c]), a);
          }
        }
        _mm512_store_ps(acc + r * kTile, a);
      }
    };
    const int blocks = (two_m ? 2 : 1) * n;
    int64_t added[4] = {0, 0, 0, 0};  // chunks added, per block
    multiply_group<Bits>(a0, a1, b0, b1, 0, per_group, two_m, two_n);
    for (int64_t g = 0; g < G; ++g) {
      store_group(s.dots[g % (2 * kChunk)], two_m, two_n);
      if (g + 1 < G) multiply_group<Bits>(a0, a1, b0, b1, g + 1, per_group, two_m, two_n);
      if (first_pass) unpack(g + 2);
      // each block takes its turn once every kChunk groups, so the work is spread
      const int64_t complete = (g + 1) / kChunk;
      for (int b = static_cast<int>(g % kChunk); b < blocks; b += kChunk)
        while (added[b] < complete) add_chunk(b, added[b]++);
    }
    for (int b = 0; b < blocks; ++b)
      while (added[b] * kChunk < G) add_chunk(b, added[b]++);
    for (int i = 0; i < (two_m ? 2 : 1); ++i) {
      const int64_t rows = std::min<int64_t>(kTile, valid - i * kTile);
      for (int j = 0; j < n; ++j) {
        const float* acc = s.acc[2 * i + j];
        const __m512 scale = Bits == 8 ? _mm512_loadu_ps(w.scales8 + (t + j) * kTile) : _mm512_set1_ps(1.f);
        for (int64_t r = 0; r < rows; ++r)
          store_out(y + (m0 + i * kTile + r) * ldy + j * kTile, _mm512_mul_ps(_mm512_load_ps(acc + r * kTile), scale));
      }
    }
  }
}
#endif  // __AVX512F__

// The same product on the matrix-vector kernels' tiles (AVX-512 VNNI or AVX2), for CPUs without
// AMX-INT8 (x's rows quantized for those kernels: biased for int8 weights).
template <int Bits, typename Out>
void panel_vector(const Weights& w, int64_t t, int n, const Rows& x, Out* y, int64_t ldy) {
  const int64_t G = w.groups();
  for (int j = 0; j < n; ++j) {
    const int64_t tile = t + j;
    if constexpr (Bits == 4) {
      int4_rows(w.tile(tile), w.scales4 + tile * G * kTile, w.zeros + tile * G * kTile, x.q, x.first, x.count, w.in,
                w.group, y, ldy, j);
    } else {
      for_row_blocks(x.count, [&](auto rows, int64_t m) {
        int8_tile<decltype(rows)::value>(reinterpret_cast<const int8_t*>(w.tile(tile)), w.scales8 + t * kTile,
                                         w.sums + tile * G * kTile, x.q, x.first + m, w.in, w.group, y + m * ldy, ldy, j);
      });
    }
  }
}

// y = x . panel p of w on AMX or vector tiles (y: the panel's first output of x's first row).
template <typename Out>
void panel_product(bool amx, const Weights& w, int64_t p, const Rows& x, Out* y, int64_t ldy, Scratch& s) {
  const int64_t t = 2 * p;
  const int n = t + 1 < w.tiles ? 2 : 1;
  if (amx) {
#if defined(__AVX512F__)
    if (w.bits == 4) panel<4>(w, t, n, x, y, ldy, s); else panel<8>(w, t, n, x, y, ldy, s);
#else
    TORCH_CHECK(false, "this build of the CPU kernels has no AMX products");
#endif
  } else {
    if (w.bits == 4) panel_vector<4>(w, t, n, x, y, ldy); else panel_vector<8>(w, t, n, x, y, ldy);
  }
}

// One unit of work: panel `panel` of product `product` over activation rows [first, first + rows).
struct Job {
  int64_t product, panel, first, rows;
  int64_t cost() const { return round_up(rows, kTile) + 2 * kTile; }  // rows, plus the weight reads as rows' worth
};

// This thread's scratch, out of line: inlined, every use of a thread_local in the kernels would
// look up its address again (a call into the dynamic loader, in a shared library).
__attribute__((noinline)) Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

// Runs fn(job, scratch) for every job. The threads split the jobs, in order, into shares of
// equal cost, so that each mostly streams one contiguous run of weights; a thread done with its
// share helps with what is left of the others' (on a busy machine one may get less of a core).
template <typename Fn>
void run_jobs(const std::vector<Job>& jobs, bool amx, Fn fn) {
  const int64_t count = static_cast<int64_t>(jobs.size());
  const int64_t shares = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count));
  int64_t total = 0;
  for (const Job& job : jobs) total += job.cost();
  std::vector<int64_t> bounds(shares + 1, count);
  std::vector<std::atomic<int64_t>> next(shares);
  int64_t spent = 0, share = 0;
  bounds[0] = 0;
  for (int64_t i = 0; i < count && share + 1 < shares; ++i) {
    spent += jobs[i].cost();
    if (spent * shares >= total * (share + 1)) bounds[++share] = i + 1;
  }
  for (int64_t s = share + 1; s < shares; ++s) bounds[s] = count;
  for (int64_t s = 0; s < shares; ++s) next[s].store(bounds[s], std::memory_order_relaxed);
  at::parallel_for(0, shares, 1, [&](int64_t begin, int64_t end) {
    Scratch& scratch = thread_scratch();
    if (amx) configure_square_tiles();
    for (int64_t own = begin; own < end; ++own)
      for (int64_t k = 0; k < shares; ++k) {
        const int64_t owner = (own + k) % shares;
        for (int64_t i; (i = next[owner].fetch_add(1, std::memory_order_relaxed)) < bounds[owner + 1];)
          fn(jobs[i], scratch);
      }
    if (amx) release_tiles();
  });
}

// x [M, K] quantized for the product, in whole blocks of 16 rows per head of `rows` rows.
QuantizedRows quantize_blocks(const at::Tensor& x, int64_t heads, int64_t group, bool biased) {
  const int64_t M = x.size(0) / heads, K = x.size(1), G = K / group, padded = round_up(M, kTile);
  QuantizedRows q;
  q.values.assign(heads * padded * K, 0);
  q.scales.assign(heads * padded * G, 0.f);
  q.sums.assign(heads * padded * G, 0);
  for (int64_t h = 0; h < heads; ++h) {
    auto into = [&](auto* rows) {
      quantize_rows_into(rows + h * M * K, M, K, group, biased, q.values.data() + h * padded * K,
                         q.scales.data() + h * padded * G, q.sums.data() + h * padded * G);
    };
    if (x.scalar_type() == at::kBFloat16) into(x.data_ptr<at::BFloat16>()); else into(x.data_ptr<float>());
  }
  return q;
}

}  // namespace

bool amx_products_enabled() { return amx_turned_on.load(std::memory_order_relaxed) && amx_int8_present(); }

bool amx_products_apply(int64_t rows, int64_t in, int64_t group) {
  return rows >= kAmxMinRows && in % kStep == 0 && group % kStep == 0 && amx_products_enabled();
}

at::Tensor amx_linear(const at::Tensor& x, int bits, int64_t heads, const at::Tensor& packed, const at::Tensor& scales,
                      const at::Tensor& zeros_or_sums, int64_t group) {
  const int64_t M = x.size(0) / heads, padded = round_up(M, kTile);
  std::vector<Weights> weights;
  for (int64_t h = 0; h < heads; ++h) weights.push_back(stacked_weights(bits, packed, scales, zeros_or_sums, group, h));
  const int64_t K = weights[0].in, N = weights[0].tiles * kTile;
  TORCH_CHECK(x.size(1) == K && x.size(0) == heads * M, "x must be [heads * M, ", K, "]");
  QuantizedRows q = quantize_blocks(x, heads, group, false);
  to_tiles(q.values, K);
  std::vector<float> offsets;
  if (bits == 4) offsets_of(q, offsets);
  // Long inputs go in runs of ~1 MB of activations, which stay in L2 while every panel passes
  // over them (each run unpacks the int4 panels again, which is cheap).
  const int64_t run = std::max(kBlockRows, (int64_t(1) << 20) / K / kBlockRows * kBlockRows);
  std::vector<Job> jobs;
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t r = 0; r < M; r += run)
      for (int64_t p = 0; p < weights[h].panels(); ++p) jobs.push_back({h, p, r, std::min(run, M - r)});
  at::Tensor y = at::empty({heads, M, N}, x.options());
  auto products = [&](auto* out) {
    run_jobs(jobs, true, [&](const Job& job, Scratch& s) {
      const Rows rows{q, offsets.data(), job.product * padded + job.first, job.rows};
      panel_product(true, weights[job.product], job.panel, rows,
                    out + (job.product * M + job.first) * N + 2 * job.panel * kTile, N, s);
    });
  };
  if (x.scalar_type() == at::kBFloat16) products(y.data_ptr<at::BFloat16>()); else products(y.data_ptr<float>());
  return heads > 1 ? y : y.view({M, N});
}

namespace {

// What int4_moe_grouped keeps between calls: the experts' activation rows, the silu(gate) * up
// rows, quantized, and the down products.
struct MoeBuffers {
  QuantizedRows x, h;
  std::vector<float> x_offsets, h_offsets, hidden, out;
};

// A chunk of tokens through the routed experts of one layer, grouped by expert: the rows of each
// expert's tokens are gathered, each active expert runs gate_up, silu(gate) * up and down as
// many-row products (AMX where the CPU has it, else vector tiles), and each token sums its experts'
// outputs with its routing weights, in its own slot order.
// x [T, H]; expert_ids, expert_weights [T, k]; gate_up: packed [E, 2I/16, H/8, 64], scales and
// zeros [E, 2I/16, H/g1, 16]; down: packed [E, H/16, I/8, 64], scales and zeros [E, H/16, I/g2, 16].
at::Tensor int4_moe_grouped(const at::Tensor& x_in, const at::Tensor& expert_ids, const at::Tensor& expert_weights,
                            const at::Tensor& up_packed, const at::Tensor& up_scales, const at::Tensor& up_zeros,
                            int64_t up_group, const at::Tensor& down_packed, const at::Tensor& down_scales,
                            const at::Tensor& down_zeros, int64_t down_group) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor ids = expert_ids.to(at::kLong).contiguous();
  const at::Tensor route = expert_weights.to(at::kFloat).contiguous();
  TORCH_CHECK(x.dim() == 2 && ids.dim() == 2 && ids.size(0) == x.size(0) && route.sizes() == ids.sizes(),
              "x [T, H], expert_ids and expert_weights [T, k]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "x must be bfloat16 or float32");
  TORCH_CHECK(up_packed.dim() == 4 && down_packed.dim() == 4 && up_packed.size(0) == down_packed.size(0),
              "packed weights must be [E, tiles, K/8, 64]");
  const int64_t T = x.size(0), k = ids.size(1), H = x.size(1), E = up_packed.size(0);
  const int64_t I = up_packed.size(1) * kTile / 2, Hp = down_packed.size(1) * kTile;
  TORCH_CHECK(up_packed.size(2) * 8 == H && down_packed.size(2) * 8 == I && Hp >= H && I % 32 == 0,
              "expert shapes do not match x");
  TORCH_CHECK(H % up_group == 0 && I % down_group == 0 && up_group % 32 == 0 && down_group % 32 == 0,
              "int4 groups must divide the inputs and be multiples of 32");

  // each expert's rows in token order, each expert's run padded to whole 16-row blocks
  const int64_t* id = ids.data_ptr<int64_t>();
  std::vector<int64_t> count(E, 0), start(E + 1, 0);
  for (int64_t i = 0; i < T * k; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < E, "expert id out of range");
    ++count[id[i]];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + round_up(count[e], kTile);
  // AMX when the active experts average enough rows (few tokens, e.g. a batch of decodes,
  // give each one or two: the vector kernels then read the weights faster)
  const int64_t active = E - std::count(count.begin(), count.end(), 0);
  const bool amx = amx_products_apply(T * k / std::max<int64_t>(1, active), H, up_group) &&
                   amx_products_apply(kAmxMinRows, I, down_group);
  const int64_t R = start[E];
  std::vector<int64_t> row_of(T * k), token_of(R, -1), filled(E, 0);
  for (int64_t i = 0; i < T * k; ++i) {
    const int64_t e = id[i], r = start[e] + filled[e]++;
    row_of[i] = r;
    token_of[r] = i / k;
  }

  // The chunk's buffers (tens of MB for 512 tokens) are kept from call to call: fresh ones
  // would be faulted in and zeroed page by page every time. Rows past an expert's count are
  // never read: their products are computed and dropped.
  thread_local MoeBuffers buffers;
  MoeBuffers& b = buffers;
  const int64_t G1 = H / up_group, G2 = I / down_group;
  b.x.values.resize(R * H);
  b.x.scales.resize(R * G1);
  b.x.sums.resize(R * G1);
  // the tokens' activations, quantized once per slot row (a token's rows are k copies)
  at::parallel_for(0, R * G1, 64, [&](int64_t begin, int64_t end) {
    for (int64_t rg = begin; rg < end; ++rg) {
      const int64_t r = rg / G1, g = rg % G1, t = token_of[r];
      if (t < 0) continue;
      auto group = [&](auto* rows) {
        return quantize_group(rows + t * H + g * up_group, up_group, false, b.x.values.data() + r * H + g * up_group,
                              &b.x.scales[rg]);
      };
      b.x.sums[rg] = x.scalar_type() == at::kBFloat16 ? group(x.data_ptr<at::BFloat16>()) : group(x.data_ptr<float>());
    }
  });
  if (amx) to_tiles(b.x.values, H);
  offsets_of(b.x, b.x_offsets);

  std::vector<Weights> up(E), down(E);
  std::vector<Job> up_jobs, down_jobs;
  const int64_t up_panels = I / 32;  // a gate_up job does gate panel p and up panel p + I / 32
  for (int64_t e = 0; e < E; ++e) {
    if (count[e] == 0) continue;
    up[e] = stacked_weights(4, up_packed, up_scales, up_zeros, up_group, e);
    down[e] = stacked_weights(4, down_packed, down_scales, down_zeros, down_group, e);
    for (int64_t p = 0; p < up_panels; ++p) up_jobs.push_back({e, p, start[e], count[e]});
    for (int64_t p = 0; p < down[e].panels(); ++p) down_jobs.push_back({e, p, start[e], count[e]});
  }

  // gate_up, then silu(gate) * up into `hidden`
  b.hidden.resize(R * I);
  run_jobs(up_jobs, amx, [&](const Job& job, Scratch& s) {
    thread_local std::vector<float> gate, lift;
    gate.resize(job.rows * 32);
    lift.resize(job.rows * 32);
    const Rows rows{b.x, b.x_offsets.data(), job.first, job.rows};
    const Weights& w = up[job.product];
    panel_product(amx, w, job.panel, rows, gate.data(), 32, s);
    panel_product(amx, w, job.panel + up_panels, rows, lift.data(), 32, s);
    for (int64_t r = 0; r < job.rows; ++r)
      silu_mul(gate.data() + r * 32, lift.data() + r * 32, 32, b.hidden.data() + (job.first + r) * I + job.panel * 32);
  });

  b.h.values.resize(R * I);
  b.h.scales.resize(R * G2);
  b.h.sums.resize(R * G2);
  at::parallel_for(0, R * G2, 64, [&](int64_t begin, int64_t end) {
    for (int64_t rg = begin; rg < end; ++rg) {
      if (token_of[rg / G2] < 0) continue;
      const int64_t offset = (rg / G2) * I + (rg % G2) * down_group;
      b.h.sums[rg] = quantize_group(b.hidden.data() + offset, down_group, false, b.h.values.data() + offset, &b.h.scales[rg]);
    }
  });
  if (amx) to_tiles(b.h.values, I);
  offsets_of(b.h, b.h_offsets);
  b.out.resize(R * Hp);
  run_jobs(down_jobs, amx, [&](const Job& job, Scratch& s) {
    panel_product(amx, down[job.product], job.panel, Rows{b.h, b.h_offsets.data(), job.first, job.rows},
                  b.out.data() + job.first * Hp + job.panel * 32, Hp, s);
  });
  const std::vector<float>& out = b.out;

  at::Tensor y = at::empty({T, H}, x.options());
  const float* w = route.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "int4_moe_grouped", [&] {
    scalar_t* dst = y.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> sum(H);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(sum.begin(), sum.end(), 0.f);
        for (int64_t slot = 0; slot < k; ++slot) {
          const float weight = w[t * k + slot];
          const float* src = out.data() + row_of[t * k + slot] * Hp;
          for (int64_t h = 0; h < H; ++h) sum[h] += weight * src[h];
        }
        for (int64_t h = 0; h < H; ++h) dst[t * H + h] = static_cast<scalar_t>(sum[h]);
      }
    });
  });
  return y;
}

// Turns the AMX products on or off (to compare them with the vector ones); returns the old setting.
bool set_amx_products(bool enabled) { return amx_turned_on.exchange(enabled); }

bool amx_products_available() { return amx_int8_present(); }

}  // namespace
}  // namespace glmcode_cpu

TORCH_LIBRARY_FRAGMENT(glmcode_cpu, m) {
  m.def("int4_moe_grouped(Tensor x, Tensor expert_ids, Tensor expert_weights, Tensor up_packed, Tensor up_scales, "
        "Tensor up_zeros, int up_group, Tensor down_packed, Tensor down_scales, Tensor down_zeros, int down_group) "
        "-> Tensor", &glmcode_cpu::int4_moe_grouped);
  m.def("set_amx_products(bool enabled) -> bool", &glmcode_cpu::set_amx_products);
  m.def("amx_products_available() -> bool", &glmcode_cpu::amx_products_available);
}
