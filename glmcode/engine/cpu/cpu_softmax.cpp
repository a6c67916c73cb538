// The causal softmax of one piece of a chunk's attention scores (ops.causal_softmax_), for the
// modules' attention, which scores a long context piece by piece and merges the pieces: in one
// pass over each row instead of torch's mask, logsumexp, softmax and copy. Built in both forms
// of the kernels (the vector helpers are in cpu_kernels_avx512.h and cpu_kernels_avx2.h).
#include "cpu_kernels.h"

#include <torch/library.h>

namespace glmcode_cpu {
namespace {

// scores [rows, S] (queries at first_query + row % queries, keys at first_key + j), in place:
// each row's softmax over the keys at or before its query, 0 over the rest; log_mass[row] gets
// the log of that row's total mass, sum_j exp(score_j) over those keys (-inf where there are
// none), which the caller needs to merge pieces of a context softmaxed apart. The row's three
// passes stay in the L1 cache.
template <typename T>
void causal_softmax_rows(T* scores, float* log_mass, int64_t rows, int64_t queries, int64_t keys, int64_t first_query,
                         int64_t first_key) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> e(keys);
    for (int64_t r = begin; r < end; ++r) {
      T* row = scores + r * keys;
      const int64_t valid = std::clamp<int64_t>(first_query + r % queries - first_key + 1, 0, keys);
      const float top = copy_as_float(row, valid, e.data());
      if (valid == 0 || top == -INFINITY) {
        std::fill(row, row + keys, T(0.f));
        log_mass[r] = -INFINITY;
        continue;
      }
      const float sum = exp_shifted(e.data(), valid, top);
      store_scaled(e.data(), valid, 1.f / sum, row);
      std::fill(row + valid, row + keys, T(0.f));
      log_mass[r] = top + std::log(sum);
    }
  });
}

at::Tensor causal_softmax_(at::Tensor scores, int64_t first_query, int64_t first_key) {
  TORCH_CHECK(scores.dim() == 3 && scores.is_contiguous(), "causal_softmax_: scores must be contiguous [N, t, S]");
  const int64_t heads = scores.size(0), queries = scores.size(1), keys = scores.size(2);
  at::Tensor log_mass = at::empty({heads, queries, 1}, scores.options().dtype(at::kFloat));
  dispatch_float_types(scores, "causal_softmax_", [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    causal_softmax_rows(scores.data_ptr<T>(), log_mass.data_ptr<float>(), heads * queries, queries, keys, first_query,
                        first_key);
  });
  return log_mass;
}

}  // namespace
}  // namespace glmcode_cpu

TORCH_LIBRARY_FRAGMENT(glmcode_cpu, m) {
  m.def("causal_softmax_(Tensor(a!) scores, int first_query, int first_key) -> Tensor", &glmcode_cpu::causal_softmax_);
}
