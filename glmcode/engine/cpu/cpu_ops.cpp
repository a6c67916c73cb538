// The model's elementwise operations on CPU tensors (float32 or bfloat16): the kernels behind
// ops.py's functions marked cpu=... Each computes what its PyTorch reference there computes, in
// float32 and with the same roundings to the tensor's dtype, in one pass over memory instead of
// the several passes (and float32 temporaries) the reference's torch ops take.
#include "cpu_kernels.h"

#include <torch/library.h>

namespace glmcode_cpu {
namespace {

// v rounded to bfloat16 (nearest even) and back: the value a bf16 temporary would hold.
inline __m512 through_bf16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_and_si512(bf16_rounded_bits(v), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline __m512 through(const float*, __m512 v) { return v; }
inline __m512 through(const at::BFloat16*, __m512 v) { return through_bf16(v); }
template <typename T>
inline float through(float v) { return static_cast<float>(static_cast<T>(v)); }

at::Tensor rows_of(const at::Tensor& t) { return t.contiguous().view({-1, t.size(-1)}); }

// ---- norms

// out = weight * T(x / sqrt(mean(x^2) + eps)), one row of H values.
template <typename T, typename W>
void rms_norm_row(const T* x, const W* weight, int64_t H, float eps, T* out) {
  const int64_t vectors = H / 16 * 16;
  __m512 squares = _mm512_setzero_ps();
  for (int64_t i = 0; i < vectors; i += 16) {
    const __m512 v = load16_as_float(x + i);
    squares = _mm512_fmadd_ps(v, v, squares);
  }
  float sum = _mm512_reduce_add_ps(squares);
  for (int64_t i = vectors; i < H; ++i) sum += static_cast<float>(x[i]) * static_cast<float>(x[i]);
  const float r = 1.f / std::sqrt(sum / H + eps);
  for (int64_t i = 0; i < vectors; i += 16) {
    const __m512 normed = through(x, _mm512_mul_ps(load16_as_float(x + i), _mm512_set1_ps(r)));
    store_row(out + i, _mm512_mul_ps(load16_as_float(weight + i), normed));
  }
  for (int64_t i = vectors; i < H; ++i) out[i] = static_cast<T>(static_cast<float>(weight[i]) * through<T>(x[i] * r));
}

template <typename T, typename W>
void rms_norm_rows(const T* x, const W* weight, int64_t rows, int64_t H, float eps, T* out) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_norm_row(x + r * H, weight, H, eps, out + r * H);
  });
}

void check_norm(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "rms_norm: the weight must match x's last dim");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat,
              "rms_norm: the weight must be float32 or of x's dtype");
}

template <typename T, typename F>
void with_weight(const at::Tensor& weight, F f) {
  if (weight.scalar_type() == at::kFloat) return f(weight.data_ptr<float>());
  f(reinterpret_cast<const T*>(weight.data_ptr()));
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  check_norm(x_in, weight_in);
  const at::Tensor x = rows_of(x_in), weight = weight_in.contiguous();
  at::Tensor out = at::empty_like(x);
  dispatch_float_types(x, "rms_norm", [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    with_weight<T>(weight, [&](const auto* w) {
      rms_norm_rows(x.data_ptr<T>(), w, x.size(0), x.size(1), static_cast<float>(eps), out.data_ptr<T>());
    });
  });
  return out.view(x_in.sizes());
}

// (rms_norm(T(x + residual)), T(x + residual))
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_in, const at::Tensor& residual_in,
                                                const at::Tensor& weight_in, double eps) {
  check_norm(x_in, weight_in);
  TORCH_CHECK(residual_in.sizes() == x_in.sizes() && residual_in.scalar_type() == x_in.scalar_type(),
              "add_rms_norm: x and residual differ in shape or dtype");
  const at::Tensor x = rows_of(x_in), residual = rows_of(residual_in), weight = weight_in.contiguous();
  at::Tensor out = at::empty_like(x), summed = at::empty_like(x);
  dispatch_float_types(x, "add_rms_norm", [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    with_weight<T>(weight, [&](const auto* w) {
      const int64_t H = x.size(1);
      const T *a = x.data_ptr<T>(), *b = residual.data_ptr<T>();
      T *sum = summed.data_ptr<T>(), *dst = out.data_ptr<T>();
      at::parallel_for(0, x.size(0), 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          int64_t i = r * H;
          for (; i + 16 <= (r + 1) * H; i += 16)
            store_row(sum + i, _mm512_add_ps(load16_as_float(a + i), load16_as_float(b + i)));
          for (; i < (r + 1) * H; ++i) sum[i] = static_cast<T>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
          rms_norm_row(sum + r * H, w, H, static_cast<float>(eps), dst + r * H);
        }
      });
    });
  });
  return {out.view(x_in.sizes()), summed.view(x_in.sizes())};
}

// ---- activations

// [..., 2I] -> T(silu(gate) * up), [..., I]
at::Tensor silu_mul_op(const at::Tensor& gate_up_in) {
  const at::Tensor gate_up = rows_of(gate_up_in);
  const int64_t rows = gate_up.size(0), I = gate_up.size(1) / 2;
  std::vector<int64_t> shape(gate_up_in.sizes().begin(), gate_up_in.sizes().end());
  shape.back() = I;
  at::Tensor out = at::empty({rows, I}, gate_up.options());
  dispatch_float_types(gate_up, "silu_mul", [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    const T* src = gate_up.data_ptr<T>();
    T* dst = out.data_ptr<T>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> gate(I), up(I), product(I);
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t i = 0; i < I; ++i) {
          gate[i] = static_cast<float>(src[r * 2 * I + i]);
          up[i] = static_cast<float>(src[r * 2 * I + I + i]);
        }
        silu_mul(gate.data(), up.data(), I, product.data());
        for (int64_t i = 0; i < I; ++i) dst[r * I + i] = static_cast<T>(product[i]);
      }
    });
  });
  return out.view(shape);
}

// ---- rotary embedding

// x [T, heads, R] (or [T, R], heads = 1) in place, any strides: the pairs (x[2i], x[2i+1])
// rotated by the position's angles and written de-interleaved (firsts, then seconds), as
// ops.rope_ documents.
template <typename T>
void rotate_rows(T* x, int64_t tokens, int64_t heads, const int64_t* strides, int64_t R, const int64_t* positions,
                 const float* cos_sin) {
  const int64_t half = R / 2, step = strides[2];
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> even(half), odd(half);
    for (int64_t t = begin; t < end; ++t) {
      const float* cos = cos_sin + positions[t] * R;
      const float* sin = cos + half;
      for (int64_t h = 0; h < heads; ++h) {
        T* row = x + t * strides[0] + h * strides[1];
        for (int64_t i = 0; i < half; ++i) {
          even[i] = static_cast<float>(row[2 * i * step]);
          odd[i] = static_cast<float>(row[(2 * i + 1) * step]);
        }
        for (int64_t i = 0; i < half; ++i) {
          row[i * step] = static_cast<T>(even[i] * cos[i] - odd[i] * sin[i]);
          row[(half + i) * step] = static_cast<T>(odd[i] * cos[i] + even[i] * sin[i]);
        }
      }
    }
  });
}

void rope_(at::Tensor q_pe, at::Tensor k_pe, const at::Tensor& positions_in, const at::Tensor& cos_sin_in) {
  TORCH_CHECK(q_pe.dim() == 3 && k_pe.dim() == 2 && q_pe.size(2) == k_pe.size(1), "rope_: q_pe [T, N, R] and k_pe [T, R]");
  TORCH_CHECK(q_pe.scalar_type() == k_pe.scalar_type() && cos_sin_in.scalar_type() == at::kFloat,
              "rope_: q_pe and k_pe of one dtype, a float32 cos_sin table");
  const at::Tensor positions = positions_in.to(at::kLong).contiguous(), cos_sin = cos_sin_in.contiguous();
  const int64_t q_strides[3] = {q_pe.stride(0), q_pe.stride(1), q_pe.stride(2)};
  const int64_t k_strides[3] = {k_pe.stride(0), 0, k_pe.stride(1)};
  dispatch_float_types(q_pe, "rope_", [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    rotate_rows(q_pe.data_ptr<T>(), q_pe.size(0), q_pe.size(1), q_strides, q_pe.size(2), positions.data_ptr<int64_t>(),
                cos_sin.data_ptr<float>());
    rotate_rows(k_pe.data_ptr<T>(), k_pe.size(0), 1, k_strides, k_pe.size(1), positions.data_ptr<int64_t>(),
                cos_sin.data_ptr<float>());
  });
}

}  // namespace
}  // namespace glmcode_cpu

TORCH_LIBRARY_FRAGMENT(glmcode_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &glmcode_cpu::rms_norm);
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)",
        &glmcode_cpu::add_rms_norm);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &glmcode_cpu::silu_mul_op);
  m.def("rope_(Tensor(a!) q_pe, Tensor(b!) k_pe, Tensor positions, Tensor cos_sin) -> ()", &glmcode_cpu::rope_);
}
