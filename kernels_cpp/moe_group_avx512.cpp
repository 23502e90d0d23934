// AVX-512 VNNI group-sum kernel of the group-wise INT4 engine (moe_group.hpp), on the row-major weights as
// stored. 32 bytes of a row widen to 32 words and split into their two nibbles, which lands the 64 stored
// values u (0..15) in column order; VPDPBUSD (u8 x s8) sums u·a per 4 columns, and the offset is taken
// out per group: Σ(u - 8)·a = Σu·a - 8·Σa (exact in int32).
#include <immintrin.h>

#include "moe_group.hpp"

namespace kt {
namespace moe {
namespace avx512 {
namespace {

inline __m512i nibbles64(const uint8_t* p) {  // 32 bytes -> 64 bytes u, column order
  const __m512i w16 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512i lo = _mm512_and_si512(w16, _mm512_set1_epi16(0x000F));
  const __m512i hi = _mm512_and_si512(_mm512_slli_epi16(w16, 4), _mm512_set1_epi16(0x0F00));
  return _mm512_or_si512(lo, hi);
}

inline __m256i nibbles32(const uint8_t* p) {  // 16 bytes -> 32 bytes u, column order
  const __m256i w16 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i lo = _mm256_and_si256(w16, _mm256_set1_epi16(0x000F));
  const __m256i hi = _mm256_and_si256(_mm256_slli_epi16(w16, 4), _mm256_set1_epi16(0x0F00));
  return _mm256_or_si256(lo, hi);
}

inline int32_t hsum256(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

inline int32_t hsum512(__m512i v) {
  return hsum256(_mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1)));
}

}  // namespace

void group_dot(const uint8_t* w, int64_t k, int64_t group, int64_t r0, const int8_t* a, int64_t lda, int64_t m,
               int32_t* gsum, bool /*same_rows*/) {
  const int64_t G = k / group;
  // 8·Σa of every (activation row, group), by 64-column VPDPBUSD against ones
  constexpr int64_t kMaxG = 512;  // groups per call handled at once (k <= 16384 for group 32)
  for (int64_t g0 = 0; g0 < G; g0 += kMaxG) {
    const int64_t gn = (G - g0) < kMaxG ? (G - g0) : kMaxG;
    int32_t corr[16 * kMaxG];
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t g = 0; g < gn; ++g) {
        const int8_t* ap = a + i * lda + (g0 + g) * group;
        if (group == 32) {
          corr[i * kMaxG + g] = 8 * hsum256(_mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(1),
                                                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ap))));
        } else {
          __m512i s = _mm512_setzero_si512();
          for (int64_t c = 0; c < group; c += 64) s = _mm512_dpbusd_epi32(s, ones, _mm512_loadu_si512(ap + c));
          corr[i * kMaxG + g] = 8 * hsum512(s);
        }
      }
    for (int j = 0; j < 32; ++j) {
      const uint8_t* row = w + (r0 + j) * (k / 2);
      if (group == 32) {
        int64_t g = 0;
        for (; g + 1 < gn; g += 2) {  // two groups per 64 columns
          const int64_t c0 = (g0 + g) * 32;
          const __m512i u = nibbles64(row + c0 / 2);
          for (int64_t i = 0; i < m; ++i) {
            const __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_loadu_si512(a + i * lda + c0));
            int32_t* o = gsum + (i * G + g0 + g) * 32 + j;
            o[0] = hsum256(_mm512_castsi512_si256(acc)) - corr[i * kMaxG + g];
            o[32] = hsum256(_mm512_extracti64x4_epi64(acc, 1)) - corr[i * kMaxG + g + 1];
          }
        }
        if (g < gn) {  // an odd group count: the last one alone
          const int64_t c0 = (g0 + g) * 32;
          const __m256i u = nibbles32(row + c0 / 2);
          for (int64_t i = 0; i < m; ++i) {
            const __m256i acc = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u,
                                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i * lda + c0)));
            gsum[(i * G + g0 + g) * 32 + j] = hsum256(acc) - corr[i * kMaxG + g];
          }
        }
      } else {
        for (int64_t g = 0; g < gn; ++g) {
          const int64_t c0 = (g0 + g) * group;
          __m512i acc[16];
          for (int64_t i = 0; i < m; ++i) acc[i] = _mm512_setzero_si512();
          for (int64_t c = 0; c < group; c += 64) {
            const __m512i u = nibbles64(row + (c0 + c) / 2);
            for (int64_t i = 0; i < m; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], u, _mm512_loadu_si512(a + i * lda + c0 + c));
          }
          for (int64_t i = 0; i < m; ++i) gsum[(i * G + g0 + g) * 32 + j] = hsum512(acc[i]) - corr[i * kMaxG + g];
        }
      }
    }
  }
}

}  // namespace avx512
}  // namespace moe
}  // namespace kt
