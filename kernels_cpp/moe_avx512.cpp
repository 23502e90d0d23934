// AVX-512 VNNI dot kernel over the tiled layout (decode GEMV and non-AMX prefill).
// Each 64-byte tile row holds 4 K-bytes for 16 output rows (one per 32-bit lane), so one
// VPDPBUSD against a broadcast of 4 activation bytes advances 16 rows by 4 K.
// VPDPBUSD is u8 x s8: the weights enter as u8 = w + 128 (an XOR with 0x80, exact for every
// int8 including -128, and for INT4 nibble*16) and 128 * Σa is subtracted at the end, so the
// int32 sums equal the reference exactly.
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

// (x & 0xF0) ^ 0x80 in one VPTERNLOGD: A=x, B=0xF0.., C=0x80..  -> imm 0x6A.
inline __m512i hi_nibble_u8(__m512i x, __m512i f0, __m512i x80) {
  return _mm512_ternarylogic_epi32(x, f0, x80, 0x6A);
}

#ifndef KT_MOE_PF
#define KT_MOE_PF 4
#endif
constexpr int PF = KT_MOE_PF;

template <bool INT4, int M>
void block(const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, ALayout la, const int32_t* asum,
           int32_t* out) {
  // rows 0..M-1 lie in one 16-row block of la (the caller starts blocks at multiples of 8)
  constexpr int S = M == 1 ? 4 : (M == 2 ? 2 : 1);  // independent accumulation chains per (token, half)
  constexpr int64_t KSTEP = INT4 ? 128 : 64;
  const Method method = INT4 ? Method::Int4 : Method::Int8;
  __m512i acc[M][2][S];
  for (int i = 0; i < M; ++i)
    for (int h = 0; h < 2; ++h)
      for (int s = 0; s < S; ++s) acc[i][h][s] = _mm512_setzero_si512();
  const __m512i f0 = _mm512_set1_epi8(static_cast<char>(0xF0));
  const __m512i x80 = _mm512_set1_epi8(static_cast<char>(0x80));

  for (int64_t kb = 0; kb < k; kb += K_BLOCK) {
    const int64_t kbs = (k - kb) < K_BLOCK ? (k - kb) : K_BLOCK;
    const uint8_t* chunk = w + chunk_offset(method, n, k, r0, kb);
    const int64_t npairs = kbs / KSTEP;
    for (int64_t p = 0; p < npairs; ++p) {
      const uint8_t* tp = chunk + p * TILE_PAIR_BYTES;
      const int8_t* ap = la.at(a, 0, kb + p * KSTEP);  // row i: ap + i * la.rs; INT4 high half: + la.ks
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        if (PF) {  // streaming decode: software prefetch PF tile pairs ahead (may run past the chunk: harmless)
          _mm_prefetch(reinterpret_cast<const char*>(tp + PF * TILE_PAIR_BYTES + j * 64), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(tp + PF * TILE_PAIR_BYTES + 1024 + j * 64), _MM_HINT_T0);
        }
        const __m512i b0 = _mm512_loadu_si512(tp + j * 64);
        const __m512i b1 = _mm512_loadu_si512(tp + 1024 + j * 64);
        if constexpr (INT4) {
          const __m512i lo0 = hi_nibble_u8(_mm512_slli_epi16(b0, 4), f0, x80);
          const __m512i lo1 = hi_nibble_u8(_mm512_slli_epi16(b1, 4), f0, x80);
          const __m512i hi0 = hi_nibble_u8(b0, f0, x80);
          const __m512i hi1 = hi_nibble_u8(b1, f0, x80);
          for (int i = 0; i < M; ++i) {
            const __m512i al = bcast4(ap + i * la.rs + 4 * j);
            const __m512i ah = bcast4(ap + i * la.rs + la.ks + 4 * j);
            acc[i][0][j % S] = _mm512_dpbusd_epi32(acc[i][0][j % S], lo0, al);
            acc[i][1][j % S] = _mm512_dpbusd_epi32(acc[i][1][j % S], lo1, al);
            acc[i][0][j % S] = _mm512_dpbusd_epi32(acc[i][0][j % S], hi0, ah);
            acc[i][1][j % S] = _mm512_dpbusd_epi32(acc[i][1][j % S], hi1, ah);
          }
        } else {
          const __m512i u0 = _mm512_xor_si512(b0, x80);
          const __m512i u1 = _mm512_xor_si512(b1, x80);
          for (int i = 0; i < M; ++i) {
            const __m512i av = bcast4(ap + i * la.rs + 4 * j);
            acc[i][0][j % S] = _mm512_dpbusd_epi32(acc[i][0][j % S], u0, av);
            acc[i][1][j % S] = _mm512_dpbusd_epi32(acc[i][1][j % S], u1, av);
          }
        }
      }
    }
  }
  for (int i = 0; i < M; ++i) {
    const __m512i comp = _mm512_set1_epi32(asum[i] * 128);
    for (int h = 0; h < 2; ++h) {
      __m512i v = acc[i][h][0];
      for (int s = 1; s < S; ++s) v = _mm512_add_epi32(v, acc[i][h][s]);
      _mm512_storeu_si512(out + i * 32 + h * 16, _mm512_sub_epi32(v, comp));
    }
  }
}

template <bool INT4>
void dispatch(const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, ALayout la, const int32_t* asum,
              int64_t m, int32_t* out) {
  constexpr int MB = 8;
  int64_t i = 0;
  for (; i + MB <= m; i += MB) block<INT4, MB>(w, n, k, r0, la.at(a, i, 0), la, asum + i, out + i * 32);
  switch (m - i) {
    case 0: break;
    case 1: block<INT4, 1>(w, n, k, r0, la.at(a, i, 0), la, asum + i, out + i * 32); break;
    case 2: block<INT4, 2>(w, n, k, r0, la.at(a, i, 0), la, asum + i, out + i * 32); break;
    case 3: block<INT4, 3>(w, n, k, r0, la.at(a, i, 0), la, asum + i, out + i * 32); break;
    case 4: block<INT4, 4>(w, n, k, r0, la.at(a, i, 0), la, asum + i, out + i * 32); break;
    case 5: block<INT4, 5>(w, n, k, r0, la.at(a, i, 0), la, asum + i, out + i * 32); break;
    case 6: block<INT4, 6>(w, n, k, r0, la.at(a, i, 0), la, asum + i, out + i * 32); break;
    default: block<INT4, 7>(w, n, k, r0, la.at(a, i, 0), la, asum + i, out + i * 32); break;
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
