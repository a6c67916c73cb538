// int8-activation x int4/int8-weight matrix products for x86 CPUs with AVX-512 VNNI or AVX2.
//
// y[m, n] = sum_k x[m, k] * w[n, k]. Activations are quantized on the fly to int8, one scale
// per row and group of `group` inputs; the integer dot products run on VPDPBUSD (u8 x s8 -> s32;
// on AVX2, VPMADDUBSW and VPMADDWD: cpu_kernels_avx2.h) and each group's sum is scaled into a float accumulator.
//
// Weight layouts, made by cpu_quant.py, tile 16 output rows so one 64-byte vector holds 4 (int8)
// or 8 (int4) inputs of 16 rows and one broadcast activation word feeds all 16 rows at once:
//   int4: packed [N/16, K/8, 64] u8, byte 4*j+i = q[16t+j, 8b+i] | q[16t+j, 8b+4+i] << 4,
//         w = (q - 8) * scale + zero, scales/zeros [N/16, K/group, 16] bf16.
//   int8: packed [N/16, K/4, 64] s8, byte 4*j+i = w[16t+j, 4b+i]; scales [N] f32;
//         sums [N/16, K/group, 16] s32 = sum of w over each group (undoes the +128 that makes
//         the activations unsigned).
#include "cpu_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace {

using namespace glmcode_cpu;

constexpr int64_t kRunBytes = 256 << 10;  // quantized activations a run of rows may take (half an L2)

// fn(t, m0, rows) for every tile and run of rows. Threads split the tiles; each takes its own
// run by run, so a run's activations stay in L2 while its tiles pass over them (all of a
// 512-token chunk, read again from L3 for every tile, held the products back).
template <typename TileFn>
void for_each_tile(int64_t M, int64_t K, int64_t tiles, TileFn fn) {
  const int64_t grain = std::max<int64_t>(1, tiles / (4 * at::get_num_threads()));
  const int64_t run = std::max<int64_t>(kMaxRows, kRunBytes / K / kMaxRows * kMaxRows);
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += run)
      for (int64_t t = begin; t < end; ++t) fn(t, m0, std::min(run, M - m0));
  });
}

QuantizedRows quantize_input(const at::Tensor& x, int64_t group, bool biased = false) {
  QuantizedRows q;
  const int64_t M = x.size(0), K = x.size(1);
  if (x.scalar_type() == at::kBFloat16) {
    quantize_rows(x.data_ptr<at::BFloat16>(), M, K, group, q, biased);
  } else {
    quantize_rows(x.data_ptr<float>(), M, K, group, q, biased);
  }
  return q;
}

void check_input(const at::Tensor& x, int64_t K, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [M, ", K, "]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "x must be bfloat16 or float32");
  TORCH_CHECK(group % 8 == 0 && K % group == 0, "group must divide K and be a multiple of 8");
}

at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& zeros, int64_t group) {
  const at::Tensor x = x_in.contiguous();
  const int64_t tiles = packed.size(0), K = packed.size(1) * 8, N = tiles * kTile, M = x.size(0);
  check_input(x, K, group);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.size(2) == 64, "packed must be uint8 [N/16, K/8, 64]");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && zeros.scalar_type() == at::kBFloat16, "scales/zeros must be bfloat16");
  TORCH_CHECK(group % 32 == 0, "int4 groups must be a multiple of 32");
  if (amx_products_apply(M, K, group)) return amx_linear(x, 4, 1, packed, scales, zeros, group);
  const QuantizedRows q = quantize_input(x, group);
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const at::BFloat16* s = scales.data_ptr<at::BFloat16>();
  const at::BFloat16* z = zeros.data_ptr<at::BFloat16>();
  const int64_t G = K / group;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "int4_linear", [&] {
    scalar_t* out = y.data_ptr<scalar_t>();
    for_each_tile(M, K, tiles, [&](int64_t t, int64_t m0, int64_t rows) {
      int4_rows(w + t * (K / 8) * 64, s + t * G * kTile, z + t * G * kTile, q, m0, rows, K, group, out + m0 * N, N, t);
    });
  });
  return y;
}

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& sums, int64_t group) {
  const at::Tensor x = x_in.contiguous();
  const int64_t tiles = packed.size(0), K = packed.size(1) * 4, N = tiles * kTile, M = x.size(0);
  check_input(x, K, group);
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.size(2) == 64, "packed must be int8 [N/16, K/4, 64]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && sums.scalar_type() == at::kInt, "scales f32, sums int32");
  if (amx_products_apply(M, K, group)) return amx_linear(x, 8, 1, packed, scales, sums, group);
  const QuantizedRows q = quantize_input(x, group, /*biased=*/true);
  at::Tensor y = at::empty({M, N}, x.options());
  const int8_t* w = packed.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  const int32_t* ws = sums.data_ptr<int32_t>();
  const int64_t G = K / group;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "int8_linear", [&] {
    scalar_t* out = y.data_ptr<scalar_t>();
    for_each_tile(M, K, tiles, [&](int64_t t, int64_t first, int64_t count) {
      for_row_blocks(count, [&](auto rows, int64_t m) {
        const int64_t m0 = first + m;
        int8_tile<decltype(rows)::value>(w + t * (K / 4) * 64, s, ws + t * G * kTile, q, m0, K, group, out + m0 * N, N, t);
      });
    });
  });
  return y;
}

// Per-head products y[h] = x[h] @ w[h].T with int8 weights stacked per head (MLA's absorbed
// W_UK / W_UV): x [H, M, K]; packed [H, N/16, K/4, 64], scales [H, N], sums [H, N/16, K/group, 16].
at::Tensor int8_linear_heads(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales,
                             const at::Tensor& sums, int64_t group) {
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(x.dim() == 3 && packed.dim() == 4 && x.size(0) == packed.size(0), "x [H, M, K] and packed [H, ...]");
  const int64_t H = x.size(0), M = x.size(1), tiles = packed.size(1), K = packed.size(2) * 4, N = tiles * kTile;
  const at::Tensor rows = x.view({H * M, x.size(2)});
  check_input(rows, K, group);
  TORCH_CHECK(packed.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat && sums.scalar_type() == at::kInt,
              "packed int8, scales f32, sums int32");
  if (amx_products_apply(M, K, group)) return amx_linear(rows, 8, H, packed, scales, sums, group);
  const QuantizedRows q = quantize_input(rows, group, /*biased=*/true);
  at::Tensor y = at::empty({H, M, N}, x.options());
  const int8_t* w = packed.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  const int32_t* ws = sums.data_ptr<int32_t>();
  const int64_t G = K / group;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "int8_linear_heads", [&] {
    scalar_t* out = y.data_ptr<scalar_t>();
    at::parallel_for(0, H * tiles, 4, [&](int64_t begin, int64_t end) {
      for (int64_t job = begin; job < end; ++job) {
        const int64_t h = job / tiles, t = job % tiles;
        const int8_t* wt = w + (h * tiles + t) * (K / 4) * 64;
        const int32_t* st = ws + (h * tiles + t) * G * kTile;
        for_row_blocks(M, [&](auto rows, int64_t m) {
          int8_tile<decltype(rows)::value>(wt, s + h * N, st, q, h * M + m, K, group, out + (h * M + m) * N, N, t);
        });
      }
    });
  });
  return y;
}

// Weights of the int8 layout back to rows: packed [H, N/16, K/4, 64] with scales [H, N] ->
// [H, rows, K] in `dtype` (w * scale, rounded once). A prefill chunk multiplies many rows by
// MLA's kv_b_proj halves as dense matrices; done with torch ops (a 5-d permute, a conversion and
// a multiply, each a pass over the weights) this took 8-10 ms per layer and chunk.
at::Tensor int8_dequantize(const at::Tensor& packed, const at::Tensor& scales, int64_t rows, at::ScalarType dtype) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(3) == 64 && packed.scalar_type() == at::kChar && packed.is_contiguous(),
              "packed must be contiguous int8 [H, N/16, K/4, 64]");
  const int64_t H = packed.size(0), tiles = packed.size(1), K = packed.size(2) * 4;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 2 && scales.size(0) == H &&
                  scales.size(1) >= rows && rows <= tiles * kTile,
              "scales must be float32 [H, N] and rows at most N");
  TORCH_CHECK(K % 16 == 0, "K must be a multiple of 16");
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "dtype must be bfloat16 or float32");
  at::Tensor out = at::empty({H, rows, K}, packed.options().dtype(dtype));
  const int8_t* src = packed.data_ptr<int8_t>();
  const float* scale = scales.data_ptr<float>();
  const int64_t N = scales.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "int8_dequantize", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, H * rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<int8_t> row(K);
      for (int64_t hr = begin; hr < end; ++hr) {
        const int64_t h = hr / rows, r = hr % rows;
        // row r's 4 inputs of each block are 4 consecutive bytes of the block's vector
        const int8_t* tile = src + ((h * tiles + r / kTile) * (K / 4)) * 64 + (r % kTile) * 4;
        for (int64_t b = 0; b < K / 4; ++b) std::memcpy(row.data() + 4 * b, tile + b * 64, 4);
        scale_int8(row.data(), K, scale[h * N + r], dst + hr * K);
      }
    });
  });
  return out;
}

// One token through k routed experts with int4 weights stacked per layer, in one call:
// gate_up for all k experts, silu(gate) * up, down for all k, then the weighted sum.
// gate_up: packed [E, N1/16, H/8, 64], scales/zeros [E, N1/16, H/g1, 16] (N1 = 2 * I);
// down:    packed [E, H/16, I/8, 64], scales/zeros [E, H/16, I/g2, 16].
at::Tensor int4_moe_token(const at::Tensor& x_in, const at::Tensor& expert_ids, const at::Tensor& expert_weights,
                          const at::Tensor& up_packed, const at::Tensor& up_scales, const at::Tensor& up_zeros,
                          int64_t up_group, const at::Tensor& down_packed, const at::Tensor& down_scales,
                          const at::Tensor& down_zeros, int64_t down_group) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor ids = expert_ids.to(at::kLong).contiguous();
  const at::Tensor route = expert_weights.to(at::kFloat).contiguous();
  const int64_t k = ids.numel(), H = x.size(1);
  const int64_t up_tiles = up_packed.size(1), N1 = up_tiles * kTile, I = N1 / 2;
  const int64_t down_tiles = down_packed.size(1), Kd = down_packed.size(2) * 8;
  check_input(x, up_packed.size(2) * 8, up_group);
  TORCH_CHECK(x.size(0) == 1, "int4_moe_token takes one token");
  TORCH_CHECK(Kd == I && down_tiles * kTile == H, "down_proj shape does not match gate_up_proj");
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t up_G = H / up_group, down_G = I / down_group;

  // gate_up of every selected expert, one job per (expert, tile)
  const QuantizedRows qx = quantize_input(x, up_group);
  std::vector<float> gate_up(k * N1);
  at::parallel_for(0, k * up_tiles, 8, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t e = id[job / up_tiles], t = job % up_tiles;
      const int64_t tile_bytes = (H / 8) * 64, tile_groups = up_G * kTile;
      int4_tile<1>(up_packed.data_ptr<uint8_t>() + (e * up_tiles + t) * tile_bytes,
                   up_scales.data_ptr<at::BFloat16>() + (e * up_tiles + t) * tile_groups,
                   up_zeros.data_ptr<at::BFloat16>() + (e * up_tiles + t) * tile_groups, qx, 0, H, up_group,
                   gate_up.data() + (job / up_tiles) * N1, N1, t);
    }
  });
  std::vector<float> hidden(k * I);
  for (int64_t r = 0; r < k; ++r) {
    for (int64_t i = 0; i < I; ++i) {
      const float g = gate_up[r * N1 + i], u = gate_up[r * N1 + I + i];
      hidden[r * I + i] = g / (1.f + std::exp(-g)) * u;
    }
  }
  QuantizedRows qh;
  quantize_rows(hidden.data(), k, I, down_group, qh);

  std::vector<float> down(k * H);
  at::parallel_for(0, k * down_tiles, 8, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t r = job / down_tiles, e = id[r], t = job % down_tiles;
      const int64_t tile_bytes = (I / 8) * 64, tile_groups = down_G * kTile;
      int4_tile<1>(down_packed.data_ptr<uint8_t>() + (e * down_tiles + t) * tile_bytes,
                   down_scales.data_ptr<at::BFloat16>() + (e * down_tiles + t) * tile_groups,
                   down_zeros.data_ptr<at::BFloat16>() + (e * down_tiles + t) * tile_groups, qh, r, I, down_group,
                   down.data() + r * H, H, t);
    }
  });
  at::Tensor out = at::zeros({1, H}, x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const float* w = route.data_ptr<float>();
  for (int64_t r = 0; r < k; ++r)
    for (int64_t h = 0; h < H; ++h) o[h] += w[r] * down[r * H + h];
  return out.to(x.scalar_type());
}

// Portable nibbles [N, K/2] (even k in the low nibble) to the int4 tile layout; rows past N
// (padding up to a multiple of 16) get q = 8, i.e. zero weights with zero scales.
at::Tensor pack_int4_nibbles(const at::Tensor& nibbles_in) {
  const at::Tensor nibbles = nibbles_in.contiguous();
  TORCH_CHECK(nibbles.scalar_type() == at::kByte && nibbles.dim() == 2, "nibbles must be uint8 [N, K/2]");
  const int64_t N = nibbles.size(0), half_k = nibbles.size(1);
  TORCH_CHECK(half_k % 4 == 0, "K must be a multiple of 8");
  const int64_t tiles = (N + kTile - 1) / kTile, blocks = half_k / 4;
  at::Tensor packed = at::empty({tiles, blocks, 64}, nibbles.options());
  const uint32_t* src = reinterpret_cast<const uint32_t*>(nibbles.data_ptr<uint8_t>());
  uint32_t* dst = reinterpret_cast<uint32_t*>(packed.data_ptr<uint8_t>());
  at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int j = 0; j < kTile; ++j) {
        const int64_t row = t * kTile + j;
        for (int64_t b = 0; b < blocks; ++b) {
          // v holds q[8b .. 8b+7] two per byte; the output word holds q[8b+i] | q[8b+4+i] << 4.
          const uint32_t v = row < N ? src[row * blocks + b] : 0x88888888u;
          dst[(t * blocks + b) * kTile + j] =
              (v & 0xFu) | ((v << 4) & 0xF00u) | ((v << 8) & 0xF0000u) | ((v << 12) & 0xF000000u) |
              ((v >> 12) & 0xF0u) | ((v >> 8) & 0xF000u) | ((v >> 4) & 0xF00000u) | (v & 0xF0000000u);
        }
      }
    }
  });
  return packed;
}

// int8 values [N, K] to the int8 tile layout, and the per-group sums [N/16, K/group, 16].
std::vector<at::Tensor> pack_int8_values(const at::Tensor& values_in, int64_t group) {
  const at::Tensor values = values_in.contiguous();
  TORCH_CHECK(values.scalar_type() == at::kChar && values.dim() == 2, "values must be int8 [N, K]");
  const int64_t N = values.size(0), K = values.size(1);
  TORCH_CHECK(K % group == 0 && group % 4 == 0, "group must divide K and be a multiple of 4");
  const int64_t tiles = (N + kTile - 1) / kTile, blocks = K / 4, G = K / group;
  at::Tensor packed = at::zeros({tiles, blocks, 64}, values.options());
  at::Tensor sums = at::zeros({tiles, G, kTile}, values.options().dtype(at::kInt));
  const int8_t* src = values.data_ptr<int8_t>();
  int8_t* dst = packed.data_ptr<int8_t>();
  int32_t* sum = sums.data_ptr<int32_t>();
  at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int j = 0; j < kTile && t * kTile + j < N; ++j) {
        const int8_t* row = src + (t * kTile + j) * K;
        for (int64_t b = 0; b < blocks; ++b) std::memcpy(dst + (t * blocks + b) * 64 + j * 4, row + b * 4, 4);
        for (int64_t g = 0; g < G; ++g) {
          int32_t total = 0;
          for (int64_t k = g * group; k < (g + 1) * group; ++k) total += row[k];
          sum[(t * G + g) * kTile + j] = total;
        }
      }
    }
  });
  return {packed, sums};
}

}  // namespace

TORCH_LIBRARY(glmcode_cpu, m) {
  m.def("pack_int4_nibbles(Tensor nibbles) -> Tensor", &pack_int4_nibbles);
  m.def("int4_moe_token(Tensor x, Tensor expert_ids, Tensor expert_weights, Tensor up_packed, Tensor up_scales, "
        "Tensor up_zeros, int up_group, Tensor down_packed, Tensor down_scales, Tensor down_zeros, int down_group) "
        "-> Tensor", &int4_moe_token);
  m.def("pack_int8_values(Tensor values, int group) -> Tensor[]", &pack_int8_values);
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int group) -> Tensor", &int4_linear);
  m.def("int8_linear(Tensor x, Tensor packed, Tensor scales, Tensor sums, int group) -> Tensor", &int8_linear);
  m.def("int8_linear_heads(Tensor x, Tensor packed, Tensor scales, Tensor sums, int group) -> Tensor", &int8_linear_heads);
  m.def("int8_dequantize(Tensor packed, Tensor scales, int rows, ScalarType dtype) -> Tensor", &int8_dequantize);
}
