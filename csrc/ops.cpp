// torch glue of mimfast's native CPU kernels: argument checks, dtype / layout handling, blocking and threading
// (at::parallel_for), the BLAS tiles of the codebook search, and the dispatcher registrations.
//
// Registered under mimfast_native:: always (the Python package's CPU kernels call those), and under mimfast:: when
// nothing has defined that namespace's ops yet (a libtorch program without Python; see include/mimfast/ops.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "mimfast/ops.h"

#ifndef MIMFAST_VERSION
#define MIMFAST_VERSION "0.0.0"
#endif

// Fortran BLAS sgemm of the BLAS torch links (MKL in x86-64 wheels exports it); a weak reference, so a torch without
// it falls back to at::mm on tile views.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
// MKL: run this thread's BLAS calls single-threaded (the tiles are already spread over at::parallel_for's threads;
// a nested MKL team per tile call costs more than the tile). Absent from other BLAS builds: weak, then unused.
extern "C" int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));

namespace mimfast {
namespace {

using at::Tensor;
using cpu::KernelTable;

// ------------------------------------------------------------------------------------------------ ISA choice
const KernelTable* table_named(const std::string& name) {
#if defined(MIMFAST_HAVE_AVX512)
  if (name == "avx512") return cpu::avx512::table();
#endif
#if defined(MIMFAST_HAVE_AVX2)
  if (name == "avx2") return cpu::avx2::table();
#endif
  if (name == "base") return cpu::base::table();
  return nullptr;
}

bool cpu_supports(const std::string& name) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return name == "base";
}

const KernelTable* best_table() {
  const char* env = std::getenv("MIMFAST_NATIVE_ISA");  // force a narrower ISA (tests, debugging)
  if (env != nullptr && *env != '\0') {
    const KernelTable* t = table_named(env);
    if (t != nullptr && cpu_supports(env)) return t;
  }
  for (const char* name : {"avx512", "avx2"}) {
    const KernelTable* t = table_named(name);
    if (t != nullptr && cpu_supports(name)) return t;
  }
  return cpu::base::table();
}

const KernelTable*& active() {
  static const KernelTable* t = best_table();
  return t;
}

// ------------------------------------------------------------------------------------------------ helpers
bool kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_float(const char* name, const Tensor& t, int64_t ndim) {
  TORCH_CHECK(t.device().is_cpu(), "mimfast native: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == ndim, "mimfast native: ", name, ": expected a ", ndim, "-D tensor, got ", t.sizes());
  TORCH_CHECK(kernel_dtype(t.scalar_type()), "mimfast native: ", name,
              ": expected float32 / bfloat16 / float16 (float64 takes the Python reference), got ", t.scalar_type());
}

Tensor as_f32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

at::ScalarType dtype_from_name(c10::string_view name) {
  if (name == "float32") return at::kFloat;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  TORCH_CHECK(false, "mimfast native: output dtype must be float32 / bfloat16 / float16 (float64 takes the Python "
              "reference), got ", std::string(name));
}

Tensor to_dtype(const Tensor& t, at::ScalarType dt) { return dt == at::kFloat ? t : t.to(dt); }

// -------------------------------------------------------------------------------------------- codebook search
constexpr double kNormLimit = 42535295865117307932921825928971026432.0;  // 2^125

// S[r, j] = alpha * x_r . e_j for rows / codes of the tile; S row-major with leading dimension lds.
void tile_gemm(const float* x, const float* e, int64_t rows, int64_t codes, int64_t d, float alpha, float* S,
               int64_t lds) {
  if (sgemm_ != nullptr && d <= std::numeric_limits<int>::max() && lds <= std::numeric_limits<int>::max()) {
    // column-major view: S^T (codes x rows) = E (codes x d) . X^T (d x rows)
    const int m = static_cast<int>(codes), n = static_cast<int>(rows), k = static_cast<int>(d);
    const int ld = static_cast<int>(d), ldc = static_cast<int>(lds);
    const float beta = 0.0f;
    sgemm_("T", "N", &m, &n, &k, &alpha, e, &ld, x, &ld, &beta, S, &ldc);
    return;
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  Tensor xs = at::from_blob(const_cast<float*>(x), {rows, d}, opts);
  Tensor es = at::from_blob(const_cast<float*>(e), {codes, d}, opts);
  Tensor prod = at::mm(xs, es.t());
  if (alpha != 1.0f) prod.mul_(alpha);
  const float* p = prod.const_data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) std::memcpy(S + r * lds, p + r * codes, sizeof(float) * codes);
}

std::tuple<Tensor, Tensor, Tensor> vq_search_cpu(const Tensor& x, const Tensor& codebook,
                                                 const std::optional<Tensor>& valid, bool cosine, bool int32_index,
                                                 bool with_counts, double eps, c10::string_view precision) {
  check_float("x", x, 2);
  check_float("codebook", codebook, 2);
  const int64_t n = x.size(0), d = x.size(1), k = codebook.size(0);
  TORCH_CHECK(d >= 1, "mimfast native: x: expected a feature dimension D >= 1");
  TORCH_CHECK(k >= 1, "mimfast native: codebook: expected at least one code (K >= 1)");
  TORCH_CHECK(codebook.size(1) == d, "mimfast native: codebook: expected shape (K, ", d, "), got ", codebook.sizes());
  TORCH_CHECK(k < std::numeric_limits<int32_t>::max(), "mimfast native: K must be below 2^31");
  if (valid.has_value()) {
    TORCH_CHECK(valid->scalar_type() == at::kBool && valid->dim() == 1 && valid->size(0) == n,
                "mimfast native: valid: expected a (", n, ",) bool tensor");
  }
  at::ScalarType round_to = at::ScalarType::Undefined;
  if (precision == "bf16") {
    round_to = at::kBFloat16;
  } else if (precision == "fp16") {
    round_to = at::kHalf;
  } else {
    TORCH_CHECK(precision == "fp32" || precision == "ieee" || precision == "tf32" || precision == "tf32x3",
                "mimfast native: unknown precision ", std::string(precision));
  }
  Tensor idx = at::empty({n}, at::TensorOptions().dtype(int32_index ? at::kInt : at::kLong));
  Tensor dist = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  Tensor counts = at::zeros({with_counts ? k : 0}, at::TensorOptions().dtype(at::kInt));
  if (n == 0) return {idx, dist, counts};

  const Tensor xf = as_f32(x), ef = as_f32(codebook);
  // products use operands rounded to the product dtype; the norms always use the unrounded values
  const Tensor xr = round_to == at::ScalarType::Undefined ? xf : xf.to(round_to).to(at::kFloat).contiguous();
  const Tensor er = round_to == at::ScalarType::Undefined ? ef : ef.to(round_to).to(at::kFloat).contiguous();

  // Norm terms with the reference's own tensor ops in its order (torch's vectorised sqrt / reciprocal are not
  // always correctly rounded, so only the same ops give the same bits): O((N + K) D), negligible next to the search.
  const Tensor xsq_t = xf.mul(xf).sum(-1), esq_t = ef.mul(ef).sum(-1);
  Tensor xn_t, en_t, scale_t, einv_t;
  if (cosine) {
    const Tensor xinv = xsq_t.sqrt().clamp_min(eps).reciprocal();
    einv_t = esq_t.sqrt().clamp_min(eps).reciprocal().contiguous();
    xn_t = xsq_t.mul(xinv).mul(xinv).contiguous();
    en_t = esq_t.mul(einv_t).mul(einv_t).contiguous();
    scale_t = xinv.mul(-2.0).contiguous();
  } else {
    xn_t = xsq_t.contiguous();
    en_t = esq_t.masked_fill(esq_t.ge(kNormLimit), std::numeric_limits<double>::quiet_NaN()).contiguous();
  }
  const Tensor xsq_c = xsq_t.contiguous();
  const float* xsq = xsq_c.const_data_ptr<float>();
  const float* xn = xn_t.const_data_ptr<float>();
  const float* en = en_t.const_data_ptr<float>();
  const float* einv = cosine ? einv_t.const_data_ptr<float>() : nullptr;
  const float* scale = cosine ? scale_t.const_data_ptr<float>() : nullptr;

  const KernelTable* kt = active();
  const int lanes = kt->lanes;
  const int nthreads = std::max(1, at::get_num_threads());
  int64_t rb = 128;  // rows per tile: the score tile (rb x kb fp32) stays in L2 while the epilogue reads it
  while (rb > 16 && (n + rb - 1) / rb < 2 * nthreads) rb /= 2;
  const int64_t kb = std::min<int64_t>(k, d <= 64 ? 1024 : 512);
  const int64_t nblocks = (n + rb - 1) / rb;
  std::vector<float> best(n);
  std::vector<int32_t> best_idx(n);
  const float* xrp = xr.const_data_ptr<float>();
  const float* erp = er.const_data_ptr<float>();
  const float alpha = cosine ? 1.0f : -2.0f;

  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    const int mkl_prev = MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0;
    std::unique_ptr<float[]> S(new float[rb * kb]);
    std::vector<float> run(rb * lanes);
    std::vector<int32_t> run_idx(rb * lanes);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * rb, rows = std::min(rb, n - r0);
      std::fill(run.begin(), run.end(), std::numeric_limits<float>::infinity());
      std::fill(run_idx.begin(), run_idx.end(), 0);
      for (int64_t k0 = 0; k0 < k; k0 += kb) {
        const int64_t codes = std::min(kb, k - k0);
        tile_gemm(xrp + r0 * d, erp + k0 * d, rows, codes, d, alpha, S.get(), kb);
        cpu::VqEpilogue a;
        a.S = S.get();
        a.rows = rows;
        a.codes = codes;
        a.lds = kb;
        a.k0 = k0;
        a.en = en + k0;
        a.einv = cosine ? einv + k0 : nullptr;
        a.scale = cosine ? scale + r0 : nullptr;
        a.cosine = cosine;
        a.best = run.data();
        a.index = run_idx.data();
        kt->vq_epilogue(a);
      }
      for (int64_t r = 0; r < rows; ++r) {  // lanes -> row: the minimum, the lowest index among equal minima
        float bv = std::numeric_limits<float>::infinity();
        int32_t bi = 0;
        bool any = false;
        for (int l = 0; l < lanes; ++l) {
          const float v = run[r * lanes + l];
          const int32_t i = run_idx[r * lanes + l];
          if (v < bv || (v == bv && any && i < bi)) {
            bv = v;
            bi = i;
            any = true;
          }
        }
        best[r0 + r] = bv;
        best_idx[r0 + r] = bi;
      }
    }
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(mkl_prev);
  });

  const bool* vp = nullptr;
  Tensor vc;
  if (valid.has_value()) {
    vc = valid->contiguous();
    vp = vc.const_data_ptr<bool>();
  }
  int64_t* i64 = int32_index ? nullptr : idx.mutable_data_ptr<int64_t>();
  int32_t* i32 = int32_index ? idx.mutable_data_ptr<int32_t>() : nullptr;
  float* dp = dist.mutable_data_ptr<float>();
  int32_t* cp = with_counts ? counts.mutable_data_ptr<int32_t>() : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    const bool finite = (cosine ? std::isfinite(xsq[i]) : xsq[i] < kNormLimit) && std::isfinite(best[i]);
    const bool ok = finite && (vp == nullptr || vp[i]);
    float dv = finite ? std::max(xn[i] + best[i], 0.0f) : std::numeric_limits<float>::quiet_NaN();
    if (vp != nullptr && !vp[i]) dv = 0.0f;
    const int64_t iv = ok ? best_idx[i] : -1;
    dp[i] = dv;
    if (i64 != nullptr) i64[i] = iv;
    else i32[i] = static_cast<int32_t>(iv);
    if (cp != nullptr && ok) cp[iv] += 1;
  }
  return {idx, dist, counts};
}

// -------------------------------------------------------------------------------------------- Gumbel-softmax
cpu::GumbelArgs gumbel_args(const Tensor& lf, const Tensor& rows, const Tensor& philox, double tau) {
  TORCH_CHECK(philox.scalar_type() == at::kLong && philox.dim() == 1 && philox.numel() == 2,
              "mimfast native: philox: expected a (2,) int64 tensor (seed, offset)");
  TORCH_CHECK(std::isfinite(tau) && tau > 0, "mimfast native: tau: expected a finite temperature > 0, got ", tau);
  const Tensor ph = philox.contiguous();
  cpu::GumbelArgs a;
  a.logits = lf.const_data_ptr<float>();
  a.sample_rows = rows.defined() ? reinterpret_cast<const uint8_t*>(rows.const_data_ptr<bool>()) : nullptr;
  a.n = lf.size(0);
  a.k = lf.size(1);
  a.seed = static_cast<uint64_t>(ph.const_data_ptr<int64_t>()[0]);
  a.offset = static_cast<uint64_t>(ph.const_data_ptr<int64_t>()[1]);
  a.r = static_cast<float>(1.0 / tau);  // fp32(1 / tau), as inv_tau()
  return a;
}

Tensor sample_rows_of(const std::optional<Tensor>& sample_rows, int64_t n) {
  if (!sample_rows.has_value()) return Tensor();
  TORCH_CHECK(sample_rows->scalar_type() == at::kBool && sample_rows->dim() == 1 && sample_rows->size(0) == n,
              "mimfast native: sample_rows: expected a (", n, ",) bool tensor");
  return sample_rows->contiguous();
}

int64_t row_grain(int64_t k) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(k, 1)); }

std::tuple<Tensor, Tensor, Tensor, Tensor> gumbel_fwd_cpu(const Tensor& logits,
                                                          const std::optional<Tensor>& sample_rows,
                                                          const Tensor& philox, double tau, bool hard, bool write_y,
                                                          bool with_best) {
  check_float("logits", logits, 2);
  const int64_t n = logits.size(0), k = logits.size(1);
  TORCH_CHECK(k >= 1, "mimfast native: logits: expected at least one code (K >= 1)");
  const Tensor lf = as_f32(logits);
  const Tensor rows = sample_rows_of(sample_rows, n);
  const cpu::GumbelArgs a = gumbel_args(lf, rows, philox, tau);
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  auto i64 = at::TensorOptions().dtype(at::kLong);
  Tensor y = at::empty({write_y ? n : 0, k}, f32);
  Tensor idx = at::empty({n}, i64);
  Tensor lse = at::empty({write_y ? n : 0}, f32);
  Tensor best = at::empty({with_best ? n : 0}, i64);
  float* yp = write_y ? y.mutable_data_ptr<float>() : nullptr;
  float* lp = write_y ? lse.mutable_data_ptr<float>() : nullptr;
  int64_t* ip = idx.mutable_data_ptr<int64_t>();
  int64_t* bp = with_best ? best.mutable_data_ptr<int64_t>() : nullptr;
  const KernelTable* kt = active();
  at::parallel_for(0, n, row_grain(k), [&](int64_t n0, int64_t n1) {
    std::vector<float> scratch(2 * k + 64);
    kt->gumbel_fwd(a, n0, n1, hard, yp, ip, lp, bp, scratch.data());
  });
  return {to_dtype(y, logits.scalar_type()), idx, lse, best};
}

Tensor gumbel_bwd_cpu(const Tensor& grad, const Tensor& logits, const std::optional<Tensor>& sample_rows,
                      const Tensor& philox, const Tensor& lse, double tau) {
  (void)lse;  // the statistics are recomputed from the row (bit-identical to the forward's)
  check_float("logits", logits, 2);
  check_float("grad", grad, 2);
  TORCH_CHECK(grad.sizes() == logits.sizes(), "mimfast native: grad: expected shape ", logits.sizes());
  const int64_t n = logits.size(0), k = logits.size(1);
  const Tensor lf = as_f32(logits), gf = as_f32(grad);
  const Tensor rows = sample_rows_of(sample_rows, n);
  const cpu::GumbelArgs a = gumbel_args(lf, rows, philox, tau);
  Tensor dl = at::empty({n, k}, at::TensorOptions().dtype(at::kFloat));
  const float* gp = gf.const_data_ptr<float>();
  float* dp = dl.mutable_data_ptr<float>();
  const KernelTable* kt = active();
  at::parallel_for(0, n, row_grain(k), [&](int64_t n0, int64_t n1) {
    std::vector<float> scratch(2 * k + 64);
    kt->gumbel_bwd(a, n0, n1, gp, dp, scratch.data());
  });
  return to_dtype(dl, logits.scalar_type());
}

// -------------------------------------------------------------------------------------- token gather / restore
Tensor long_index(const char* name, const Tensor& ids, int64_t b, int64_t limit) {
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == b, "mimfast native: ", name, ": expected a (", b, ", L) tensor");
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, "mimfast native: ", name,
              ": expected int32 / int64");
  Tensor r = ids.to(at::kLong).contiguous();
  const int64_t* p = r.const_data_ptr<int64_t>();
  int64_t lo = 0, hi = 0;
  for (int64_t i = 0; i < r.numel(); ++i) {
    lo = i == 0 ? p[i] : std::min(lo, p[i]);
    hi = i == 0 ? p[i] : std::max(hi, p[i]);
  }
  TORCH_CHECK_INDEX(r.numel() == 0 || (lo >= 0 && hi < limit), name, ": values must lie in [0, ", limit, "), got [",
                    lo, ", ", hi, "]");
  return r;
}

inline void add_row(float* out, const float* a, const float* b, int64_t d) {
  if (b == nullptr) {
    std::memcpy(out, a, sizeof(float) * d);
  } else {
    for (int64_t i = 0; i < d; ++i) out[i] = a[i] + b[i];
  }
}

Tensor gather_tokens_cpu(const Tensor& x, const Tensor& ids_keep, const Tensor& ids_restore,
                         const std::optional<Tensor>& pos, const std::optional<Tensor>& prefix,
                         c10::string_view out_dtype) {
  (void)ids_restore;  // the backward's index (autograd lives in Python / the caller)
  check_float("x", x, 3);
  const at::ScalarType dt = dtype_from_name(out_dtype);
  const int64_t b = x.size(0), l = x.size(1), d = x.size(2);
  const Tensor ids = long_index("ids_keep", ids_keep, b, l);
  const int64_t lk = ids.size(1);
  const Tensor xf = as_f32(x);
  Tensor pf, pre;
  if (pos.has_value()) {
    check_float("pos", *pos, 2);
    TORCH_CHECK(pos->size(0) >= l && pos->size(1) == d, "mimfast native: pos: expected (", l, ", ", d, ")");
    pf = as_f32(*pos);
  }
  int64_t p = 0;
  if (prefix.has_value()) {
    TORCH_CHECK(prefix->dim() == 2 || prefix->dim() == 3, "mimfast native: prefix: expected (P, D) or (B, P, D)");
    check_float("prefix", *prefix, prefix->dim());
    p = prefix->size(-2);
    pre = as_f32(*prefix);
  }
  Tensor out = at::empty({b, p + lk, d}, at::TensorOptions().dtype(at::kFloat));
  const float* xp = xf.const_data_ptr<float>();
  const float* pp = pf.defined() ? pf.const_data_ptr<float>() : nullptr;
  const float* qp = pre.defined() ? pre.const_data_ptr<float>() : nullptr;
  const bool shared = pre.defined() && pre.dim() == 2;
  const int64_t* ip = ids.const_data_ptr<int64_t>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t t = p + lk;
  at::parallel_for(0, b * t, std::max<int64_t>(1, 4096 / d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bi = r / t, ti = r % t;
      float* o = op + r * d;
      if (ti < p) {
        std::memcpy(o, qp + ((shared ? 0 : bi * p) + ti) * d, sizeof(float) * d);
      } else {
        const int64_t src = ip[bi * lk + (ti - p)];
        add_row(o, xp + (bi * l + src) * d, pp ? pp + src * d : nullptr, d);
      }
    }
  });
  return to_dtype(out, dt);
}

Tensor restore_tokens_cpu(const Tensor& x, const Tensor& ids_restore, const std::optional<Tensor>& fill,
                          const std::optional<Tensor>& pos, int64_t num_prefix, bool covers_all,
                          c10::string_view out_dtype) {
  (void)covers_all;  // only matters to the backward
  check_float("x", x, 3);
  const at::ScalarType dt = dtype_from_name(out_dtype);
  const int64_t b = x.size(0), rows = x.size(1), d = x.size(2), p = num_prefix;
  TORCH_CHECK(p >= 0 && p <= rows, "mimfast native: num_prefix must lie in [0, ", rows, "]");
  TORCH_CHECK(ids_restore.dim() == 2, "mimfast native: ids_restore: expected (B, L)");
  const int64_t seq = ids_restore.size(1), lk = rows - p;
  const Tensor ids = long_index("ids_restore", ids_restore, b, seq);
  const Tensor xf = as_f32(x);
  Tensor pf, ff;
  if (pos.has_value()) {
    check_float("pos", *pos, 2);
    TORCH_CHECK(pos->size(0) == p + seq && pos->size(1) == d, "mimfast native: pos: expected (", p + seq, ", ", d,
                ")");
    pf = as_f32(*pos);
  }
  if (fill.has_value()) {
    TORCH_CHECK(fill->dim() == 1 || fill->dim() == 2, "mimfast native: fill: expected (D,) or (B, D)");
    check_float("fill", *fill, fill->dim());
    ff = as_f32(*fill);
  }
  Tensor out = at::empty({b, p + seq, d}, at::TensorOptions().dtype(at::kFloat));
  const std::vector<float> zeros(d, 0.0f);
  const float* xp = xf.const_data_ptr<float>();
  const float* pp = pf.defined() ? pf.const_data_ptr<float>() : nullptr;
  const float* fp = ff.defined() ? ff.const_data_ptr<float>() : nullptr;
  const bool per_sample = ff.defined() && ff.dim() == 2;
  const int64_t* ip = ids.const_data_ptr<int64_t>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t t = p + seq;
  at::parallel_for(0, b * t, std::max<int64_t>(1, 4096 / d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bi = r / t, ti = r % t;
      const float* src;
      if (ti < p) {
        src = xp + (bi * rows + ti) * d;
      } else {
        const int64_t j = ip[bi * seq + (ti - p)];
        src = j < lk ? xp + (bi * rows + p + j) * d : (fp ? fp + (per_sample ? bi * d : 0) : zeros.data());
      }
      add_row(op + r * d, src, pp ? pp + ti * d : nullptr, d);
    }
  });
  return to_dtype(out, dt);
}

std::tuple<Tensor, Tensor> restore_tokens_bwd_cpu(const Tensor& grad, const Tensor& ids_restore, int64_t rows,
                                                  int64_t num_prefix, c10::string_view x_dtype, bool with_fill,
                                                  bool covers_all) {
  (void)covers_all;
  check_float("grad", grad, 3);
  const at::ScalarType dt = dtype_from_name(x_dtype);
  const int64_t b = grad.size(0), d = grad.size(2), p = num_prefix, lk = rows - p;
  TORCH_CHECK(p >= 0 && lk >= 0, "mimfast native: expected 0 <= num_prefix <= rows");
  TORCH_CHECK(ids_restore.dim() == 2 && grad.size(1) == p + ids_restore.size(1),
              "mimfast native: grad: expected (B, num_prefix + L, D)");
  const int64_t seq = ids_restore.size(1);
  const Tensor ids = long_index("ids_restore", ids_restore, b, seq);
  const Tensor g = as_f32(grad);
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  Tensor gx = at::zeros({b, rows, d}, f32);
  Tensor gfill = with_fill ? at::zeros({b, d}, f32) : at::zeros({0, d}, f32);
  const float* gp = g.const_data_ptr<float>();
  const int64_t* ip = ids.const_data_ptr<int64_t>();
  float* xo = gx.mutable_data_ptr<float>();
  float* fo = with_fill ? gfill.mutable_data_ptr<float>() : nullptr;
  const int64_t t = p + seq;
  at::parallel_for(0, b, 1, [&](int64_t b0, int64_t b1) {  // one sample per task: its rows and its filler sum
    for (int64_t bi = b0; bi < b1; ++bi) {
      for (int64_t ti = 0; ti < t; ++ti) {
        const float* src = gp + (bi * t + ti) * d;
        if (ti < p) {
          float* o = xo + (bi * rows + ti) * d;
          for (int64_t i = 0; i < d; ++i) o[i] = 0.0f + src[i];
          continue;
        }
        const int64_t j = ip[bi * seq + (ti - p)];
        if (j < lk) {
          float* o = xo + (bi * rows + p + j) * d;
          for (int64_t i = 0; i < d; ++i) o[i] += src[i];  // each visible row receives at most one contribution
        } else if (fo != nullptr) {
          float* o = fo + bi * d;
          for (int64_t i = 0; i < d; ++i) o[i] += src[i];
        }
      }
    }
  });
  return {to_dtype(gx, dt), gfill};
}

std::string native_info() {
  return std::string("mimfast_native ") + MIMFAST_VERSION + " isa=" + active()->isa +
         " lanes=" + std::to_string(active()->lanes) + " torch=" + MIMFAST_TORCH_VERSION +
         " blas=" + (sgemm_ != nullptr ? "sgemm" : "at::mm") + " threads=" + std::to_string(at::get_num_threads());
}

std::string set_isa(c10::string_view name) {
  const std::string s(name);
  const KernelTable* t = s.empty() ? best_table() : table_named(s);
  TORCH_CHECK(t != nullptr && (s.empty() || cpu_supports(s)), "mimfast native: ISA '", s,
              "' is not built in or not supported by this CPU");
  active() = t;
  return active()->isa;
}

// ------------------------------------------------------------------------------------------------ registration
constexpr const char* kSchemas[] = {
    "vq_search(Tensor x, Tensor codebook, Tensor? valid, bool cosine, bool int32_index, bool with_counts, "
    "float eps, str precision) -> (Tensor, Tensor, Tensor)",
    "gumbel_softmax(Tensor logits, Tensor? sample_rows, Tensor philox, float tau, bool hard, bool write_y, "
    "bool with_best) -> (Tensor, Tensor, Tensor, Tensor)",
    "gumbel_softmax_bwd(Tensor grad, Tensor logits, Tensor? sample_rows, Tensor philox, Tensor lse, float tau) "
    "-> Tensor",
    "gather_tokens(Tensor x, Tensor ids_keep, Tensor ids_restore, Tensor? pos, Tensor? prefix, str out_dtype) "
    "-> Tensor",
    "restore_tokens(Tensor x, Tensor ids_restore, Tensor? fill, Tensor? pos, SymInt num_prefix, bool covers_all, "
    "str out_dtype) -> Tensor",
    "restore_tokens_bwd(Tensor grad, Tensor ids_restore, SymInt rows, SymInt num_prefix, str x_dtype, "
    "bool with_fill, bool covers_all) -> (Tensor, Tensor)",
};

void define_ops(torch::Library& m) {
  for (const char* s : kSchemas) m.def(s);
}

void impl_ops(torch::Library& m) {
  m.impl("vq_search", &vq_search_cpu);
  m.impl("gumbel_softmax", &gumbel_fwd_cpu);
  m.impl("gumbel_softmax_bwd", &gumbel_bwd_cpu);
  m.impl("gather_tokens", &gather_tokens_cpu);
  m.impl("restore_tokens", &restore_tokens_cpu);
  m.impl("restore_tokens_bwd", &restore_tokens_bwd_cpu);
}

// The mimfast:: names for libtorch programs: only when nothing (the Python package) has defined them.
struct PublicRegistration {
  std::unique_ptr<torch::Library> def, impl;
  PublicRegistration() {
    if (c10::Dispatcher::singleton().findSchema({"mimfast::vq_search", ""}).has_value()) return;
    def = std::make_unique<torch::Library>(torch::Library::FRAGMENT, "mimfast", std::nullopt, __FILE__, __LINE__);
    define_ops(*def);
    impl = std::make_unique<torch::Library>(torch::Library::IMPL, "mimfast", c10::DispatchKey::CPU, __FILE__,
                                            __LINE__);
    impl_ops(*impl);
  }
};

}  // namespace

std::string native_version() { return std::string("mimfast ") + MIMFAST_VERSION + " (" + active()->isa + ")"; }

TORCH_LIBRARY(mimfast_native, m) {
  define_ops(m);
  m.def("info() -> str", &native_info);
  m.def("set_isa(str isa) -> str", &set_isa);
}

TORCH_LIBRARY_IMPL(mimfast_native, CPU, m) { impl_ops(m); }

namespace {
const PublicRegistration public_registration;
}  // namespace

}  // namespace mimfast
