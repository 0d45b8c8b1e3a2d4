// mimfast's ops for libtorch users: thin typed calls into the dispatcher (namespace mimfast::).
//
// Link against the `mimfast::mimfast_ops` library (cmake --install gives lib/libmimfast_ops.so, this header and
// lib/cmake/mimfast/mimfastConfig.cmake). Loading it registers the CPU kernels of mimfast::vq_search,
// mimfast::gumbel_softmax(_bwd), mimfast::gather_tokens, mimfast::restore_tokens(_bwd) with the dispatcher (when the
// Python package has not defined them already: inside Python the package owns those names and the library's
// kernels are reached as mimfast_native::*). Semantics are those of the Python references (SPEC.md): fp32 / bf16 /
// fp16 inputs, fp32 accumulation; float64 is the Python reference's job and is rejected here.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <tuple>

namespace mimfast {

// "mimfast <version> (<isa>)": also the symbol that keeps the library linked into executables that only use the
// inline calls below.
std::string native_version();

// Nearest code for every row of x (N, D) in codebook (K, D): (indices (N,) int64 / int32, distances (N,) fp32,
// counts (K,) int32 or (0,)). Ties go to the lowest index; non-finite rows give -1 / NaN; invalid rows -1 / 0.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> vq_search(const at::Tensor& x, const at::Tensor& codebook,
                                                                const std::optional<at::Tensor>& valid = std::nullopt,
                                                                bool cosine = false, bool int32_index = false,
                                                                bool with_counts = false, double eps = 1e-12,
                                                                const std::string& precision = "fp32") {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mimfast::vq_search", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, bool, bool, bool,
                           double, c10::string_view)>();
  return op.call(x, codebook, valid, cosine, int32_index, with_counts, eps, precision);
}

// Gumbel-softmax of every row of logits (N, K) with Philox state philox = (seed, offset) (2,) int64:
// (y (N, K) or (0, K), indices (N,) int64, lse (N,) fp32 or (0,), best (N,) int64 or (0,)).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gumbel_softmax(
    const at::Tensor& logits, const at::Tensor& philox, double tau = 1.0, bool hard = false,
    const std::optional<at::Tensor>& sample_rows = std::nullopt, bool write_y = true, bool with_best = false) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mimfast::gumbel_softmax", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, double, bool, bool,
                           bool)>();
  return op.call(logits, sample_rows, philox, tau, hard, write_y, with_best);
}

}  // namespace mimfast
