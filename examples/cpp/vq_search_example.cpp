// mimfast from C++: nearest-code search and a Gumbel-softmax sample on CPU tensors, through the dispatcher.
// Built by the top-level CMakeLists.txt when BUILD_TESTING is on; `ctest` runs it and it checks its own results.
#include <ATen/ATen.h>
#include <mimfast/ops.h>

#include <cstdio>

int main() {
  std::printf("%s\n", mimfast::native_version().c_str());
  int failures = 0;
  auto check = [&failures](bool ok, const char* what) {
    std::printf("%s: %s\n", ok ? "ok" : "FAILED", what);
    failures += ok ? 0 : 1;
  };

  // codebook: the 8 corners of a cube, x: points near corners 5, 0, 3 and an exact tie between 0 and 1
  at::Tensor codebook = at::empty({8, 3});
  for (int64_t k = 0; k < 8; ++k)
    for (int64_t d = 0; d < 3; ++d) codebook[k][d] = static_cast<float>((k >> d) & 1);
  at::Tensor x = at::tensor({0.9f, 0.1f, 0.8f, 0.1f, 0.0f, 0.2f, 1.0f, 0.9f, 0.1f, 0.5f, 0.0f, 0.0f}).view({4, 3});
  auto [idx, dist, counts] = mimfast::vq_search(x, codebook, std::nullopt, false, false, true);
  check(idx.scalar_type() == at::kLong && idx.size(0) == 4, "indices are (N,) int64");
  check(idx[0].item<int64_t>() == 5 && idx[1].item<int64_t>() == 0 && idx[2].item<int64_t>() == 3,
        "nearest corners");
  check(idx[3].item<int64_t>() == 0, "an exact tie goes to the lowest index");
  check(std::abs(dist[0].item<float>() - 0.06f) < 1e-5f, "squared distance");
  check(counts.sum().item<int64_t>() == 4 && counts[0].item<int>() == 2, "usage counts");

  at::Tensor xn = x.clone();
  xn[1][1] = std::nanf("");
  auto [idx2, dist2, counts2] = mimfast::vq_search(xn, codebook, std::nullopt, true, true, false);
  check(idx2.scalar_type() == at::kInt && idx2[1].item<int>() == -1 && std::isnan(dist2[1].item<float>()),
        "a non-finite row gives -1 / NaN (cosine, int32 indices)");

  at::Tensor logits = at::zeros({64, 10});
  logits.select(1, 7).fill_(30.0f);
  at::Tensor philox = at::tensor({int64_t{1234}, int64_t{0}});
  auto [y, sidx, lse, best] = mimfast::gumbel_softmax(logits, philox, 1.0, true);
  check((sidx == 7).all().item<bool>() && (y.sum(1) == 1).all().item<bool>(), "hard Gumbel-softmax samples");
  auto again = mimfast::gumbel_softmax(at::randn({16, 33}), philox, 0.5);
  check(std::get<0>(again).sum(1).sub(1).abs().max().item<float>() < 1e-5f, "soft samples sum to 1");

  std::printf(failures == 0 ? "all checks passed\n" : "%d check(s) failed\n", failures);
  return failures == 0 ? 0 : 1;
}
