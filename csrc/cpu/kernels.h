// Raw-pointer CPU kernels of mimfast's ops (no torch headers): the parts that run per element.
//
// kernels_isa.cpp is compiled once per vector ISA (baseline, AVX2 + FMA, AVX-512 on x86-64; baseline elsewhere),
// each copy filling a KernelTable; ops.cpp picks the widest table the running CPU supports. Everything here works on
// contiguous fp32 buffers; dtype conversion, strides, threading and the torch.library glue live in ops.cpp.
#pragma once

#include <cstdint>

namespace mimfast {
namespace cpu {

struct VqEpilogue {
  // Scores of one (row block x code block) tile: S[r * lds + j] is -2 x_r.e_{k0+j} (l2) or x_r.e_{k0+j} (cosine).
  const float* S;
  int64_t rows, codes, lds, k0;
  const float* en;     // (codes,) ||e||^2 (NaN at or above the l2 norm limit) or ||e^||^2 (cosine), from k0
  const float* einv;   // cosine only: (codes,) 1 / max(||e||, eps), from k0
  const float* scale;  // cosine only: (rows,) -2 / max(||x||, eps)
  bool cosine;
  float* best;     // (rows, lanes) running minima, +inf at the start
  int32_t* index;  // (rows, lanes) their code indices
};

struct GumbelArgs {
  const float* logits;        // (N, K) contiguous fp32
  const uint8_t* sample_rows; // (N,) 0 / 1 or nullptr (every row sampled)
  int64_t n, k;
  uint64_t seed, offset;      // Philox key and counter offset
  float r;                    // fp32(1 / tau)
};

struct KernelTable {
  const char* isa;
  int lanes;  // fp32 lanes per vector: the running-state width of the codebook search
  // Fold one score tile into the running (best, index) state of its rows: strict < per lane as k increases, so
  // each lane keeps the lowest index among equal minima; non-finite scores never win.
  void (*vq_epilogue)(const VqEpilogue& a);
  // Rows [n0, n1) of the Gumbel-softmax forward. y: (N, K) or nullptr; idx, best (nullptr unless wanted): (N,);
  // lse: (N,) or nullptr. scratch: at least 2 * K + 64 floats.
  void (*gumbel_fwd)(const GumbelArgs& a, int64_t n0, int64_t n1, bool hard, float* y, int64_t* idx, float* lse,
                     int64_t* best, float* scratch);
  // Rows [n0, n1) of the backward: dl = r * y * (dy - sum(y * dy)), y recomputed. dy, dl: (N, K) contiguous fp32.
  void (*gumbel_bwd)(const GumbelArgs& a, int64_t n0, int64_t n1, const float* dy, float* dl, float* scratch);
};

namespace base { const KernelTable* table(); }
namespace avx2 { const KernelTable* table(); }
namespace avx512 { const KernelTable* table(); }

}  // namespace cpu
}  // namespace mimfast
