// The per-element CPU kernels, written once with GCC/Clang vector extensions and compiled once per ISA.
//
// CMake compiles this file with MIMFAST_ISA_NS = base / avx2 / avx512 and MIMFAST_VEC_BYTES = 16 / 32 / 64 (plus the
// matching -m flags); the compiler lowers the vector types to SSE / NEON, AVX2 or AVX-512. The arithmetic is fixed
// (-ffp-contract=off, no fast-math): a seeded Gumbel call is reproducible, and the noise, scores and indices are the
// same bits on every ISA (row sums are accumulated per lane, so softmax values differ across ISAs by rounding).
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels.h"

#ifndef MIMFAST_ISA_NS
#define MIMFAST_ISA_NS base
#endif
#ifndef MIMFAST_VEC_BYTES
#define MIMFAST_VEC_BYTES 16
#endif

namespace mimfast {
namespace cpu {
namespace MIMFAST_ISA_NS {
namespace {

constexpr int VB = MIMFAST_VEC_BYTES;
constexpr int W = VB / 4;
typedef float vf __attribute__((vector_size(VB)));
typedef int32_t vi __attribute__((vector_size(VB)));
typedef uint32_t vu __attribute__((vector_size(VB)));

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

inline vf loadf(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vi loadi(const int32_t* p) {
  vi v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void storef(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void storei(int32_t* p, vi v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
inline vi splati(int32_t x) { return vi{} + x; }
inline vi iota() {
  vi v{};
  for (int i = 0; i < W; ++i) v[i] = i;
  return v;
}
inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ------------------------------------------------------------------------------------------- codebook search
template <bool COSINE>
void vq_epilogue_impl(const VqEpilogue& a) {
  const vf ninf = splat(-kInf);
  const vi lane = iota();
  for (int64_t r = 0; r < a.rows; ++r) {
    float* bp = a.best + r * W;
    int32_t* ip = a.index + r * W;
    vf b = loadf(bp);
    vi bi = loadi(ip);
    const float* s = a.S + r * a.lds;
    const float sc = COSINE ? a.scale[r] : 0.0f;
    const vf scv = splat(sc);
    vi kv = lane + splati(static_cast<int32_t>(a.k0));
    int64_t j = 0;
    for (; j + W <= a.codes; j += W) {
      const vf d = loadf(s + j);
      const vf v = COSINE ? loadf(a.en + j) + scv * (d * loadf(a.einv + j)) : loadf(a.en + j) + d;
      // NaN fails both compares; +inf is never < the running best (<= +inf); -inf is excluded explicitly
      const vi m = (v < b) & (v > ninf);
      b = m ? v : b;
      bi = m ? kv : bi;
      kv += W;
    }
    for (int t = 0; j < a.codes; ++j, ++t) {
      const float v = COSINE ? a.en[j] + sc * (s[j] * a.einv[j]) : a.en[j] + s[j];
      if (v < b[t] && v > -kInf) {
        b[t] = v;
        bi[t] = static_cast<int32_t>(a.k0 + j);
      }
    }
    storef(bp, b);
    storei(ip, bi);
  }
}

void vq_epilogue(const VqEpilogue& a) {
  if (a.cosine)
    vq_epilogue_impl<true>(a);
  else
    vq_epilogue_impl<false>(a);
}

// ------------------------------------------------------------------------------------------- Gumbel noise
// Scalar / vector twins: the same code runs on float and on vf (the tails of rows use the scalar form).
inline uint32_t as_u(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline vu as_u(vf x) { return (vu)x; }
inline float as_f(uint32_t u) { return bits_to_float(u); }
inline vf as_f(vu u) { return (vf)u; }
inline int32_t as_i(uint32_t u) { return static_cast<int32_t>(u); }
inline vi as_i(vu u) { return (vi)u; }
inline uint32_t as_u(int32_t i) { return static_cast<uint32_t>(i); }
inline vu as_u(vi i) { return (vu)i; }
template <class T>
inline T bcast(float x);
template <>
inline float bcast<float>(float x) {
  return x;
}
template <>
inline vf bcast<vf>(float x) {
  return splat(x);
}
inline float i2f(int32_t i) { return static_cast<float>(i); }
inline vf i2f(vi i) { return __builtin_convertvector(i, vf); }
inline int32_t f2i(float f) { return static_cast<int32_t>(f); }
inline vi f2i(vf f) { return __builtin_convertvector(f, vi); }

// logf for positive normal finite inputs (the only ones the noise produces): reduction to m in [sqrt(1/2), sqrt(2)),
// log(m) = f - f^2/2 + s (f^2/2 + R(s^2)), s = f / (2 + f) (the classic fdlibm scheme, < 1 ulp). Branch-free.
template <class T>
inline T logf_pos(T x) {
  auto ix = as_u(x) + (0x3f800000u - 0x3f3504f3u);
  const auto k = as_i(ix >> 23) - 0x7f;
  ix = (ix & 0x007fffffu) + 0x3f3504f3u;
  const T f = as_f(ix) - 1.0f;
  const T s = f / (2.0f + f);
  const T z = s * s;
  const T w = z * z;
  const T t1 = w * (0.40000972152f + w * 0.24279078841f);
  const T t2 = z * (0.66666662693f + w * 0.28498786688f);
  const T rr = t2 + t1;
  const T hfsq = 0.5f * f * f;
  const T dk = i2f(k);
  return s * (hfsq + rr) + dk * 9.0580006145e-06f - hfsq + f + dk * 6.9313812256e-01f;
}

// exp for x <= 0 (softmax arguments s - max); 0 below -87.33 (and for -inf). Cephes' polynomial, ~1 ulp.
template <class T>
inline T expf_neg(T x) {
  const auto under = x < -87.33654f;  // (x is never NaN here)
  const T xc = under ? bcast<T>(-87.33654f) : x;
  const T t = xc * 1.44269504089f + 12582912.0f;  // round to nearest integer (|x log2 e| < 2^22)
  const T n = t - 12582912.0f;
  T r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  T p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const T y = p * r * r + r + 1.0f;
  const T scale = as_f(as_u(f2i(n) + 127) << 23);
  return under ? bcast<T>(0.0f) : y * scale;
}

constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;

// Philox4x32-10 of counters base .. base + groups - 1 (c0 / c1 = low / high 32 bits, c2 = c3 = 0, key = seed);
// lane l of group j lands in out[4 j + l]: the bits of code 4 j + l.
void philox_row(uint64_t base, int64_t groups, uint64_t seed, uint32_t* out) {
  const uint32_t s0 = static_cast<uint32_t>(seed), s1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t j = 0; j < groups; ++j) {
    const uint64_t c = base + static_cast<uint64_t>(j);
    uint32_t c0 = static_cast<uint32_t>(c), c1 = static_cast<uint32_t>(c >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = s0, k1 = s1;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      const uint64_t pa = static_cast<uint64_t>(c0) * kRoundA;
      const uint64_t pb = static_cast<uint64_t>(c2) * kRoundB;
      const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(pb);
      c3 = static_cast<uint32_t>(pa);
      c0 = n0;
      c2 = n2;
      k0 += kKeyA;
      k1 += kKeyB;
    }
    out[4 * j] = c0;
    out[4 * j + 1] = c1;
    out[4 * j + 2] = c2;
    out[4 * j + 3] = c3;
  }
}

// g = -log(max(-log(max(u, 2^-32)), 2^-26)), u = triton's uint_to_uniform_float(bits)
template <class T, class U>
inline T gumbel_from_bits(U b) {
  const U v = b < 0x80000000u ? b : ~b;
  T u = i2f(as_i(v)) * 4.6566127342e-10f;
  u = u < 0x1p-32f ? bcast<T>(0x1p-32f) : u;
  T e = -logf_pos(u);
  e = e < 0x1p-26f ? bcast<T>(0x1p-26f) : e;
  return -logf_pos(e);
}

// Scores s = (l + g) * r of row n into s[0:K]; returns whether any is NaN (then NaN -> -inf), and the row max and
// its first index through m / am.
bool row_scores(const GumbelArgs& a, int64_t n, float* s, uint32_t* bits, float* m, int64_t* am) {
  const int64_t K = a.k, G = (K + 3) / 4;
  const float* l = a.logits + n * K;
  const bool sampled = a.sample_rows == nullptr || a.sample_rows[n] != 0;
  const float r = a.r;
  if (sampled) {
    philox_row(a.offset + static_cast<uint64_t>(n) * static_cast<uint64_t>(G), G, a.seed, bits);
    int64_t k = 0;
    for (; k + W <= K; k += W) {
      vu b;
      std::memcpy(&b, bits + k, sizeof b);
      storef(s + k, (loadf(l + k) + gumbel_from_bits<vf>(b)) * r);
    }
    for (; k < K; ++k) s[k] = (l[k] + gumbel_from_bits<float>(bits[k])) * r;
  } else {
    for (int64_t k = 0; k < K; ++k) s[k] = (l[k] + 0.0f) * r;
  }
  // NaN check + clean, then the first maximum (vector lanes keep their first max; ties -> lowest index across lanes)
  vi nanv = splati(0);
  const vf ninf = splat(-kInf);
  vf best = ninf;
  vi bidx = splati(0);
  vi kv = iota();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    vf v = loadf(s + k);
    const vi isn = v != v;
    nanv |= isn;
    v = isn ? ninf : v;
    storef(s + k, v);
    const vi gt = v > best;
    best = gt ? v : best;
    bidx = gt ? kv : bidx;
    kv += W;
  }
  bool nan = false;
  for (int i = 0; i < W; ++i) nan |= nanv[i] != 0;
  float bm = -kInf;
  int64_t bi = 0;
  for (int i = 0; i < W; ++i) {
    if (best[i] > bm || (best[i] == bm && bidx[i] < bi)) {
      bm = best[i];
      bi = bidx[i];
    }
  }
  if (bm == -kInf) bi = 0;  // all -inf so far: torch.argmax's first index
  for (; k < K; ++k) {
    float v = s[k];
    if (v != v) {
      nan = true;
      v = -kInf;
      s[k] = v;
    }
    if (v > bm) {
      bm = v;
      bi = k;
    }
  }
  *m = bm;
  *am = bi;
  return nan;
}

// sum_k exp(s_k - m), writing the exponentials back into s
float exp_sum(float* s, int64_t K, float m) {
  vf acc = splat(0.0f);
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    vf v = loadf(s + k) - m;
    const vf e = expf_neg(v);
    storef(s + k, e);
    acc += e;
  }
  float total = 0.0f;
  for (int i = 0; i < W; ++i) total += acc[i];
  for (; k < K; ++k) {
    s[k] = expf_neg(s[k] - m);
    total += s[k];
  }
  return total;
}

int64_t first_argmax_clean(const float* l, int64_t K, float r) {
  float bm = -kInf;
  int64_t bi = 0;
  for (int64_t k = 0; k < K; ++k) {
    float v = l[k] * r;
    if (v != v) v = -kInf;
    if (v > bm) {
      bm = v;
      bi = k;
    }
  }
  return bi;
}

void gumbel_fwd(const GumbelArgs& a, int64_t n0, int64_t n1, bool hard, float* y, int64_t* idx, float* lse,
                int64_t* best, float* scratch) {
  const int64_t K = a.k;
  float* s = scratch;
  uint32_t* bits = reinterpret_cast<uint32_t*>(scratch + K + 16);
  for (int64_t n = n0; n < n1; ++n) {
    float m;
    int64_t am;
    const bool nan = row_scores(a, n, s, bits, &m, &am);
    const bool bad = nan || std::isinf(m);
    float* yr = y ? y + n * K : nullptr;
    if (bad) {
      idx[n] = -1;
      if (best) best[n] = -1;
      if (lse) lse[n] = kNaN;
      if (yr)
        for (int64_t k = 0; k < K; ++k) yr[k] = kNaN;
      continue;
    }
    idx[n] = am;
    if (best) best[n] = first_argmax_clean(a.logits + n * K, K, a.r);
    if (!yr && !lse) continue;
    const float total = exp_sum(s, K, m);
    if (lse) lse[n] = m + std::log(total);
    if (!yr) continue;
    if (hard) {
      for (int64_t k = 0; k < K; ++k) yr[k] = 0.0f;
      yr[am] = 1.0f;
    } else {
      const float inv = 1.0f / total;
      for (int64_t k = 0; k < K; ++k) yr[k] = s[k] * inv;
    }
  }
}

void gumbel_bwd(const GumbelArgs& a, int64_t n0, int64_t n1, const float* dy, float* dl, float* scratch) {
  const int64_t K = a.k;
  float* s = scratch;
  uint32_t* bits = reinterpret_cast<uint32_t*>(scratch + K + 16);
  for (int64_t n = n0; n < n1; ++n) {
    float m;
    int64_t am;
    const bool nan = row_scores(a, n, s, bits, &m, &am);
    float* out = dl + n * K;
    if (nan || std::isinf(m)) {
      for (int64_t k = 0; k < K; ++k) out[k] = kNaN;
      continue;
    }
    const float inv = 1.0f / exp_sum(s, K, m);
    const float* g = dy + n * K;
    vf accv = splat(0.0f);
    int64_t k = 0;
    for (; k + W <= K; k += W) {
      const vf yv = loadf(s + k) * inv;
      storef(s + k, yv);
      accv += yv * loadf(g + k);
    }
    float dot = 0.0f;
    for (int i = 0; i < W; ++i) dot += accv[i];
    for (; k < K; ++k) {
      s[k] *= inv;
      dot += s[k] * g[k];
    }
    const float r = a.r;
    for (k = 0; k < K; ++k) out[k] = (s[k] * (g[k] - dot)) * r;
  }
}

const KernelTable kTable = {
#define MIMFAST_STR2(x) #x
#define MIMFAST_STR(x) MIMFAST_STR2(x)
    MIMFAST_STR(MIMFAST_ISA_NS), W, &vq_epilogue, &gumbel_fwd, &gumbel_bwd,
};

}  // namespace

const KernelTable* table() { return &kTable; }

}  // namespace MIMFAST_ISA_NS
}  // namespace cpu
}  // namespace mimfast
