// Packing of expert weight matrices into the kt-kernel AMXINT4 / AMXINT8 BufferB image:
// decode the source rows to fp32, per-row symmetric quantization with kt's exact rounding,
// then AMX tiling (2048-byte tile pairs, N_BLOCK x K_BLOCK blocks). See docs/FORMAT.md.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "cpu_features.hpp"

namespace kt {

// RawInt4G*: kt's RAWINT4 (compressed-tensors pack-quantized, row-major, bf16 scale per group of K);
// packed here only (the engine refuses them: moe_bindings.cpp).
enum class Method { Int4, Int8, RawInt4G32, RawInt4G64, RawInt4G128 };

// The C++ side of the method table (kt_runtime/format/methods.py; tests/test_format_room.py checks
// that both hold the same numbers).
struct MethodInfo {
  int n_block;           // rows per N-block
  int k_align;           // K (and the NUMA slice of I) must be a multiple of this
  int elems_per_byte;
  int levels;            // d = amax / levels
  bool fp32_reciprocal;  // d = fl32(amax * fl32(1/levels)) (INT8); else fl32((double)amax / levels) (INT4)
  int group_size;        // 0: one fp32 scale per row (AMX-tiled); else K elements per bf16 scale, row-major
};
inline constexpr MethodInfo method_info(Method m) {
  switch (m) {
    case Method::Int4: return MethodInfo{128, 128, 2, 112, false, 0};
    case Method::Int8: return MethodInfo{64, 64, 1, 127, true, 0};
    case Method::RawInt4G32: return MethodInfo{1, 32, 2, 7, false, 32};
    case Method::RawInt4G64: return MethodInfo{1, 64, 2, 7, false, 64};
    case Method::RawInt4G128: return MethodInfo{1, 128, 2, 7, false, 128};
  }
  return MethodInfo{0, 0, 0, 0, false, 0};
}
inline constexpr bool is_grouped(Method m) { return method_info(m).group_size != 0; }
Method parse_method(const std::string& name);  // "int4" | "int8" | "rawint4-g32" | "rawint4-g64" | "rawint4-g128"

constexpr int K_BLOCK = 3584;   // K elements per K-block
constexpr int TILE_ROWS = 32;   // rows per tile pair
constexpr int TILE_BYTES = 64;  // bytes per tile row
constexpr int TILE_PAIR_BYTES = 2048;

// The AMX B-tile order of one N-block of quantized rows held row-major (row stride kbytes), shared by every
// ISA's tile_block: calls half(src, dst) for each 16-row half of each 32-row x 64-byte tile pair, `src` the
// half's first source row at the tile's first byte, `dst` its 1024 output bytes. A half is a 16x16 matrix of
// 32-bit words stored transposed: word c of output row r is word r of source row c.
template <class Half>
inline void for_each_tile_half(const uint8_t* rows, int64_t nbs, int64_t kbytes, int64_t kblock_bytes, uint8_t* out,
                               Half half) {
  for (int64_t kb = 0; kb < kbytes; kb += kblock_bytes) {
    const int64_t kbs = kblock_bytes < kbytes - kb ? kblock_bytes : kbytes - kb;
    for (int64_t ns = 0; ns < nbs; ns += TILE_ROWS)
      for (int64_t ks = 0; ks < kbs; ks += TILE_BYTES)
        for (int h = 0; h < 2; ++h)
          half(rows + (ns + h * 16) * kbytes + kb + ks, out + kb * nbs + ns * kbs + ks * TILE_ROWS + h * 1024);
  }
}

// How source rows are stored. Each kind decodes one row slice to fp32 exactly as the
// reference decoder does (values are exactly representable in bf16 after decoding).
enum class SourceKind {
  BF16,   // uint16 bf16 bits [n, ktot]
  F32,    // float32 [n, ktot] (already rounded to bf16 by the caller)
  MXFP4,  // uint8 [n, ktot/2] E2M1 nibbles (low = even column) + uint8 E8M0 [n, ktot/32]
  // The kinds below are not bf16-exact when decoded: each value is rounded to bf16
  // (round to nearest even, as torch's .to(bfloat16)) after the fp32 decode, as kt does.
  F16,         // uint16 IEEE half bits [n, ktot]
  FP8_BLOCK,   // uint8 F8_E4M3FN [n, ktot] * float32 block scales [cdiv(N,block_n), cdiv(ktot,block_k)]
  INT4_GROUP,  // int32 words [n, ktot/8] (element j of a word at bits 4j, stored q+8) * scales
               // [n, ktot/block_k] as bf16 (scale_bits 16) or float32 (32): (u - 8) * scale
  NVFP4,       // uint8 [n, ktot/2] E2M1 nibbles (as MXFP4) * uint8 F8_E4M3 [n, ktot/16] group scales, each
               // times (or divided by: global_divides) the per-tensor global_scale: v * fl32(s * g | s / g)
  MXFP8,       // uint8 F8_E4M3FN [n, ktot] * uint8 E8M0 [n, ktot/32] (as MXFP4's scales)
};

struct PackJob {
  SourceKind kind = SourceKind::BF16;
  const uint8_t* weight = nullptr;  // first byte of row 0 of the source
  int64_t weight_row_bytes = 0;     // stride between source rows
  const uint8_t* scales = nullptr;  // MXFP4: E8M0 bytes; FP8_BLOCK: float32; INT4_GROUP: bf16/float32
  int64_t scale_row_bytes = 0;
  int scale_bits = 8;        // INT4_GROUP: 16 (bf16 scales) or 32 (float32)
  int64_t block_n = 1;       // FP8_BLOCK: rows per scale block
  int64_t block_k = 32;      // FP8_BLOCK: columns per scale block; INT4_GROUP: group size
  int64_t row_offset = 0;    // FP8_BLOCK: index of row 0 in the scale grid (row slices of a matrix)
  float global_scale = 1.f;  // NVFP4: the per-tensor scale
  bool global_divides = false;  // NVFP4: group scale / global_scale (compressed-tensors), else * (ModelOpt)
  int64_t n = 0, k = 0;  // rows and columns of the packed matrix
  int64_t col0 = 0;      // first source column (NUMA slice of down)
  uint8_t* out_weight = nullptr;  // tiled bytes, n*k (INT8) or n*k/2 (INT4); RAWINT4: row-major n*k/2
  void* out_scale = nullptr;      // n fp32 scales; RAWINT4: n*k/group bf16 bits, row-major
  int64_t nonfinite = 0;          // out: NaN/Inf source values found (packed as 0)
  // RAWINT4 from INT4_GROUP with bf16 scales whose groups hold whole output groups: codes and scales are
  // copied, not requantized (decided by the caller: quant/group_int4.py:carries_codes)
  bool carry_codes = false;
};

// Packs every job on the kernels of `isa` (kernels_for); work is split into (job, N-block) tasks over
// the shared pool.
void pack_jobs(Method method, std::vector<PackJob>& jobs, Isa isa, int num_threads);
int64_t packed_weight_bytes(Method method, int64_t n, int64_t k);

// Per-ISA pieces. Row kernels work on one source row; the tiler on one N-block of
// quantized rows held row-major (row stride = kbytes).
// Decodes columns [col0, col0+k) of `row` into fp32; non-finite values become 0 and are counted.
using DecodeRowFn = int64_t (*)(const PackJob& job, int64_t row, float* out);
// kt's per-row quantization; writes k int8 values (INT4: the 4-bit value -7..7) and returns d.
using QuantizeRowFn = float (*)(Method method, const float* x, int64_t k, int8_t* q);
// INT4: packs pairs (k0+j, k0+64+j) of each 128-wide step into one byte.
using PackNibblesFn = void (*)(const int8_t* q, int64_t k, uint8_t* out);
using TileBlockFn = void (*)(const uint8_t* rows, int64_t nbs, int64_t kbytes, int64_t kblock_bytes, uint8_t* out);
// RAWINT4: one row of k values (k a multiple of group) -> k/2 bytes and k/group bf16 scales (ref::quantize_groups_row).
using QuantizeGroupsRowFn = void (*)(const float* x, int64_t k, int64_t group, uint8_t* out, uint16_t* scales);

// One ISA's row of the packer's dispatch table (pack.cpp:kernels_for). A null entry, or a null decoder for a
// source kind, is taken from the row below: AVX-512 <- AVX2 (+F16C/FMA) <- the scalar reference, which has
// every entry. So a new source kind is its reference decoder, and each ISA's decoder where it adds speed.
struct PackKernels {
  DecodeRowFn (*decoder)(SourceKind kind);
  QuantizeRowFn quantize_row;
  PackNibblesFn pack_nibbles;
  TileBlockFn tile_block;
  QuantizeGroupsRowFn quantize_groups_row;
};

// The kernels for one ISA level, chosen once per pack_jobs call: each entry from the highest row at or
// below the level that has it (an AMX CPU runs the AVX-512 row).
struct ChosenKernels {
  Isa isa;
  QuantizeRowFn quantize_row;
  PackNibblesFn pack_nibbles;
  TileBlockFn tile_block;
  QuantizeGroupsRowFn quantize_groups_row;
  DecodeRowFn decoder(SourceKind kind) const;
};
ChosenKernels kernels_for(Isa isa);
// Which row each entry of kernels_for(isa) comes from, by name ("decode" for `kind`): tests check the
// table's inheritance through it.
std::vector<std::pair<std::string, Isa>> kernel_rows(Isa isa, SourceKind kind);

namespace ref {
PackKernels kernels();
// INT4_GROUP: the scale of `group` in `row`, as float.
float int4_group_scale(const PackJob& job, int64_t row, int64_t group);
// NVFP4: the multiplier of 16-column group `group` in `row`: fl32(e4m3 * g) or fl32(e4m3 / g).
float nvfp4_group_scale(const PackJob& job, int64_t row, int64_t group);
// NVFP4 / MXFP8: the value of column c of `row` before the bf16 rounding.
float nvfp4_value(const PackJob& job, int64_t row, int64_t c);
float mxfp8_value(const PackJob& job, int64_t row, int64_t c);
int64_t decode_row(const PackJob& job, int64_t row, float* out);  // every kind
float quantize_row(Method method, const float* x, int64_t k, int8_t* q);
void pack_nibbles(const int8_t* q, int64_t k, uint8_t* out);
void tile_block(const uint8_t* rows, int64_t nbs, int64_t kbytes, int64_t kblock_bytes, uint8_t* out);
// RAWINT4 (pack_group.cpp): the bf16 scale with the least squared error over the levels -7..7 for one group
// of g bf16-exact values (0 for an all-zero group). The error is computed exactly (float64), so every exact
// search finds the same scale: a SIMD row searches its own way, within the same limits.
uint16_t least_squares_scale(const float* x, int64_t g);
// The limits of that search (bf16 bit patterns, docs/FORMAT.md §9), for groups of up to 128 with largest
// |weight| amax > 0: the least-error scale is at least scale_floor_bits(amax, B) for any B at or above the
// least squared error (e.g. the error of some scale, rounded up), and at most scale_ceiling_bits(amax) (2 amax).
uint32_t scale_floor_bits(float amax, double sse_bound);
uint32_t scale_ceiling_bits(float amax);
// The SIMD searches' last step: of n lanes (error f, scale bits b), the least error, the smaller scale on a tie.
inline uint16_t least_error_lane(const double* f, const double* b, int n) {
  int best = 0;
  for (int i = 1; i < n; ++i)
    if (f[i] < f[best] || (f[i] == f[best] && b[i] < b[best])) best = i;
  return static_cast<uint16_t>(b[best]);
}
// One row of k values (k a multiple of group) -> k/2 bytes (offset-binary q+8, low nibble = even column) and
// k/group bf16 scales, each group's scale least_squares_scale and q = clamp(rint(x / d), -7, 7).
void quantize_groups_row(const float* x, int64_t k, int64_t group, uint8_t* out, uint16_t* scales);
// A source on the output's grid (job.carry_codes): row `row`'s codes and bf16 scales copied, each output group
// inside one source group; a group whose scale would decode to non-finite values is decoded and quantized
// (row_scratch: k floats). Returns the non-finite values found, as decode_row counts them.
int64_t carry_group_codes_row(const PackJob& job, int64_t row, int64_t group, uint8_t* out, uint16_t* scales,
                              float* row_scratch);
}  // namespace ref

namespace avx2 {  // kernels_cpp/pack_avx2.cpp: AVX2 + F16C + FMA
PackKernels kernels();
}  // namespace avx2

namespace avx512 {  // kernels_cpp/pack_avx512.cpp
PackKernels kernels();
}  // namespace avx512

}  // namespace kt
