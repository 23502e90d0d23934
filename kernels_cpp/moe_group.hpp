// The engine on group-wise INT4 (kt's RAWINT4: row-major offset-binary nibbles, even column in the low
// nibble, one bf16 scale per `group` columns of a row; docs/FORMAT.md §7). Weights are read in place.
//
// Numerics (identical on every ISA path):
//   group sum : gsum[i][g][j] = Σ_{c in group g} (u[r0+j][c] - 8) · a[i][c], exact in int32
//               (the ISA kernels below; |gsum| <= 128·8·128 < 2^24, so float(gsum) is exact)
//   product   : P[i][j] = (((0 + float(gsum[i][0][j]) · s[j][0]) + float(gsum[i][1][j]) · s[j][1]) + ...)
//               each product and sum rounded to float, groups in order (group_product, one shared
//               implementation)
//   gate/up   : g = P_gate[i][j] · xd[i], u = P_up[i][j] · xd[i]; the clamp and SiLU-gate as moe.hpp says
//   down      : y = (first ? 0 : y) + P[i][j] · ad[i]
// The product and the SiLU-gate run per ISA (group_scale / group_gemm, Epilogue::group_silu_gate: the same
// IEEE operations in the same order, no FMA); down runs in one baseline implementation shared by every ISA
// (moe_group_ref.cpp). So the results are bit-identical whatever kernels ran.
#pragma once
#include <cstdint>

#include "moe.hpp"

namespace kt {
namespace moe {

// Exact group sums of rows r0..r0+31 of a row-major [n, k] group-wise INT4 matrix w (k/2 bytes per row)
// with m <= 16 int8 activation rows (row i contiguous at a + i * lda): gsum[(i * G + g) * 32 + j], G = k / group.
// same_rows: the previous call on this thread had the same (w, k, r0) (a kernel may keep what it unpacked).
// split, corr: the rows prepared by a GroupPrepareFn (row i at split + i * k, corr + i * G), or null (the
// kernel prepares what it needs itself).
using GroupDot = void(const uint8_t* w, int64_t k, int64_t group, int64_t r0, const int8_t* a, int64_t lda,
                      const int8_t* split, const int32_t* corr, int64_t m, int32_t* gsum, bool same_rows);

// The float product of one activation row from its exact group sums gsum [G][32] and the 32 rows' bf16
// scales st [G][32] (row-group order): P[j] = (((0 + float(gsum[0][j]) · s[0][j]) + float(gsum[1][j]) · s[1][j])
// + ...). One implementation per ISA, every one the same IEEE roundings in the same order (no FMA), so the
// results are bit-identical whichever runs.
using GroupScale = void(const int32_t* gsum, const uint16_t* st, int64_t G, float* P);

// Per activation row (k columns at a + i * lda): its even then its odd columns (k/2 each) at split + i * k, and
// 8 · Σa over each group at corr + i * (k / group): what the SIMD kernels need, made once per row.
using GroupPrepare = void(const int8_t* a, int64_t lda, int64_t m, int64_t k, int64_t group, int8_t* split,
                          int32_t* corr);

// P[i * 32 + j] (i < m, any m) of rows r0..r0+31 of matrix (w, bf16 scales st in row-group order, see
// group_scales_by_rowgroup) against the activation rows a (lda) and their preparation (split, corr; not null):
// the group sums and their float product in one pass, every value that of group_product below, bit for bit.
// Made for many rows: the 32 weight rows are unpacked once per call into the kernel's own layout. The AMX
// kernel reads round_up(m, 16) rows of a (the extra rows must be readable; their results are dropped).
using GroupGemm = void(const uint8_t* w, const uint16_t* st, int64_t k, int64_t group, int64_t r0, const int8_t* a,
                       int64_t lda, const int8_t* split, const int32_t* corr, int64_t m, float* P);

using GroupDotFn = GroupDot*;
using GroupScaleFn = GroupScale*;
using GroupPrepareFn = GroupPrepare*;
using GroupGemmFn = GroupGemm*;

namespace ref {  // moe_group_ref.cpp: the definitions (group_gemm is group_product of these)
GroupDot group_dot;
GroupScale group_scale;
GroupPrepare group_prepare;
GroupGemm group_gemm;
}  // namespace ref
namespace avx2 {  // moe_group_avx2.cpp (VPMADDUBSW)
GroupDot group_dot;
GroupScale group_scale;
GroupPrepare group_prepare;
GroupGemm group_gemm;
}  // namespace avx2
namespace avx512 {  // moe_group_avx512.cpp (VPDPBUSD)
GroupDot group_dot;
GroupScale group_scale;
GroupPrepare group_prepare;
GroupGemm group_gemm;
}  // namespace avx512
namespace amx {  // moe_group_amx.cpp: tiles for 16+ rows (tuning().amx_min_tokens), else the AVX-512 kernels;
                 // every call loads its own tile configuration
GroupDot group_dot;
GroupGemm group_gemm;
}  // namespace amx

// The engine's copy of a matrix's bf16 group scales s [n, G] (n a multiple of 32), in row-group order:
// out[((r / 32) * G + g) * 32 + r % 32] = s[r * G + g]. Made once when the layer is built, so that the float
// product reads the 32 scales of a (row group, group) contiguously instead of transposing them per call.
void group_scales_by_rowgroup(const uint16_t* s, int64_t n, int64_t G, uint16_t* out);

// P[i * 32 + j] (i < m, any m) of rows r0..r0+31 of matrix (w, bf16 scales st in row-group order) against the
// row-major activations a (lda): group sums by `dot`, 16 rows at a time, then the float product by `scale`.
// The definition of every GroupGemmFn, and the few-rows path of the group-wise schedule.
void group_product(GroupDotFn dot, GroupScaleFn scale, const uint8_t* w, const uint16_t* st, int64_t k, int64_t group,
                   int64_t r0, const int8_t* a, int64_t lda, const int8_t* split, const int32_t* corr, int64_t m, float* P);

// The down step of the group-wise path, one implementation for every ISA: y = (first ? 0 : y) + P · ad.
void group_down(const float* p, int64_t m, const float* ad, float* y, int64_t ys, bool first);

}  // namespace moe
}  // namespace kt
