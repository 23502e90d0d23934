// AVX2 dot kernel over the tiled layout, shared by two translation units with their own flags:
// moe_avx2.cpp (VPMADDUBSW + VPMADDWD, any AVX2 CPU) and moe_avxvnni.cpp (VEX VPDPBUSD, CPUs
// with AVX-VNNI). Everything here has internal linkage, so each TU keeps its own copy compiled
// for its ISA.
//
// A 64-byte tile row holds 4 K-bytes for 16 output rows; a ymm covers 8 of them (an "octet"), so
// one multiply-add against a broadcast of 4 activation bytes advances 8 rows by 4 K. The sums are
// exact in int32 for any int8 activations and weight bytes (VPMADDUBSW saturates its int16 pair
// sums, so its operands are kept small enough that it never does):
//   Vnni, INT8     u = w ^ 0x80 = w + 128 (u8)                     sum = Σu·a - 128·Σa
//   Vnni, INT4     x = b ^ 0x88, lo = x & 0x0F = q_lo + 8, hi = x & 0xF0 = 16·q_hi + 128, separate
//                  accumulators                                    sum = 16·Σlo·a + Σhi·a - 128·Σa
//   Sign, INT8     no activation is -128: VPMADDUBSW(|w|, a·sign(w)), pairs ≤ 2·128·127, widened
//                  by VPMADDWD every step                          sum = Σw·a
//   Maddubs, INT8  (the call has an activation -128) u = w ^ 0x80 = 16·uh + ul, ul = w & 0x0F,
//                  uh = ((w >> 4) & 0x0F) ^ 0x08: pairs ≤ 2·15·128; int16 partials of ul and uh
//                  over 8 steps (≤ 30720), widened with 1 and 16    sum = Σu·a - 128·Σa
//   Maddubs, INT4  lo = x & 0x0F, hi = (x >> 4) & 0x0F (both q + 8), int16 partials of lo + hi over
//                  4 steps (≤ 4·2·3840), widened with 1            sum = 16·(Σ(lo,hi)·a - 8·Σa)
#pragma once
#include <immintrin.h>

#include <cstring>

#include "moe.hpp"

namespace kt {
namespace moe {
namespace {
namespace avx2_dot {

enum class Mul { Vnni, Maddubs, Sign };

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

constexpr int PF = 4;  // software prefetch distance in tile pairs (as the AVX-512 kernel)

// Rows M (in one 16-row block of la) x the H 16-row halves h0.. of the 32-row group r0.
template <bool INT4, Mul MUL, int M, int H>
void pass(const uint8_t* w, int64_t n, int64_t k, int64_t r0, int h0, const int8_t* a, ALayout la,
          const int32_t* asum, int32_t* out) {
  constexpr bool VNNI = MUL == Mul::Vnni, MADD = MUL == Mul::Maddubs;
  constexpr int NV = 2 * H;                            // ymm per step: (half, octet)
  constexpr int L = VNNI && INT4 ? 2 : 1;              // VNNI INT4: low / high accumulators
  constexpr int S = VNNI && M * NV * L <= 4 ? 2 : 1;   // independent VPDPBUSD chains
  constexpr int P = MADD ? (INT4 ? 1 : 2) : 1;         // int16 partials (INT8: ul, uh)
  constexpr int F = INT4 ? 4 : 8;                      // Maddubs: steps per widening
  constexpr int64_t KSTEP = INT4 ? 128 : 64;
  const Method method = INT4 ? Method::Int4 : Method::Int8;
  __m256i acc[M][NV][L][S];
  __m256i part[M][NV][P];
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < NV; ++v) {
      for (int l = 0; l < L; ++l)
        for (int s = 0; s < S; ++s) acc[i][v][l][s] = _mm256_setzero_si256();
      for (int q = 0; q < P; ++q) part[i][v][q] = _mm256_setzero_si256();
    }
  const __m256i x0f = _mm256_set1_epi8(0x0F);
  const __m256i xf0 = _mm256_set1_epi8(static_cast<char>(0xF0));
  const __m256i x08 = _mm256_set1_epi8(0x08);
  const __m256i x80 = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i x88 = _mm256_set1_epi8(static_cast<char>(0x88));
  const __m256i one16 = _mm256_set1_epi16(1);
  const __m256i sixteen16 = _mm256_set1_epi16(16);

  {  // the first PF tile pairs
    const uint8_t* c0 = w + chunk_offset(method, n, k, r0, 0);
    const int64_t np0 = (k < K_BLOCK ? k : K_BLOCK) / KSTEP;
    for (int64_t q = 0; q < PF && q < np0; ++q)
      for (int hh = 0; hh < H; ++hh)
        for (int j = 0; j < 16; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(c0 + q * TILE_PAIR_BYTES + (h0 + hh) * 1024 + j * 64),
                       _MM_HINT_T0);
  }
  for (int64_t kb = 0; kb < k; kb += K_BLOCK) {
    const int64_t kbs = (k - kb) < K_BLOCK ? (k - kb) : K_BLOCK;
    const uint8_t* chunk = w + chunk_offset(method, n, k, r0, kb);
    const int64_t npairs = kbs / KSTEP;
    const uint8_t* next = kb + K_BLOCK < k ? w + chunk_offset(method, n, k, r0, kb + K_BLOCK) : nullptr;
    for (int64_t p = 0; p < npairs; ++p) {
      const uint8_t* tp = chunk + p * TILE_PAIR_BYTES;
      const uint8_t* pf = p + PF < npairs ? tp + PF * TILE_PAIR_BYTES
                                          : (next ? next + (p + PF - npairs) * TILE_PAIR_BYTES : tp);
      const int8_t* ap = la.at(a, 0, kb + p * KSTEP);  // row i: ap + i * la.rs; INT4 high half: + la.ks
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        for (int hh = 0; hh < H; ++hh)
          _mm_prefetch(reinterpret_cast<const char*>(pf + (h0 + hh) * 1024 + j * 64), _MM_HINT_T0);
        __m256i u0[NV], u1[NV];  // INT4: low / high nibbles; INT8: u (Vnni), ul / uh (Maddubs), |w| / w (Sign)
        for (int v = 0; v < NV; ++v) {
          const __m256i b = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(tp + (h0 + v / 2) * 1024 + j * 64 + (v % 2) * 32));
          if constexpr (INT4) {
            const __m256i x = _mm256_xor_si256(b, x88);
            u0[v] = _mm256_and_si256(x, x0f);
            u1[v] = VNNI ? _mm256_and_si256(x, xf0) : _mm256_and_si256(_mm256_srli_epi16(x, 4), x0f);
          } else if constexpr (VNNI) {
            u0[v] = _mm256_xor_si256(b, x80);
          } else if constexpr (MADD) {
            u0[v] = _mm256_and_si256(b, x0f);
            u1[v] = _mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), x0f), x08);
          } else {
            u0[v] = _mm256_abs_epi8(b);
            u1[v] = b;
          }
        }
        for (int i = 0; i < M; ++i) {
          const __m256i al = bcast4(ap + i * la.rs + 4 * j);
          const __m256i ah = INT4 ? bcast4(ap + i * la.rs + la.ks + 4 * j) : al;
          for (int v = 0; v < NV; ++v) {
            if constexpr (VNNI) {
              acc[i][v][0][j % S] = _mm256_dpbusd_avx_epi32(acc[i][v][0][j % S], u0[v], al);
              if constexpr (INT4) acc[i][v][1][j % S] = _mm256_dpbusd_avx_epi32(acc[i][v][1][j % S], u1[v], ah);
            } else if constexpr (!MADD) {  // Sign
              const __m256i t = _mm256_maddubs_epi16(u0[v], _mm256_sign_epi8(al, u1[v]));
              acc[i][v][0][0] = _mm256_add_epi32(acc[i][v][0][0], _mm256_madd_epi16(t, one16));
            } else if constexpr (INT4) {
              const __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(u0[v], al), _mm256_maddubs_epi16(u1[v], ah));
              part[i][v][0] = _mm256_add_epi16(part[i][v][0], t);
            } else {
              part[i][v][0] = _mm256_add_epi16(part[i][v][0], _mm256_maddubs_epi16(u0[v], al));
              part[i][v][P - 1] = _mm256_add_epi16(part[i][v][P - 1], _mm256_maddubs_epi16(u1[v], al));
            }
          }
        }
        if constexpr (MADD) {
          if (j % F == F - 1) {
            for (int i = 0; i < M; ++i)
              for (int v = 0; v < NV; ++v) {
                acc[i][v][0][0] = _mm256_add_epi32(acc[i][v][0][0], _mm256_madd_epi16(part[i][v][0], one16));
                if constexpr (!INT4)
                  acc[i][v][0][0] =
                      _mm256_add_epi32(acc[i][v][0][0], _mm256_madd_epi16(part[i][v][P - 1], sixteen16));
                for (int q = 0; q < P; ++q) part[i][v][q] = _mm256_setzero_si256();
              }
          }
        }
      }
    }
  }
  for (int i = 0; i < M; ++i) {
    const __m256i comp = _mm256_set1_epi32(MUL == Mul::Sign ? 0 : asum[i] * 128);
    for (int v = 0; v < NV; ++v) {
      __m256i s = acc[i][v][0][0];
      for (int q = 1; q < S; ++q) s = _mm256_add_epi32(s, acc[i][v][0][q]);
      if constexpr (VNNI && INT4) {  // 16 * low + high
        __m256i hs = acc[i][v][1][0];
        for (int q = 1; q < S; ++q) hs = _mm256_add_epi32(hs, acc[i][v][1][q]);
        s = _mm256_add_epi32(_mm256_slli_epi32(s, 4), hs);
      } else if constexpr (INT4) {  // 16 * Σ(q+8)·a; 16·8·Σa in comp
        s = _mm256_slli_epi32(s, 4);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * 32 + (h0 + v / 2) * 16 + (v % 2) * 8),
                          _mm256_sub_epi32(s, comp));
    }
  }
}

// Rows per block: as many as keep the accumulators (and int16 partials) in the 16 ymm registers.
template <bool INT4, Mul MUL>
constexpr int rows_per_block() {
  return MUL == Mul::Maddubs || (MUL == Mul::Vnni && INT4) ? 2 : 4;
}

// M rows: one pass over both halves where the registers allow, else one pass per half.
template <bool INT4, Mul MUL, int M>
void rows(const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, ALayout la, const int32_t* asum,
          int32_t* out) {
  constexpr int H = M == 1 && !(MUL == Mul::Maddubs && !INT4) ? 2 : 1;
  for (int h0 = 0; h0 < 2; h0 += H) pass<INT4, MUL, M, H>(w, n, k, r0, h0, a, la, asum, out);
}

// The last r < R rows.
template <bool INT4, Mul MUL, int R>
void tail(const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, ALayout la, const int32_t* asum,
          int64_t r, int32_t* out) {
  if constexpr (R > 1) {
    if (r == R - 1) return rows<INT4, MUL, R - 1>(w, n, k, r0, a, la, asum, out);
    tail<INT4, MUL, R - 1>(w, n, k, r0, a, la, asum, r, out);
  }
}

// Rows in blocks of MB (MB divides 16, so no block crosses a 16-row block of la).
template <bool INT4, Mul MUL>
void dispatch(const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, ALayout la, const int32_t* asum,
              int64_t m, int32_t* out) {
  constexpr int MB = rows_per_block<INT4, MUL>();
  int64_t i = 0;
  for (; i + MB <= m; i += MB) rows<INT4, MUL, MB>(w, n, k, r0, la.at(a, i, 0), la, asum + i, out + i * 32);
  if (i < m) tail<INT4, MUL, MB>(w, n, k, r0, la.at(a, i, 0), la, asum + i, m - i, out + i * 32);
}

// Whether any of the m activation rows holds -128 (the Sign path cannot negate it).
inline bool has_min_int8(const int8_t* a, ALayout la, int64_t m, int64_t k) {
  const __m256i x80 = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256i any = _mm256_setzero_si256();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < k; c += 64) {
      const int8_t* p = la.at(a, i, c);
      any = _mm256_or_si256(any, _mm256_cmpeq_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), x80));
      any = _mm256_or_si256(any, _mm256_cmpeq_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)), x80));
    }
  return !_mm256_testz_si256(any, any);
}

template <bool VNNI>
void dot_rowgroup(Method method, const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, ALayout la,
                  const int32_t* asum, int64_t m, int32_t* out) {
  if constexpr (VNNI) {
    if (method == Method::Int4) return dispatch<true, Mul::Vnni>(w, n, k, r0, a, la, asum, m, out);
    return dispatch<false, Mul::Vnni>(w, n, k, r0, a, la, asum, m, out);
  } else {
    if (method == Method::Int4) return dispatch<true, Mul::Maddubs>(w, n, k, r0, a, la, asum, m, out);
    // quantize gives |q| ≤ 127 except in degenerate rows (inf / NaN after an overflow, subnormal
    // scales), which take the exact nibble path.
    if (has_min_int8(a, la, m, k)) return dispatch<false, Mul::Maddubs>(w, n, k, r0, a, la, asum, m, out);
    dispatch<false, Mul::Sign>(w, n, k, r0, a, la, asum, m, out);
  }
}

}  // namespace avx2_dot
}  // namespace
}  // namespace moe
}  // namespace kt
