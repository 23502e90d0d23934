// AVX2 group-sum kernel of the group-wise INT4 engine (moe_group.hpp): 16 bytes of a row widen to 16
// words and split into their nibbles (32 stored values u in column order); VPMADDUBSW (u8 x s8, pairs;
// |u0·a0 + u1·a1| <= 2·15·128, no saturation) then VPMADDWD against ones sum u·a per 2 and 4 columns,
// and the offset is taken out per group: Σ(u - 8)·a = Σu·a - 8·Σa (exact in int32).
#include <immintrin.h>

#include "moe_group.hpp"

namespace kt {
namespace moe {
namespace avx2 {
namespace {

inline __m256i nibbles32(const uint8_t* p) {
  const __m256i w16 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i lo = _mm256_and_si256(w16, _mm256_set1_epi16(0x000F));
  const __m256i hi = _mm256_and_si256(_mm256_slli_epi16(w16, 4), _mm256_set1_epi16(0x0F00));
  return _mm256_or_si256(lo, hi);
}

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

inline __m256i dot32(__m256i u, const int8_t* a, __m256i ones16) {  // 8 lanes of Σu·a over 4 columns
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))), ones16);
}

}  // namespace

void group_dot(const uint8_t* w, int64_t k, int64_t group, int64_t r0, const int8_t* a, int64_t lda, int64_t m,
               int32_t* gsum, bool /*same_rows*/) {
  const int64_t G = k / group;
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  constexpr int64_t kMaxG = 512;
  for (int64_t g0 = 0; g0 < G; g0 += kMaxG) {
    const int64_t gn = (G - g0) < kMaxG ? (G - g0) : kMaxG;
    int32_t corr[16 * kMaxG];
    for (int64_t i = 0; i < m; ++i)
      for (int64_t g = 0; g < gn; ++g) {
        const int8_t* ap = a + i * lda + (g0 + g) * group;
        __m256i s = _mm256_setzero_si256();
        for (int64_t c = 0; c < group; c += 32) s = _mm256_add_epi32(s, dot32(ones8, ap + c, ones16));
        corr[i * kMaxG + g] = 8 * hsum(s);
      }
    for (int j = 0; j < 32; ++j) {
      const uint8_t* row = w + (r0 + j) * (k / 2);
      for (int64_t g = 0; g < gn; ++g) {
        const int64_t c0 = (g0 + g) * group;
        __m256i acc[16];
        for (int64_t i = 0; i < m; ++i) acc[i] = _mm256_setzero_si256();
        for (int64_t c = 0; c < group; c += 32) {
          const __m256i u = nibbles32(row + (c0 + c) / 2);
          for (int64_t i = 0; i < m; ++i) acc[i] = _mm256_add_epi32(acc[i], dot32(u, a + i * lda + c0 + c, ones16));
        }
        for (int64_t i = 0; i < m; ++i) gsum[(i * G + g0 + g) * 32 + j] = hsum(acc[i]) - corr[i * kMaxG + g];
      }
    }
  }
}

}  // namespace avx2
}  // namespace moe
}  // namespace kt
