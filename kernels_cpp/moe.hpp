// CPU MoE engine over the kt AMXINT4 / AMXINT8 tiled layout (docs/FORMAT.md §2-§4):
// per-token int8 activations, gate/up products, SiLU-gate
// with optional clamp, per-(token, NUMA slice) int8 re-quantization of the intermediate, down
// product, weighted sum over top-k. Weights are read in place (no repacking).
//
// Numerics (identical on every ISA path):
//   x row   : d = amax/127, q = rne(x * fl32(1/d))              (kt BufferA)
//   product : acc = Σ qa·qw exactly in int32 (INT4: qw = nibble<<4 = q*16, as kt feeds it)
//             y = float(acc) * (da * dw)   (so INT4 dequantizes as q*16*dw)
//   act     : g += bg, u += bu (gate/up biases, when given); g = min(g, L), u = clamp(u, -L, L)
//             when a limit is set; silu: a = g/(1+exp(-g)) * u;
//             gpt_oss: a = g/(1+exp(-(g*alpha))) * (u + up_offset)  (= (u+1) * g*sigmoid(1.702 g));
//             situ: a = beta*tanh(g/beta) / (1+exp(-g)) * (linear_beta*tanh(u/linear_beta))  (std::tanh)
//   down    : per NUMA slice t the intermediate slice is re-quantized like x; y = down bias (or 0)
//             plus the T partials in t order, then out[token] += w_slot * y in expert-id order.
//   exp     : exp_det (below), not libm
// The SIMD kernels return the same int32 sums as the portable reference; the float steps have a
// scalar reference and AVX-512 / AVX2 versions doing the same IEEE operations in the same order
// (Epilogue below), so every ISA path gives bit-identical results.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "pack.hpp"

namespace kt {
namespace moe {

// One packed matrix (one NUMA shard of one projection): n rows of k columns.
struct PackedMat {
  const uint8_t* w = nullptr;   // tiled bytes: n*k (INT8) or n*k/2 (INT4); group-wise INT4: row-major n*k/2
  const float* s = nullptr;     // n per-row scales (AMX-tiled methods)
  const uint16_t* gs = nullptr; // group-wise INT4: bf16 scales in row-group order (group_scales_by_rowgroup)
};

struct ExpertShard {
  PackedMat gate, up, down;  // gate/up: n=I_l, k=H;  down: n=H, k=I_l
};

struct Config {
  Method method = Method::Int4;
  int64_t hidden = 0;             // H
  int64_t intermediate = 0;       // I (all NUMA slices)
  int64_t threadpool_count = 1;   // T: NUMA pools the packed file is split into
  int64_t experts = 0;            // E
  bool clamp = false;             // swiglu_limit given
  float limit = 0.f;
  bool gpt_oss = false;           // gpt-oss activation (alpha, up_offset) instead of SiLU
  float alpha = 1.702f;
  float up_offset = 1.0f;
  bool situ = false;              // Kimi K3's SiTU: beta*tanh(g/beta)*sigmoid(g) * linear_beta*tanh(u/linear_beta)
  float beta = 4.0f;
  float linear_beta = 25.0f;
  int64_t i_local() const { return intermediate / threadpool_count; }
};

// shards[e * threadpool_count + t]; biases (gpt-oss), each empty or full: gate_bias / up_bias
// [E, I] (column t*I_local + i of expert e is NUMA slice t's row i), down_bias [E, H].
struct Weights {
  Config cfg;
  std::vector<ExpertShard> shards;
  std::vector<float> gate_bias, up_bias, down_bias;
  std::vector<std::vector<uint16_t>> group_scales;  // group-wise INT4: the storage of the PackedMat::gs copies
  const float* gate_b(int64_t e, int64_t t, int64_t r0) const {
    return gate_bias.empty() ? nullptr : gate_bias.data() + e * cfg.intermediate + t * cfg.i_local() + r0;
  }
  const float* up_b(int64_t e, int64_t t, int64_t r0) const {
    return up_bias.empty() ? nullptr : up_bias.data() + e * cfg.intermediate + t * cfg.i_local() + r0;
  }
  const float* down_b(int64_t e, int64_t c0) const {
    return down_bias.empty() ? nullptr : down_bias.data() + e * cfg.hidden + c0;
  }
};

// The activation of one 32-row gate/up group: the layer's clamp and activation, and the group's 32
// gate and up biases (nullptr: none).
struct GateAct {
  bool clamp = false;
  float limit = 0.f;
  bool gpt_oss = false;
  float alpha = 1.702f, up_offset = 1.0f;
  const float* bg = nullptr;
  const float* bu = nullptr;
  bool situ = false;
  float beta = 4.0f, linear_beta = 25.0f;
  static GateAct of(const Weights& w, int64_t e, int64_t t, int64_t r0) {
    const Config& c = w.cfg;
    return {c.clamp, c.limit, c.gpt_oss, c.alpha, c.up_offset, w.gate_b(e, t, r0), w.up_b(e, t, r0), c.situ, c.beta,
            c.linear_beta};
  }
};

// Throws std::invalid_argument on a bad configuration (alignment, sizes).
void validate_config(const Config& cfg);

// Creates the forward's persistent pool of num_threads threads (> 0) if it does not exist yet and
// returns its size; throws ThreadStartError (thread_pool.hpp) when the system refuses a thread.
int start_pool(int num_threads);

struct IsaKernels;  // moe_isa.hpp

// out[tokens, H] = Σ_j w[t,j] · expert_{ids[t,j]}(x[t]).  x, out: fp32 row-major. kernels: a row of
// isa_table() that this CPU runs.
void forward(const Weights& weights, const float* x, int64_t tokens, const int64_t* ids, const float* topk_w,
             int64_t topk, float* out, const IsaKernels& kernels, int num_threads);

// The schedules give identical results. Tiled methods: decode (moe_decode.cpp) for few rows per expert,
// prefill (moe_prefill.cpp) from tuning().prefill_min_avg_rows rows per active expert on average.
// Group-wise methods: one schedule at every size (moe_group_schedule.cpp), its GEMM kernels from
// tuning().group_gemm_min_rows rows of an expert. The knobs (tuning.hpp) change speed only.

// Stage profile of the last prefill-schedule or group-wise forward (when tuning().profiling is on): seconds
// summed over threads per stage, and the wall time of the call. Keys: wall, serial, q, pack, g_dot, g_epi, s,
// d_dot, d_epi, wait, and the schedule's task sizes.
std::vector<std::pair<const char*, double>> last_profile();

// Layout of an int8 activation block: element (row i, column c), c % 64 == 0 for the start of
// a 64-byte run, lives at  (i / 16) * bs + (i % 16) * rs + (c / 64) * ks + c % 64.
//   row-major with leading dimension lda: rs = lda, bs = 16 * lda, ks = 64
//   panel (AMX A tiles, k columns): rows in 16-row blocks; a block is k/64 tiles of 16 x 64
//   bytes, contiguous: rs = 64, bs = 16 * k, ks = 1024
struct ALayout {
  int64_t rs, bs, ks;
  static ALayout row_major(int64_t lda) { return {lda, 16 * lda, 64}; }
  static ALayout panel(int64_t k) { return {64, 16 * k, 1024}; }
  // first byte of row i at column c (c % 64 == 0); the next 64 bytes are columns c..c+63
  const int8_t* at(const int8_t* a, int64_t i, int64_t c) const { return a + (i >> 4) * bs + (i & 15) * rs + (c >> 6) * ks; }
  int8_t* at(int8_t* a, int64_t i, int64_t c) const { return a + (i >> 4) * bs + (i & 15) * rs + (c >> 6) * ks; }
};

// Kernel: exact int32 dot products of one 32-row group of a packed [n, k] matrix (rows r0..r0+31,
// r0 % 32 == 0) with m int8 activation rows a (layout la, c < k); asum[i] = Σ_c a[i][c].
// out[i*32 + j] = Σ_c W[r0+j][c] * a[i][c] (INT4: W = nibble*16).
// The AMX kernel reads round_up(m, 16) rows (the extra rows must be readable; their results are dropped).
using Dot = void(Method method, const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, ALayout la,
                 const int32_t* asum, int64_t m, int32_t* out);
using DotFn = Dot*;

namespace ref {
Dot dot_rowgroup;  // moe_ref.cpp: the definition
}
namespace avx2 {
Dot dot_rowgroup;  // moe_avx2.cpp: VPMADDUBSW
}
namespace avxvnni {
Dot dot_rowgroup;  // moe_avxvnni.cpp: VEX VPDPBUSD
}
namespace avx512 {
Dot dot_rowgroup;  // moe_avx512.cpp: VPDPBUSD
}
namespace amx {
// AMX tile kernel for many tokens; falls back to avx512 for m < tuning().amx_min_tokens. How it
// reads INT8 B is tuning().amx_int8_mode (results identical in every mode). dot_rowgroup loads the tile
// configuration on every call; dot_rowgroup_nocfg expects configure_thread() on the thread before it.
Dot dot_rowgroup;
Dot dot_rowgroup_nocfg;
void configure_thread();
// Names the row group (of a matrix of the call's method) that this thread multiplies next: the
// next dot_rowgroup_nocfg call on the thread prefetches its first chunks at its end, then forgets it.
void hint_next_group(const uint8_t* w, int64_t n, int64_t k, int64_t r0);
// Names bytes (activation rows) this thread reads soon: the next dot_rowgroup_nocfg call on the
// thread prefetches them into L2, spread over its tile steps, then forgets them.
void hint_next_rows(const void* p, int64_t bytes);
}  // namespace amx

// Byte offset of chunk (row group r0, K-block kb) inside a packed [n,k] matrix and its size.
inline int64_t chunk_offset(Method method, int64_t n, int64_t k, int64_t r0, int64_t kb) {
  const int64_t nb_rows = method_info(method).n_block;
  const int64_t nb = r0 / nb_rows * nb_rows;
  const int64_t nbs = (n - nb) < nb_rows ? (n - nb) : nb_rows;
  const int64_t kbs = (k - kb) < K_BLOCK ? (k - kb) : K_BLOCK;
  const int64_t elems = nb * k + kb * nbs + (r0 - nb) * kbs;
  return elems / method_info(method).elems_per_byte;
}

// GB/s of a multi-threaded streaming read of buf (64-byte aligned; whole MiB chunks), best of reps.
double read_bandwidth_gbs(const uint8_t* buf, int64_t bytes, int num_threads, int reps);

// Per-token symmetric int8 quantization (kt BufferA); returns d, writes q and Σq. (The portable
// reference, ref::quantize.)
float quantize_act(const float* x, int64_t k, int8_t* q, int32_t* qsum);

// ---- float stages ("epilogues"). ref:: (moe_epilogue_ref.cpp, baseline x86-64) is the definition;
// avx512:: (moe_epilogue_avx512.cpp) and avx2:: (moe_epilogue_avx2.cpp) perform the same IEEE
// operations in the same order per element (no FMA contraction, no reassociation; max/min with
// the same NaN operand order), so the results are bit-identical. exp is exp_det, a fixed
// Cephes-style range reduction + polynomial, not libm's expf.
//   quantize : see quantize_act
//   silu_gate: for i < m, j < 32: g = float(ag[i*32+j]) * (xd[i]*sg[j]), u likewise with au, su;
//              bias (p.bg / p.bu given): g = g + bg[j], u = u + bu[j];
//              clamp: g = min(g, L), u = min(max(u, -L), L);
//              silu: act[i*stride + j] = g / (1 + exp(-g)) * u;
//              gpt_oss: act[i*stride + j] = g / (1 + exp(-(g * alpha))) * (u + up_offset);
//              situ: act[i*stride + j] = beta * tanh(g / beta) / (1 + exp(-g)) * (linear_beta * tanh(u / linear_beta)),
//              scalar on every ISA (the SIMD epilogues call ref::activate per element)
//   down     : y[i*ys + j] = (first ? (b ? b[j] : 0) : y[i*ys + j]) + float(acc[i*32+j]) * (ad[i]*sd[j])
//   down_out : the last down step fused with the weighted sum over ng 32-column groups (group g:
//              acc + g*gs, y + g*gs, sd + g*32, b + g*32, columns g*32..), for i < m, j < 32:
//              v = (y ? y[g*gs + i*32+j] : b ? b[g*32+j] : 0) + float(acc[g*gs + i*32+j]) * (ad[i]*sd[g*32+j]);
//              out[tok[i]*os + g*32 + j] += w[i] * v      (= down then axpy, the same operations)
//   axpy     : o[j] += w * y[j], j < n
//   exp      : y[i] = exp_det(x[i])  (tests)
//   group_silu_gate: silu_gate from float products (the group-wise path, moe_group.hpp): g = pg[i*32+j] * xd[i],
//              u = pu[i*32+j] * xd[i], then bias, clamp and activation as silu_gate
struct Epilogue {
  float (*quantize)(const float* x, int64_t k, int8_t* q, int32_t* qsum);
  void (*silu_gate)(const int32_t* ag, const int32_t* au, int64_t m, const float* xd, const float* sg,
                    const float* su, const GateAct& p, float* act, int64_t stride);
  void (*down)(const int32_t* acc, int64_t m, const float* ad, const float* sd, float* y, int64_t ys, bool first,
               const float* b);
  void (*down_out)(const int32_t* acc, int64_t gs, int64_t ng, int64_t m, const float* ad, const float* sd,
                   const float* y, const float* b, const float* w, const int64_t* tok, float* out, int64_t os);
  void (*axpy)(float* o, float w, const float* y, int64_t n);
  void (*exp)(const float* x, int64_t n, float* y);
  void (*group_silu_gate)(const float* pg, const float* pu, int64_t m, const float* xd, const GateAct& p, float* act,
                          int64_t stride);
};
const Epilogue& epilogue_ref();
const Epilogue& epilogue_avx512();
const Epilogue& epilogue_avx2();
namespace ref {
// The bias, clamp and activation of one gate/up pair g, u of row j of a 32-row group (silu_gate's definition
// after the products); compiled for the baseline whoever calls it (never inlined).
float activate(float g, float u, const GateAct& p, int j);
}  // namespace ref
// Deterministic exp (scalar reference): x clamped to [-87, 88], n = rne(x*log2e) by the 1.5*2^23
// trick, r = (x - n*C1) - n*C2, Cephes polynomial, times 2^n built in the exponent bits.
float exp_det(float x);

}  // namespace moe
}  // namespace kt
