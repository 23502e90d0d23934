// AVX-512 VNNI dot kernel over the tiled layout (decode GEMV and non-AMX prefill).
// Each 64-byte tile row holds 4 K-bytes for 16 output rows (one per 32-bit lane), so one
// VPDPBUSD against a broadcast of 4 activation bytes advances 16 rows by 4 K.
// VPDPBUSD is u8 x s8, so the weights enter as unsigned bytes and a multiple of Σa is subtracted
// at the end (exact in int32 for any int8 activations and weight bytes):
//   INT8            u = w ^ 0x80 = w + 128                      sum = Σu·a - 128·Σa
//   INT4, few rows  lo = (b & 0x0F) ^ 0x08 = q_lo + 8 (scale 1), hi = (b & 0xF0) ^ 0x80 = 16·q_hi + 128,
//                   each one VPTERNLOGD, summed in separate accumulators:
//                   sum = 16·Σlo·a_lo + Σhi·a_hi - 128·Σa      (16·8·Σa_lo + 128·Σa_hi = 128·Σa)
//   INT4, 5+ rows   lo = ((b << 4) & 0xF0) ^ 0x80, hi as above, one accumulator (the unpack is
//                   shared by the rows, the registers go to the rows)
// Streaming (decode reads every weight once, from DRAM): a software prefetch into L1 runs PF tile
// pairs ahead of the loads and follows the row group across K-blocks (the next K-block's chunk is
// not the next bytes); the first PF pairs are prefetched on entry, nothing past the group's end
// (the next group may be another thread's task).
#include <immintrin.h>

#include <cstring>

#include "moe.hpp"

namespace kt {
namespace moe {
namespace avx512 {
namespace {

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

constexpr int PF = 4;  // prefetch distance in tile pairs (8 KB)

inline void prefetch_row(const uint8_t* pair, int j) {  // row j of both halves of a tile pair
  _mm_prefetch(reinterpret_cast<const char*>(pair + j * 64), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(pair + 1024 + j * 64), _MM_HINT_T0);
}

template <bool INT4, int M, bool SPLIT>
void block(const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, ALayout la, const int32_t* asum,
           int32_t* out) {
  // rows 0..M-1 lie in one 16-row block of la (the caller starts blocks at multiples of 8)
  constexpr int L = SPLIT ? 2 : 1;  // accumulators per (row, half): [0] low nibbles / all, [1] high nibbles
  constexpr int S = M * L == 1 ? 4 : (M * L == 2 ? 2 : 1);  // independent chains per (row, half, L)
  constexpr int64_t KSTEP = INT4 ? 128 : 64;
  const Method method = INT4 ? Method::Int4 : Method::Int8;
  __m512i acc[M][2][L][S];
  for (int i = 0; i < M; ++i)
    for (int h = 0; h < 2; ++h)
      for (int l = 0; l < L; ++l)
        for (int s = 0; s < S; ++s) acc[i][h][l][s] = _mm512_setzero_si512();
  const __m512i f0 = _mm512_set1_epi8(static_cast<char>(0xF0));
  const __m512i x0f = _mm512_set1_epi8(0x0F);
  const __m512i x08 = _mm512_set1_epi8(0x08);
  const __m512i x80 = _mm512_set1_epi8(static_cast<char>(0x80));

  {  // the first PF tile pairs
    const uint8_t* c0 = w + chunk_offset(method, n, k, r0, 0);
    const int64_t np0 = (k < K_BLOCK ? k : K_BLOCK) / KSTEP;
    for (int64_t q = 0; q < PF && q < np0; ++q)
      for (int j = 0; j < 16; ++j) prefetch_row(c0 + q * TILE_PAIR_BYTES, j);
  }
  for (int64_t kb = 0; kb < k; kb += K_BLOCK) {
    const int64_t kbs = (k - kb) < K_BLOCK ? (k - kb) : K_BLOCK;
    const uint8_t* chunk = w + chunk_offset(method, n, k, r0, kb);
    const int64_t npairs = kbs / KSTEP;
    // past this chunk the prefetch goes on in the next K-block's chunk; after the last, it repeats
    // the current pair (an L1 hit)
    const uint8_t* next = kb + K_BLOCK < k ? w + chunk_offset(method, n, k, r0, kb + K_BLOCK) : nullptr;
    for (int64_t p = 0; p < npairs; ++p) {
      const uint8_t* tp = chunk + p * TILE_PAIR_BYTES;
      const uint8_t* pf = p + PF < npairs ? tp + PF * TILE_PAIR_BYTES
                                          : (next ? next + (p + PF - npairs) * TILE_PAIR_BYTES : tp);
      const int8_t* ap = la.at(a, 0, kb + p * KSTEP);  // row i: ap + i * la.rs; INT4 high half: + la.ks
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        prefetch_row(pf, j);
        const __m512i b0 = _mm512_loadu_si512(tp + j * 64);
        const __m512i b1 = _mm512_loadu_si512(tp + 1024 + j * 64);
        if constexpr (INT4) {
          __m512i lo0, lo1;
          if constexpr (SPLIT) {  // (b & 0x0F) ^ 0x08: VPTERNLOGD imm 0x6A computes (A & B) ^ C
            lo0 = _mm512_ternarylogic_epi32(b0, x0f, x08, 0x6A);
            lo1 = _mm512_ternarylogic_epi32(b1, x0f, x08, 0x6A);
          } else {
            lo0 = _mm512_ternarylogic_epi32(_mm512_slli_epi16(b0, 4), f0, x80, 0x6A);
            lo1 = _mm512_ternarylogic_epi32(_mm512_slli_epi16(b1, 4), f0, x80, 0x6A);
          }
          const __m512i hi0 = _mm512_ternarylogic_epi32(b0, f0, x80, 0x6A);
          const __m512i hi1 = _mm512_ternarylogic_epi32(b1, f0, x80, 0x6A);
          for (int i = 0; i < M; ++i) {
            const __m512i al = bcast4(ap + i * la.rs + 4 * j);
            const __m512i ah = bcast4(ap + i * la.rs + la.ks + 4 * j);
            acc[i][0][0][j % S] = _mm512_dpbusd_epi32(acc[i][0][0][j % S], lo0, al);
            acc[i][1][0][j % S] = _mm512_dpbusd_epi32(acc[i][1][0][j % S], lo1, al);
            acc[i][0][L - 1][j % S] = _mm512_dpbusd_epi32(acc[i][0][L - 1][j % S], hi0, ah);
            acc[i][1][L - 1][j % S] = _mm512_dpbusd_epi32(acc[i][1][L - 1][j % S], hi1, ah);
          }
        } else {
          const __m512i u0 = _mm512_xor_si512(b0, x80);
          const __m512i u1 = _mm512_xor_si512(b1, x80);
          for (int i = 0; i < M; ++i) {
            const __m512i av = bcast4(ap + i * la.rs + 4 * j);
            acc[i][0][0][j % S] = _mm512_dpbusd_epi32(acc[i][0][0][j % S], u0, av);
            acc[i][1][0][j % S] = _mm512_dpbusd_epi32(acc[i][1][0][j % S], u1, av);
          }
        }
      }
    }
  }
  for (int i = 0; i < M; ++i) {
    const __m512i comp = _mm512_set1_epi32(asum[i] * 128);
    for (int h = 0; h < 2; ++h) {
      __m512i v = acc[i][h][0][0];
      for (int s = 1; s < S; ++s) v = _mm512_add_epi32(v, acc[i][h][0][s]);
      if constexpr (SPLIT) {  // 16 * low + high
        __m512i hv = acc[i][h][1][0];
        for (int s = 1; s < S; ++s) hv = _mm512_add_epi32(hv, acc[i][h][1][s]);
        v = _mm512_add_epi32(_mm512_slli_epi32(v, 4), hv);
      }
      _mm512_storeu_si512(out + i * 32 + h * 16, _mm512_sub_epi32(v, comp));
    }
  }
}

// INT4 splits the nibbles for up to 4 rows (2 x 2 x M accumulators still fit the registers).
template <bool INT4, int M>
void rows(const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, ALayout la, const int32_t* asum,
          int32_t* out) {
  block<INT4, M, INT4 && M <= 4>(w, n, k, r0, a, la, asum, out);
}

template <bool INT4>
void dispatch(const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, ALayout la, const int32_t* asum,
              int64_t m, int32_t* out) {
  constexpr int MB = 8;
  int64_t i = 0;
  for (; i + MB <= m; i += MB) rows<INT4, MB>(w, n, k, r0, la.at(a, i, 0), la, asum + i, out + i * 32);
  switch (m - i) {
    case 0: break;
    case 1: rows<INT4, 1>(w, n, k, r0, la.at(a, i, 0), la, asum + i, out + i * 32); break;
    case 2: rows<INT4, 2>(w, n, k, r0, la.at(a, i, 0), la, asum + i, out + i * 32); break;
    case 3: rows<INT4, 3>(w, n, k, r0, la.at(a, i, 0), la, asum + i, out + i * 32); break;
    case 4: rows<INT4, 4>(w, n, k, r0, la.at(a, i, 0), la, asum + i, out + i * 32); break;
    case 5: rows<INT4, 5>(w, n, k, r0, la.at(a, i, 0), la, asum + i, out + i * 32); break;
    case 6: rows<INT4, 6>(w, n, k, r0, la.at(a, i, 0), la, asum + i, out + i * 32); break;
    default: rows<INT4, 7>(w, n, k, r0, la.at(a, i, 0), la, asum + i, out + i * 32); break;
  }
}

}  // namespace

void dot_rowgroup(Method method, const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, ALayout la,
                  const int32_t* asum, int64_t m, int32_t* out) {
  if (method == Method::Int4)
    dispatch<true>(w, n, k, r0, a, la, asum, m, out);
  else
    dispatch<false>(w, n, k, r0, a, la, asum, m, out);
}

}  // namespace avx512
}  // namespace moe
}  // namespace kt
