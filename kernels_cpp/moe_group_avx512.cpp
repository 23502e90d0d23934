// AVX-512 VNNI group-sum kernel of the group-wise INT4 engine (moe_group.hpp), on the row-major weights as
// stored. 32 bytes of a row widen to 32 words and split into their two nibbles, which lands the 64 stored
// values u (0..15) in column order; VPDPBUSD (u8 x s8) sums u·a per 4 columns, and the offset is taken
// out per group: Σ(u - 8)·a = Σu·a - 8·Σa (exact in int32).
#include <immintrin.h>

#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

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

// k not a multiple of 128: one row at a time, a horizontal sum per group
void group_dot_rows(const uint8_t* w, int64_t k, int64_t group, int64_t r0, const int8_t* a, int64_t lda, int64_t m,
                    int32_t* gsum) {
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

constexpr int64_t kPrefetch = 512;  // bytes ahead in each row (4 chunks)

// 16 rows x 16 dwords (each 8 columns) -> t[q] = dword q of rows 0..15 (lane = row)
inline void transpose16(const __m512i* r, __m512i* t) {
  __m512i a[16], b[16];
  for (int p = 0; p < 8; ++p) {
    a[2 * p] = _mm512_unpacklo_epi32(r[2 * p], r[2 * p + 1]);      // per 128-bit lane L: r.d(4L), r'.d(4L), r.d(4L+1), r'.d(4L+1)
    a[2 * p + 1] = _mm512_unpackhi_epi32(r[2 * p], r[2 * p + 1]);  // d(4L+2), d(4L+3)
  }
  for (int p = 0; p < 4; ++p) {  // rows 4p..4p+3
    b[4 * p + 0] = _mm512_unpacklo_epi64(a[4 * p], a[4 * p + 2]);      // d(4L+0) of 4 rows
    b[4 * p + 1] = _mm512_unpackhi_epi64(a[4 * p], a[4 * p + 2]);      // d(4L+1)
    b[4 * p + 2] = _mm512_unpacklo_epi64(a[4 * p + 1], a[4 * p + 3]);  // d(4L+2)
    b[4 * p + 3] = _mm512_unpackhi_epi64(a[4 * p + 1], a[4 * p + 3]);  // d(4L+3)
  }
  for (int e = 0; e < 4; ++e) {  // b[4p + e] lane L = d(4L+e) of rows 4p..4p+3
    const __m512i v0 = _mm512_shuffle_i32x4(b[e], b[4 + e], 0x88);    // [b_e.0, b_e.2, b_4+e.0, b_4+e.2]
    const __m512i w0 = _mm512_shuffle_i32x4(b[e], b[4 + e], 0xDD);    // [b_e.1, b_e.3, b_4+e.1, b_4+e.3]
    const __m512i v1 = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], 0x88);
    const __m512i w1 = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], 0xDD);
    t[e] = _mm512_shuffle_i32x4(v0, v1, 0x88);       // L = 0
    t[8 + e] = _mm512_shuffle_i32x4(v0, v1, 0xDD);   // L = 2
    t[4 + e] = _mm512_shuffle_i32x4(w0, w1, 0x88);   // L = 1
    t[12 + e] = _mm512_shuffle_i32x4(w0, w1, 0xDD);  // L = 3
  }
}

// Columns c0..c0+127 of 16 rows (row stride half) transposed: t[q] = dword q (columns c0+8q..c0+8q+7) of rows
// 0..15, a row per lane. Streaming from DRAM: each row's line kPrefetch bytes ahead is prefetched first, past a
// row's end (next_half) the first lines of the 16 rows after them.
inline void load_transposed(const uint8_t* rows, int64_t half, int64_t c0, bool next_half, __m512i* t) {
  const int64_t ahead = c0 / 2 + kPrefetch;
  for (int j = 0; j < 16; ++j) {
    const uint8_t* p = ahead < half ? rows + j * half + ahead : (next_half ? rows + (16 + j) * half + (ahead - half) : nullptr);
    if (p) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
  }
  __m512i r[16];
  for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_si512(rows + j * half + c0 / 2);
  transpose16(r, t);
}

// MB activation rows against the decoded 16 x 128 chunk (lo/hi nibbles of dword q = columns 8q..8q+7,
// even and odd), the chunk's groups one after the other; ae/ao: the rows' even/odd columns from the chunk.
// MB activation rows against the transposed 16 x 128 chunk t (dword q = columns 8q..8q+7 of the 16 rows,
// split here into even and odd columns), the chunk's groups one after the other; ae/ao: the rows' even/odd
// columns from the chunk.
template <int MB>
inline void chunk_rows(const __m512i* t, const int8_t* const* ae, const int8_t* const* ao, int qpg, int64_t g0,
                       int64_t G, const int32_t* corr, int32_t* gsum, int64_t i0) {
  const __m512i x0f = _mm512_set1_epi8(0x0F);
  for (int q0 = 0, gi = 0; q0 < 16; q0 += qpg, ++gi) {
    __m512i acc[MB][4];  // four chains per row (even/odd columns x even/odd q): the VPDPBUSD latency hides
    for (int i = 0; i < MB; ++i)
      for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_setzero_si512();
    for (int q = q0; q < q0 + qpg; ++q) {
      const __m512i lo = _mm512_and_si512(t[q], x0f);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(t[q], 4), x0f);
      const int c = 2 * (q & 1);
      for (int i = 0; i < MB; ++i) {
        int32_t e, o;
        std::memcpy(&e, ae[i] + 4 * q, 4);
        std::memcpy(&o, ao[i] + 4 * q, 4);
        acc[i][c] = _mm512_dpbusd_epi32(acc[i][c], lo, _mm512_set1_epi32(e));
        acc[i][c + 1] = _mm512_dpbusd_epi32(acc[i][c + 1], hi, _mm512_set1_epi32(o));
      }
    }
    for (int i = 0; i < MB; ++i) {
      const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(acc[i][0], acc[i][1]), _mm512_add_epi32(acc[i][2], acc[i][3]));
      _mm512_storeu_si512(gsum + ((i0 + i) * G + g0 + gi) * 32,
                          _mm512_sub_epi32(sum, _mm512_set1_epi32(corr[(i0 + i) * G + g0 + gi])));
    }
  }
}

}  // namespace

// (ref::group_prepare, with AVX-512)
void group_prepare(const int8_t* a, int64_t lda, int64_t m, int64_t k, int64_t group, int8_t* split, int32_t* corr) {
  const int64_t G = k / group, half = k / 2;
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t i = 0; i < m; ++i) {  // even and odd columns apart (VPMOVWB of the words and of the words >> 8)
    const int8_t* ai = a + i * lda;
    int8_t* e = split + i * k;
    int8_t* o = e + half;
    int64_t c = 0;
    for (; c + 64 <= k; c += 64) {
      const __m512i v = _mm512_loadu_si512(ai + c);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(e + c / 2), _mm512_cvtepi16_epi8(v));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + c / 2), _mm512_cvtepi16_epi8(_mm512_srai_epi16(v, 8)));
    }
    if (c < k) {  // k % 64 == 32: the last 32 columns
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ai + c));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(e + c / 2), _mm256_cvtepi16_epi8(v));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + c / 2), _mm256_cvtepi16_epi8(_mm256_srai_epi16(v, 8)));
    }
    for (int64_t g = 0; g < G; ++g) {
      __m512i acc = _mm512_setzero_si512();
      if (group == 32) {
        acc = _mm512_zextsi256_si512(_mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(1),
                                                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ai + g * 32))));
      } else {
        for (int64_t c = g * group; c < (g + 1) * group; c += 64) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512(ai + c));
      }
      corr[i * G + g] = 8 * hsum512(acc);
    }
  }
}


// The 32 rows are taken 16 at a time and 128 columns (64 bytes a row) at a time: the 16 x 16 dwords are
// transposed so that a lane holds a row (8 columns per dword), the nibbles split into even and odd
// columns, and each activation row, split likewise, is broadcast 4 bytes at a time into VPDPBUSD: the
// lanes accumulate the rows' sums of a group with no horizontal step.
void group_dot(const uint8_t* w, int64_t k, int64_t group, int64_t r0, const int8_t* a, int64_t lda,
               const int8_t* split, const int32_t* corr, int64_t m, int32_t* gsum, bool /*same_rows*/) {
  if (k % 128) return group_dot_rows(w, k, group, r0, a, lda, m, gsum);
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
  const int qpg = static_cast<int>(group / 8);
  __m512i t[16];
  for (int h = 0; h < 2; ++h) {
    const uint8_t* rows = w + (r0 + 16 * h) * half;
    int32_t* gs = gsum + 16 * h;
    for (int64_t c0 = 0; c0 < k; c0 += 128) {
      load_transposed(rows, half, c0, h == 0, t);
      const int64_t g0 = c0 / group;
      for (int64_t i0 = 0; i0 < m; i0 += 4) {
        const int8_t* ae[4];
        const int8_t* ao[4];
        for (int i = 0; i < 4 && i0 + i < m; ++i) {
          ae[i] = split + (i0 + i) * k + c0 / 2;
          ao[i] = ae[i] + half;
        }
        switch (m - i0 < 4 ? m - i0 : 4) {
          case 1: chunk_rows<1>(t, ae, ao, qpg, g0, G, corr, gs, i0); break;
          case 2: chunk_rows<2>(t, ae, ao, qpg, g0, G, corr, gs, i0); break;
          case 3: chunk_rows<3>(t, ae, ao, qpg, g0, G, corr, gs, i0); break;
          default: chunk_rows<4>(t, ae, ao, qpg, g0, G, corr, gs, i0); break;
        }
      }
    }
  }
}

// (ref::group_scale; explicit-rounding mul/add so that -mfma never contracts them, moe_epilogue_avx512.cpp)
void group_scale(const int32_t* gsum, const uint16_t* st, int64_t G, float* P) {
  constexpr int kRnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t g = 0; g < G; ++g)
    for (int h = 0; h < 2; ++h) {
      const int64_t e = g * 32 + 16 * h;
      const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(st + e)));
      const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));  // bf16 -> float, exact
      const __m512 x = _mm512_cvtepi32_ps(_mm512_loadu_si512(gsum + e));  // |gsum| < 2^24: exact
      acc[h] = _mm512_add_round_ps(acc[h], _mm512_mul_round_ps(x, s, kRnd), kRnd);
    }
  _mm512_storeu_ps(P, acc[0]);
  _mm512_storeu_ps(P + 16, acc[1]);
}

namespace {

// The GEMM's B: rows r0..r0+31 of w transposed once per call. Per 8 columns (q = c / 8), two zmm of one dword per
// row (rows 0-15, then 16-31): the row's stored bytes 4q..4q+3, whose low nibbles are the u of the even columns
// 8q, 8q+2, 8q+4, 8q+6 and high nibbles those of the odd ones (128 bytes per 8 columns, 16 * k bytes in all;
// the nibbles are split where they are used); then the rows' scales as float, [G][32].
struct GemmB {
  __m512i* b = nullptr;
  float* s = nullptr;
  int64_t cap = 0;
  ~GemmB() { std::free(b); }
  void make(const uint8_t* w, const uint16_t* st, int64_t k, int64_t group, int64_t r0) {
    const int64_t G = k / group, bytes = 16 * k + G * 32 * 4;
    if (bytes > cap) {
      std::free(b);
      b = static_cast<__m512i*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
      cap = b ? bytes : 0;
      if (!b) throw std::bad_alloc();
    }
    s = reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(b) + 16 * k);
    const int64_t half = k / 2;
    __m512i t[16];
    const uint8_t* w0 = w + r0 * half;  // the 32 rows, streamed from memory: kPrefetch bytes ahead in each row
    for (int j = 0; j < 16; ++j)
      for (int64_t o = 0; o < kPrefetch && o < half; o += 64)
        _mm_prefetch(reinterpret_cast<const char*>(w0 + j * half + o), _MM_HINT_T0);
    for (int h = 0; h < 2; ++h) {
      const uint8_t* rows = w + (r0 + 16 * h) * half;
      int64_t c0 = 0;
      for (; c0 + 128 <= k; c0 += 128) {  // 16 rows x 128 columns: a transpose puts a row in each lane
        load_transposed(rows, half, c0, h == 0, t);
        for (int q = 0; q < 16; ++q) _mm512_store_si512(b + (c0 / 8 + q) * 2 + h, t[q]);
      }
      for (int64_t q = c0 / 8; q < k / 8; ++q) {  // a tail of 32 to 96 columns: dword q of each row
        alignas(64) uint32_t lane[16];
        for (int j = 0; j < 16; ++j) std::memcpy(&lane[j], rows + j * half + 4 * q, 4);
        _mm512_store_si512(b + q * 2 + h, _mm512_load_si512(lane));
      }
    }
    const uint16_t* sr = st + (r0 / 32) * G * 32;  // bf16 -> float, exact
    for (int64_t e = 0; e < G * 32; e += 16)
      _mm512_store_ps(s + e, _mm512_castsi512_ps(_mm512_slli_epi32(
                                 _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sr + e))), 16)));
  }
};

// MB activation rows (i0..) against B, groups g0..g1-1: per group (QPG = group / 8 dwords), the exact sums Σu·a
// of the even and odd columns by VPDPBUSD (each row's 4 bytes broadcast), less 8·Σa, then P += float(sum) · scale,
// rounded as ref::group_scale (explicit rounding: never contracted into an FMA), groups in order; P starts from 0
// at group 0 and is kept in P between calls. The group's steps are unrolled (QPG a constant), which keeps GCC
// from copying the accumulators between registers every step.
template <int MB, int QPG>
void gemm_rows(const GemmB& B, int64_t k, const int8_t* split, const int32_t* corr, int64_t i0, int64_t g0,
               int64_t g1, float* P) {
  constexpr int kRnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const int64_t G = k / (8 * QPG), half = k / 2;
  const int8_t* ae[MB];
  const int32_t* cr[MB];
  __m512 f[MB][2];
  for (int i = 0; i < MB; ++i) {
    ae[i] = split + (i0 + i) * k;
    cr[i] = corr + (i0 + i) * G;
    float* p = P + (i0 + i) * 32;
    f[i][0] = g0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(p);
    f[i][1] = g0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(p + 16);
  }
  for (int64_t g = g0; g < g1; ++g) {
    const __m512i* bq = B.b + g * QPG * 2;
    const __m512i x0f = _mm512_set1_epi8(0x0F);
    const int64_t c4 = g * QPG * 4;  // the group's first byte in a row's even (odd) half
    __m512i acc[MB][2];  // from -8·Σa: Σ(u - 8)·a = Σu·a - 8·Σa
    for (int i = 0; i < MB; ++i) acc[i][0] = acc[i][1] = _mm512_set1_epi32(-cr[i][g]);
#pragma GCC unroll 16
    for (int q = 0; q < QPG; ++q) {
      const __m512i t0 = bq[2 * q], t1 = bq[2 * q + 1];
      const __m512i e0 = _mm512_and_si512(t0, x0f), o0 = _mm512_and_si512(_mm512_srli_epi16(t0, 4), x0f);
      const __m512i e1 = _mm512_and_si512(t1, x0f), o1 = _mm512_and_si512(_mm512_srli_epi16(t1, 4), x0f);
      for (int i = 0; i < MB; ++i) {
        int32_t ev, od;
        std::memcpy(&ev, ae[i] + c4 + 4 * q, 4);
        std::memcpy(&od, ae[i] + half + c4 + 4 * q, 4);
        const __m512i ve = _mm512_set1_epi32(ev), vo = _mm512_set1_epi32(od);
        acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], e0, ve);
        acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], e1, ve);
        acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], o0, vo);
        acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], o1, vo);
      }
    }
    const __m512 s0 = _mm512_load_ps(B.s + g * 32), s1 = _mm512_load_ps(B.s + g * 32 + 16);
    for (int i = 0; i < MB; ++i) {
      f[i][0] = _mm512_add_round_ps(f[i][0], _mm512_mul_round_ps(_mm512_cvtepi32_ps(acc[i][0]), s0, kRnd), kRnd);
      f[i][1] = _mm512_add_round_ps(f[i][1], _mm512_mul_round_ps(_mm512_cvtepi32_ps(acc[i][1]), s1, kRnd), kRnd);
    }
  }
  for (int i = 0; i < MB; ++i) {
    _mm512_storeu_ps(P + (i0 + i) * 32, f[i][0]);
    _mm512_storeu_ps(P + (i0 + i) * 32 + 16, f[i][1]);
  }
}

// Lines prefetched into L2 a few at a time, spread over the calls of a GEMM.
struct L2Stream {
  const char* p;
  int64_t lines, per;
  void step() {
    for (int64_t i = 0; i < per && lines > 0; ++i, --lines, p += 64) _mm_prefetch(p, _MM_HINT_T1);
  }
};

// All m rows for one group size: K in chunks of kKc columns (B's chunk, 32 * kKc bytes, stays in L1 while every
// row uses it), in each chunk the rows MB at a time (then the 1 to MB-1 left). Meanwhile `next` (the weights of
// the caller's next row group, most likely) comes into L2.
template <int QPG>
void gemm_all(const GemmB& B, int64_t k, const int8_t* split, const int32_t* corr, int64_t m, float* P,
              L2Stream next) {
  constexpr int MB = 5;            // 10 int32 and 10 float accumulators, 4 of B: 24 of the 32 zmm
  constexpr int64_t kKc = 1024;   // 32 KB of B
  const int64_t G = k / (8 * QPG), gc = kKc / (8 * QPG);
  const int64_t calls = ((G + gc - 1) / gc) * ((m + MB - 1) / MB);
  next.per = (next.lines + calls - 1) / calls;
  for (int64_t g0 = 0; g0 < G; g0 += gc) {
    const int64_t g1 = g0 + gc < G ? g0 + gc : G;
    int64_t i0 = 0;
    for (; i0 + MB <= m; i0 += MB, next.step()) gemm_rows<MB, QPG>(B, k, split, corr, i0, g0, g1, P);
    switch (m - i0) {
      case 1: gemm_rows<1, QPG>(B, k, split, corr, i0, g0, g1, P); break;
      case 2: gemm_rows<2, QPG>(B, k, split, corr, i0, g0, g1, P); break;
      case 3: gemm_rows<3, QPG>(B, k, split, corr, i0, g0, g1, P); break;
      case 4: gemm_rows<4, QPG>(B, k, split, corr, i0, g0, g1, P); break;
      default: break;
    }
  }
}

}  // namespace

void group_gemm(const uint8_t* w, const uint16_t* st, int64_t k, int64_t group, int64_t r0, const int8_t* /*a*/,
                int64_t /*lda*/, const int8_t* split, const int32_t* corr, int64_t m, float* P) {
  static thread_local GemmB B;
  B.make(w, st, k, group, r0);
  // the next 32 rows (the caller's next call on this matrix, or another thread's; a prefetch past the matrix's
  // end does not fault)
  const L2Stream next{reinterpret_cast<const char*>(w + (r0 + 32) * (k / 2)), 32 * k / 2 / 64, 0};
  switch (group) {
    case 32: return gemm_all<4>(B, k, split, corr, m, P, next);
    case 64: return gemm_all<8>(B, k, split, corr, m, P, next);
    default: return gemm_all<16>(B, k, split, corr, m, P, next);
  }
}

}  // namespace avx512
}  // namespace moe
}  // namespace kt
