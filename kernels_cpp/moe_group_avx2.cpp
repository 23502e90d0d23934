// AVX2 group-sum kernel of the group-wise INT4 engine (moe_group.hpp): 16 bytes of a row widen to 16
// words and split into their nibbles (32 stored values u in column order); VPMADDUBSW (u8 x s8, pairs;
// |u0·a0 + u1·a1| <= 2·15·128, no saturation) then VPMADDWD against ones sum u·a per 2 and 4 columns,
// and the offset is taken out per group: Σ(u - 8)·a = Σu·a - 8·Σa (exact in int32).
#include <immintrin.h>

#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

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

// k not a multiple of 64: one row at a time, a horizontal sum per group
void group_dot_rows(const uint8_t* w, int64_t k, int64_t group, int64_t r0, const int8_t* a, int64_t lda, int64_t m,
                    int32_t* gsum) {
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

// 8 rows x 8 dwords (each 8 columns) -> t[q] = dword q of rows 0..7 (lane = row)
inline void transpose8(const __m256i* r, __m256i* t) {
  __m256i a[8], b[8];
  for (int p = 0; p < 4; ++p) {
    a[2 * p] = _mm256_unpacklo_epi32(r[2 * p], r[2 * p + 1]);
    a[2 * p + 1] = _mm256_unpackhi_epi32(r[2 * p], r[2 * p + 1]);
  }
  for (int p = 0; p < 2; ++p) {  // rows 4p..4p+3; b[4p + e] lane L = d(4L+e) of those rows
    b[4 * p + 0] = _mm256_unpacklo_epi64(a[4 * p], a[4 * p + 2]);
    b[4 * p + 1] = _mm256_unpackhi_epi64(a[4 * p], a[4 * p + 2]);
    b[4 * p + 2] = _mm256_unpacklo_epi64(a[4 * p + 1], a[4 * p + 3]);
    b[4 * p + 3] = _mm256_unpackhi_epi64(a[4 * p + 1], a[4 * p + 3]);
  }
  for (int e = 0; e < 4; ++e) {
    t[e] = _mm256_permute2x128_si256(b[e], b[4 + e], 0x20);
    t[4 + e] = _mm256_permute2x128_si256(b[e], b[4 + e], 0x31);
  }
}

}  // namespace

// (ref::group_prepare, with AVX2)
void group_prepare(const int8_t* a, int64_t lda, int64_t m, int64_t k, int64_t group, int8_t* split, int32_t* corr) {
  const int64_t G = k / group, half = k / 2;
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  const __m256i evens_odds = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                              0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t i = 0; i < m; ++i) {
    const int8_t* ai = a + i * lda;
    int8_t* e = split + i * k;
    int8_t* o = e + half;
    for (int64_t c = 0; c < k; c += 32) {  // [e0-7 o0-7 | e8-15 o8-15] -> [e0-15 | o0-15]
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ai + c));
      const __m256i p = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, evens_odds), 0xD8);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(e + c / 2), _mm256_castsi256_si128(p));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + c / 2), _mm256_extracti128_si256(p, 1));
    }
    for (int64_t g = 0; g < G; ++g) {
      __m256i s = _mm256_setzero_si256();
      for (int64_t c = g * group; c < (g + 1) * group; c += 32) s = _mm256_add_epi32(s, dot32(ones8, ai + c, ones16));
      corr[i * G + g] = 8 * hsum(s);
    }
  }
}


// As the AVX-512 kernel, 8 rows and 64 columns at a time: the 8 x 8 dwords are transposed so that a lane holds
// a row, the nibbles split into even and odd columns, and each activation row, split likewise, is broadcast
// 4 bytes at a time into VPMADDUBSW + VPMADDWD; a group of 128 spans two 64-column chunks.
void group_dot(const uint8_t* w, int64_t k, int64_t group, int64_t r0, const int8_t* a, int64_t lda,
               const int8_t* split, const int32_t* corr, int64_t m, int32_t* gsum, bool /*same_rows*/) {
  if (k % 64) return group_dot_rows(w, k, group, r0, a, lda, m, gsum);
  const int64_t G = k / group, half = k / 2;
  thread_local std::vector<int8_t> split_own;  // [i][even k/2 | odd k/2], when not given
  thread_local std::vector<int32_t> corr_own;  // [i][G]: 8 · Σa over the group
  if (!split || !corr) {
    split_own.resize(static_cast<size_t>(m * k));
    corr_own.resize(static_cast<size_t>(m * G));
    group_prepare(a, lda, m, k, group, split_own.data(), corr_own.data());
    split = split_own.data();
    corr = corr_own.data();
  }
  const __m256i ones16 = _mm256_set1_epi16(1), x0f = _mm256_set1_epi8(0x0F);
  const int qpg = static_cast<int>(group / 8);  // dwords (of 8 columns) per group: 4, 8 or 16
  __m256i r[8], t[8];
  for (int h = 0; h < 4; ++h) {
    const uint8_t* rows = w + (r0 + 8 * h) * half;
    int32_t* gs = gsum + 8 * h;
    for (int64_t i = 0; i < m; ++i) {
      const int8_t* ae = split + i * k;
      const int8_t* ao = ae + half;
      __m256i acc = _mm256_setzero_si256();
      for (int64_t c0 = 0; c0 < k; c0 += 64) {
        for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + j * half + c0 / 2));
        transpose8(r, t);
        for (int q = 0; q < 8; ++q) {
          const __m256i lo = _mm256_and_si256(t[q], x0f);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(t[q], 4), x0f);
          int32_t ev, od;
          std::memcpy(&ev, ae + c0 / 2 + 4 * q, 4);
          std::memcpy(&od, ao + c0 / 2 + 4 * q, 4);
          acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(ev)), ones16));
          acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_set1_epi32(od)), ones16));
          const int64_t col_end = c0 + 8 * (q + 1);
          if ((q + 1) % qpg == 0 || (qpg > 8 && q == 7 && col_end % group == 0)) {
            const int64_t g = (col_end - 1) / group;
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(gs + (i * G + g) * 32),
                                _mm256_sub_epi32(acc, _mm256_set1_epi32(corr[i * G + g])));
            acc = _mm256_setzero_si256();
          }
        }
      }
    }
  }
}

// (ref::group_scale; this file is built with -ffp-contract=off: mul and add stay apart)
void group_scale(const int32_t* gsum, const uint16_t* st, int64_t G, float* P) {
  __m256 acc[4];
  for (int h = 0; h < 4; ++h) acc[h] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g)
    for (int h = 0; h < 4; ++h) {
      const int64_t e = g * 32 + 8 * h;
      const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(st + e)));
      const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));  // bf16 -> float, exact
      const __m256 x = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(gsum + e)));
      acc[h] = _mm256_add_ps(acc[h], _mm256_mul_ps(x, s));
    }
  for (int h = 0; h < 4; ++h) _mm256_storeu_ps(P + 8 * h, acc[h]);
}

namespace {

// The GEMM's B (as the AVX-512 one, 8 rows a ymm): rows r0..r0+31 of w unpacked once per call. Per 8 columns
// (q = c / 8), eight ymm of one dword per row: for rows 8h..8h+7 (h = 0..3), the stored u of the even columns
// 8q, 8q+2, 8q+4, 8q+6, then of the odd ones (256 bytes per 8 columns); then the scales as float, [G][32].
struct GemmB {
  __m256i* b = nullptr;
  float* s = nullptr;
  int64_t cap = 0;
  ~GemmB() { std::free(b); }
  void make(const uint8_t* w, const uint16_t* st, int64_t k, int64_t group, int64_t r0) {
    const int64_t G = k / group, bytes = 32 * k + G * 32 * 4;
    if (bytes > cap) {
      std::free(b);
      b = static_cast<__m256i*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
      cap = b ? bytes : 0;
      if (!b) throw std::bad_alloc();
    }
    s = reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(b) + 32 * k);
    const int64_t half = k / 2;
    const __m256i x0f = _mm256_set1_epi8(0x0F);
    auto put = [&](int64_t q, int h, __m256i v) {
      _mm256_store_si256(b + q * 8 + 2 * h, _mm256_and_si256(v, x0f));
      _mm256_store_si256(b + q * 8 + 2 * h + 1, _mm256_and_si256(_mm256_srli_epi16(v, 4), x0f));
    };
    __m256i r[8], t[8];
    for (int h = 0; h < 4; ++h) {
      const uint8_t* rows = w + (r0 + 8 * h) * half;
      int64_t c0 = 0;
      for (; c0 + 64 <= k; c0 += 64) {  // 8 rows x 64 columns: a transpose puts a row in each lane
        for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + j * half + c0 / 2));
        transpose8(r, t);
        for (int q = 0; q < 8; ++q) put(c0 / 8 + q, h, t[q]);
      }
      for (int64_t q = c0 / 8; q < k / 8; ++q) {  // a tail of 32 columns: dword q of each row
        alignas(32) uint32_t lane[8];
        for (int j = 0; j < 8; ++j) std::memcpy(&lane[j], rows + j * half + 4 * q, 4);
        put(q, h, _mm256_load_si256(reinterpret_cast<const __m256i*>(lane)));
      }
    }
    const uint16_t* sr = st + (r0 / 32) * G * 32;  // bf16 -> float, exact
    for (int64_t e = 0; e < G * 32; e += 8)
      _mm256_store_ps(s + e, _mm256_castsi256_ps(_mm256_slli_epi32(
                                 _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sr + e))), 16)));
  }
};

// MB activation rows (i0..) against rows 8h..8h+7 of B: per 32 columns, int16 partial sums of u·a by
// VPMADDUBSW (even and odd columns, |sum| <= 8·2·15·128 = 30720: no saturation), widened by VPMADDWD; per
// group the sum less 8·Σa, then P += float(sum) · scale (built with -ffp-contract=off: as ref::group_scale).
template <int MB>
void gemm_rows(const GemmB& B, int h, int64_t k, int64_t group, const int8_t* split, const int32_t* corr, int64_t i0,
               float* P) {
  const int64_t G = k / group, qpg = group / 8, half = k / 2;
  const __m256i ones16 = _mm256_set1_epi16(1);
  const int8_t* ae[MB];
  for (int i = 0; i < MB; ++i) ae[i] = split + (i0 + i) * k;
  __m256 f[MB];
  for (int i = 0; i < MB; ++i) f[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i acc[MB];
    for (int i = 0; i < MB; ++i) acc[i] = _mm256_setzero_si256();
    for (int64_t q0 = g * qpg; q0 < (g + 1) * qpg; q0 += 4) {
      __m256i p16[MB];
      for (int i = 0; i < MB; ++i) p16[i] = _mm256_setzero_si256();
      for (int64_t q = q0; q < q0 + 4; ++q) {
        const __m256i be = B.b[q * 8 + 2 * h], bo = B.b[q * 8 + 2 * h + 1];
        for (int i = 0; i < MB; ++i) {
          int32_t ev, od;
          std::memcpy(&ev, ae[i] + 4 * q, 4);
          std::memcpy(&od, ae[i] + half + 4 * q, 4);
          p16[i] = _mm256_add_epi16(p16[i], _mm256_add_epi16(_mm256_maddubs_epi16(be, _mm256_set1_epi32(ev)),
                                                             _mm256_maddubs_epi16(bo, _mm256_set1_epi32(od))));
        }
      }
      for (int i = 0; i < MB; ++i) acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(p16[i], ones16));
    }
    const __m256 sc = _mm256_load_ps(B.s + g * 32 + 8 * h);
    for (int i = 0; i < MB; ++i) {
      const __m256i c = _mm256_set1_epi32(corr[(i0 + i) * G + g]);
      f[i] = _mm256_add_ps(f[i], _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i], c)), sc));
    }
  }
  for (int i = 0; i < MB; ++i) _mm256_storeu_ps(P + (i0 + i) * 32 + 8 * h, f[i]);
}

}  // namespace

void group_gemm(const uint8_t* w, const uint16_t* st, int64_t k, int64_t group, int64_t r0, const int8_t* /*a*/,
                int64_t /*lda*/, const int8_t* split, const int32_t* corr, int64_t m, float* P) {
  static thread_local GemmB B;
  B.make(w, st, k, group, r0);
  constexpr int MB = 3;
  for (int h = 0; h < 4; ++h) {  // 8 rows of B at a time (k * 8 bytes: in L1 / L2 while every token uses them)
    int64_t i0 = 0;
    for (; i0 + MB <= m; i0 += MB) gemm_rows<MB>(B, h, k, group, split, corr, i0, P);
    switch (m - i0) {
      case 1: gemm_rows<1>(B, h, k, group, split, corr, i0, P); break;
      case 2: gemm_rows<2>(B, h, k, group, split, corr, i0, P); break;
      default: break;
    }
  }
}

}  // namespace avx2
}  // namespace moe
}  // namespace kt
