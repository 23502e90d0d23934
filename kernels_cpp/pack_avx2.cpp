// AVX2 (+F16C, FMA) packer kernels, the AVX2 row of pack.cpp's table; byte-identical to pack_ref.cpp
// (tests/test_pack.py, tests/test_kt_exact.py). Eight fp32 lanes per step. A source kind is one decode_*
// function (one row of the source into fp32) and its line in `decoder`; a kind without one is decoded by the
// reference.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "numerics.hpp"
#include "pack.hpp"

namespace kt {
namespace avx2 {
namespace {

// Zeroes non-finite lanes and counts them.
inline __m256 zero_nonfinite(__m256 v, int64_t& count) {
  const __m256i exp_mask = _mm256_set1_epi32(0x7F800000);
  const __m256 bad = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), exp_mask), exp_mask));
  const int lanes = _mm256_movemask_ps(bad);
  if (lanes) {
    count += __builtin_popcount(lanes);
    v = _mm256_andnot_ps(bad, v);
  }
  return v;
}

// torch's float -> bfloat16 (round to nearest even), back to float; NaN lanes are kept as they are.
inline __m256 round_to_bf16(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  const __m256i r = _mm256_and_si256(_mm256_add_epi32(b, bias), _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
  return _mm256_blendv_ps(_mm256_castsi256_ps(r), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

inline void store(float* out, __m256 v, int64_t& nonfinite) { _mm256_storeu_ps(out, zero_nonfinite(v, nonfinite)); }

// 16 bytes of nibble pairs (the low nibble is the even column) -> the 32 4-bit codes in column order, as
// bytes: columns 0..15 in lo, 16..31 in hi.
inline void nibble_codes(const uint8_t* p, __m128i& lo, __m128i& hi) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i even = _mm_and_si128(b, mask), odd = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
  lo = _mm_unpacklo_epi8(even, odd);
  hi = _mm_unpackhi_epi8(even, odd);
}
// 8 bytes of nibble pairs -> their 16 codes in column order, as bytes.
inline __m128i nibble_codes16(const uint8_t* p) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), mask = _mm_set1_epi8(0x0F);
  return _mm_unpacklo_epi8(_mm_and_si128(b, mask), _mm_and_si128(_mm_srli_epi16(b, 4), mask));
}
// 4 bytes of nibble pairs -> their 8 codes in column order, as int32 lanes.
inline __m256i nibble_codes8(const uint8_t* p) {
  int32_t bytes;
  std::memcpy(&bytes, p, 4);
  const __m128i b = _mm_cvtsi32_si128(bytes), mask = _mm_set1_epi8(0x0F);
  return _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(_mm_and_si128(b, mask), _mm_and_si128(_mm_srli_epi16(b, 4), mask)));
}
// Codes i*8 .. i*8+7 of 16 code bytes, as int32 lanes.
inline __m256i widen(__m128i codes, int i) { return _mm256_cvtepu8_epi32(i ? _mm_srli_si128(codes, 8) : codes); }

// 8 F8_E4M3FN bytes -> float, exact (as numerics.hpp e4m3_to_f32).
inline __m256 e4m3x8(const uint8_t* p) {
  const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i mag = _mm256_and_si256(x, _mm256_set1_epi32(0x7F));
  const __m256 normal = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(mag, 20), _mm256_set1_epi32(120 << 23)));
  const __m256 subnormal = _mm256_mul_ps(_mm256_cvtepi32_ps(mag), _mm256_set1_ps(1.0f / 512.0f));
  __m256 v = _mm256_blendv_ps(normal, subnormal, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), mag)));
  v = _mm256_blendv_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)),
                       _mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7F))));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x80)), 24);
  return _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(v), sign));
}

// 8 E2M1 codes (4 bytes, low nibble = even column) -> float: the magnitude from the low 3 bits, the sign from
// bit 3 (kE2M1[8 + i] = -kE2M1[i]).
inline __m256 e2m1x8(__m256i codes, __m256 magnitude) {
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(codes, _mm256_set1_epi32(8)), 28);
  return _mm256_or_ps(_mm256_permutevar8x32_ps(magnitude, codes), _mm256_castsi256_ps(sign));
}

// For kinds with a scale per block of `block_k` columns: calls step(j, scale) for every 8 columns j of the row,
// with the scale of the block they lie in (scale_of(block index), broadcast). Needs block_k and col0 multiples
// of 8, so that no step straddles two blocks.
template <class ScaleOf, class Step>
inline void by_scale_block(const PackJob& job, int64_t block_k, ScaleOf scale_of, Step step) {
  int64_t block = job.col0 / block_k;
  int64_t next = (block + 1) * block_k - job.col0;  // the next block's first column, from col0
  for (int64_t j = 0; j < job.k; ++block, next += block_k) {
    const __m256 s = _mm256_set1_ps(scale_of(block));
    for (const int64_t end = std::min(job.k, next); j < end; j += 8) step(j, s);
  }
}

int64_t decode_bf16(const PackJob& job, int64_t row, float* out) {
  const uint16_t* p = reinterpret_cast<const uint16_t*>(job.weight + row * job.weight_row_bytes) + job.col0;
  int64_t nonfinite = 0;
  for (int64_t j = 0; j < job.k; j += 8) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j)));
    store(out + j, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)), nonfinite);
  }
  return nonfinite;
}

int64_t decode_f32(const PackJob& job, int64_t row, float* out) {
  const float* p = reinterpret_cast<const float*>(job.weight + row * job.weight_row_bytes) + job.col0;
  int64_t nonfinite = 0;
  for (int64_t j = 0; j < job.k; j += 8) store(out + j, _mm256_loadu_ps(p + j), nonfinite);
  return nonfinite;
}

int64_t decode_f16(const PackJob& job, int64_t row, float* out) {
  const uint16_t* p = reinterpret_cast<const uint16_t*>(job.weight + row * job.weight_row_bytes) + job.col0;
  int64_t nonfinite = 0;
  for (int64_t j = 0; j < job.k; j += 8)
    store(out + j, round_to_bf16(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j)))), nonfinite);
  return nonfinite;
}

int64_t decode_mxfp4(const PackJob& job, int64_t row, float* out) {
  const __m256 magnitude = _mm256_loadu_ps(kE2M1);
  const uint8_t* bytes = job.weight + row * job.weight_row_bytes + job.col0 / 2;
  const uint8_t* scales = job.scales + row * job.scale_row_bytes + job.col0 / 32;
  int64_t nonfinite = 0;
  for (int64_t j = 0; j < job.k; j += 32) {
    __m128i codes[2];
    nibble_codes(bytes + j / 2, codes[0], codes[1]);
    const __m256 s = _mm256_set1_ps(e8m0_to_f32(scales[j / 32]));
    for (int i = 0; i < 4; ++i)
      store(out + j + 8 * i, _mm256_mul_ps(e2m1x8(widen(codes[i / 2], i % 2), magnitude), s), nonfinite);
  }
  return nonfinite;
}

int64_t decode_fp8_block(const PackJob& job, int64_t row, float* out) {
  if (job.block_k % 8 || job.col0 % 8) return ref::decode_row(job, row, out);  // a step would straddle two scales
  const uint8_t* src = job.weight + row * job.weight_row_bytes + job.col0;
  const float* scales = reinterpret_cast<const float*>(
      job.scales + (job.row_offset + row) / job.block_n * job.scale_row_bytes);
  int64_t nonfinite = 0;
  by_scale_block(job, job.block_k, [&](int64_t block) { return scales[block]; }, [&](int64_t j, __m256 s) {
    store(out + j, round_to_bf16(_mm256_mul_ps(e4m3x8(src + j), s)), nonfinite);
  });
  return nonfinite;
}

int64_t decode_int4_group(const PackJob& job, int64_t row, float* out) {
  if (job.block_k % 8 || job.col0 % 8) return ref::decode_row(job, row, out);
  const uint8_t* src = job.weight + row * job.weight_row_bytes + job.col0 / 2;
  int64_t nonfinite = 0;
  by_scale_block(job, job.block_k, [&](int64_t group) { return ref::int4_group_scale(job, row, group); }, [&](int64_t j, __m256 s) {
    const __m256 q = _mm256_cvtepi32_ps(_mm256_sub_epi32(nibble_codes8(src + j / 2), _mm256_set1_epi32(8)));
    store(out + j, round_to_bf16(_mm256_mul_ps(q, s)), nonfinite);
  });
  return nonfinite;
}

// NVFP4: one 16-column group per step, its scale from ref::nvfp4_group_scale (the same fp32 multiply or divide by
// global_scale).
int64_t decode_nvfp4(const PackJob& job, int64_t row, float* out) {
  if (job.col0 % 16) return ref::decode_row(job, row, out);  // a step would straddle two scales
  const __m256 magnitude = _mm256_loadu_ps(kE2M1);
  const uint8_t* src = job.weight + row * job.weight_row_bytes + job.col0 / 2;
  int64_t nonfinite = 0;
  for (int64_t j = 0; j < job.k; j += 16) {
    const __m256 s = _mm256_set1_ps(ref::nvfp4_group_scale(job, row, (job.col0 + j) / 16));
    const __m128i codes = nibble_codes16(src + j / 2);
    for (int i = 0; i < 2; ++i)
      store(out + j + 8 * i, round_to_bf16(_mm256_mul_ps(e2m1x8(widen(codes, i), magnitude), s)), nonfinite);
  }
  return nonfinite;
}

// MXFP8: E4M3 values times their group's E8M0 scale (0 reads as 0, 255 as inf, as e8m0_to_f32).
int64_t decode_mxfp8(const PackJob& job, int64_t row, float* out) {
  if (job.col0 % 8) return ref::decode_row(job, row, out);
  const uint8_t* src = job.weight + row * job.weight_row_bytes + job.col0;
  const uint8_t* scales = job.scales + row * job.scale_row_bytes;
  int64_t nonfinite = 0;
  by_scale_block(job, 32, [&](int64_t group) { return e8m0_to_f32(scales[group]); }, [&](int64_t j, __m256 s) {
    store(out + j, round_to_bf16(_mm256_mul_ps(e4m3x8(src + j), s)), nonfinite);
  });
  return nonfinite;
}

DecodeRowFn decoder(SourceKind kind) {
  switch (kind) {
    case SourceKind::BF16: return decode_bf16;
    case SourceKind::F32: return decode_f32;
    case SourceKind::MXFP4: return decode_mxfp4;
    case SourceKind::F16: return decode_f16;
    case SourceKind::FP8_BLOCK: return decode_fp8_block;
    case SourceKind::INT4_GROUP: return decode_int4_group;
    case SourceKind::NVFP4: return decode_nvfp4;
    case SourceKind::MXFP8: return decode_mxfp8;
    default: return nullptr;
  }
}

// x * id with subnormal x read as zero (DAZ, numerics.hpp flush_subnormal).
inline __m256 scaled(const float* x, __m256 id) {
  const __m256 v = _mm256_loadu_ps(x);
  const __m256i exponent = _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7F800000));
  const __m256 tiny = _mm256_castsi256_ps(_mm256_cmpeq_epi32(exponent, _mm256_setzero_si256()));
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(v, id));
}

// Four vectors of int32 -> 32 int8 in lane order, saturated (as clamp to -128..127).
inline __m256i pack_i8(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

float quantize_row(Method method, const float* x, int64_t k, int8_t* q) {
  // amax over the |x| bits, four chains. Subnormals are not read as 0 here: where they would be the amax (a row
  // of subnormals and zeros), row_scale flushes the scale to 0 all the same.
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  __m256i a4[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  for (int64_t j = 0; j < k; j += 32)  // k is a multiple of 64
    for (int i = 0; i < 4; ++i)
      a4[i] = _mm256_max_epi32(a4[i], _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j + 8 * i)), abs_mask));
  const __m256i amax = _mm256_max_epi32(_mm256_max_epi32(a4[0], a4[1]), _mm256_max_epi32(a4[2], a4[3]));
  __m128i m = _mm_max_epi32(_mm256_castsi256_si128(amax), _mm256_extracti128_si256(amax, 1));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4E));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xB1));
  const float d = row_scale(method, bits_to_f32(static_cast<uint32_t>(_mm_cvtsi128_si32(m))));
  const __m256 id = _mm256_set1_ps(d != 0.f ? 1.0f / d : 0.f);
  const bool int4 = method == Method::Int4;
  const __m256i lo = _mm256_set1_epi32(-128), hi = _mm256_set1_epi32(127);
  const __m256i eight = _mm256_set1_epi32(8), high_nibble = _mm256_set1_epi32(0xF0);
  for (int64_t j = 0; j < k; j += 32) {  // k is a multiple of 64
    __m256i v[4];
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_cvtps_epi32(scaled(x + j + 8 * i, id));
      if (int4) {  // kt's round_4bit of the int8 value: ties away from zero
        const __m256i c = _mm256_max_epi32(_mm256_min_epi32(v[i], hi), lo);
        const __m256i r = _mm256_srli_epi32(_mm256_and_si256(_mm256_add_epi32(_mm256_abs_epi32(c), eight), high_nibble), 4);
        v[i] = _mm256_sign_epi32(r, c);
      }
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j), pack_i8(v[0], v[1], v[2], v[3]));
  }
  return d;
}

void pack_nibbles(const int8_t* q, int64_t k, uint8_t* out) {
  const __m256i low = _mm256_set1_epi8(0x0F), high = _mm256_set1_epi8(static_cast<char>(0xF0));
  for (int64_t s = 0; s < k; s += 128)
    for (int h = 0; h < 64; h += 32) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + s + h));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + s + 64 + h));
      const __m256i packed = _mm256_or_si256(_mm256_and_si256(a, low), _mm256_and_si256(_mm256_slli_epi16(b, 4), high));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + s / 2 + h), packed);
    }
}

// Transposes an 8x8 matrix of 32-bit words held in r[0..7].
inline void transpose8x8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

void tile_block(const uint8_t* rows, int64_t nbs, int64_t kbytes, int64_t kblock_bytes, uint8_t* out) {
  // each 16x16 half as four 8x8 transposes
  for_each_tile_half(rows, nbs, kbytes, kblock_bytes, out, [kbytes](const uint8_t* src, uint8_t* dst) {
    for (int c0 = 0; c0 < 16; c0 += 8)
      for (int r0 = 0; r0 < 16; r0 += 8) {
        __m256 m[8];
        for (int i = 0; i < 8; ++i)
          m[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(src + (c0 + i) * kbytes + r0 * 4));
        transpose8x8(m);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(reinterpret_cast<float*>(dst + (r0 + i) * 64 + c0 * 4), m[i]);
      }
  });
}

// RAWINT4: the least-error scale of a group (ref::least_squares_scale's result), found another way than the
// reference's event sweep: the bf16 candidates from ref::scale_floor_bits up, eight per block in ascending
// order; a block is tried unless error_floors shows that none of its scales can reach (or tie) the least error
// found so far, and the search ends where the weights below p alone err more. Trying a candidate p, for
// each weight a = |w|: the code c = min(rint(a * fl(1/p)), 7), which decides as the exact quotient (a / p is a
// half-integer exactly or 2^-13 away from one, and at an exact half both codes err the same); S = sum a c and
// Q = sum c^2 in float, exact: a weight with a code is at least amax/128 (p >= amax/64), so a sum of at most 64
// products is a multiple of ulp(amax)/128 below 2^24 of them; F = p (p Q - 2 S) in float64, exact as in the
// reference. So the least F, and the smallest scale reaching it, are the reference's. A group whose amax is
// outside [2^-90, 2^100) (1/p or the sums would leave float's range) goes to the reference.
constexpr int64_t kMaxGroup = 128;

inline float hsum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}
inline double hsum(__m256d v) {
  __m128d h = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}
inline double hmin(__m256d v) {
  __m128d h = _mm_min_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_min_sd(h, _mm_unpackhi_pd(h, h)));
}
// float64 halves of a float vector
inline __m256d lo_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
inline __m256d hi_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }

// Floors under the squared error of a group at every scale p in [p1, p2] (a: the |weights| and p1, p2 scaled by
// one power of two): `all` for p in the block: a weight whose quotients a/p2 .. a/p1 hold no integer up to 7
// errs by at least p1 times their distance to the nearest one (less 2^-15 for the float quotients' rounding),
// one with a/p2 >= 7 (code 7 throughout) by a - 7 p2; `above` for every p >= p1 (so it grows with p1): a weight
// below p1 (with a margin for the rounding) has code 0 or 1 there, so errs by at least min(a, p1 - a). Both sums
// in float are within 2^-16 of exact.
struct ErrorFloors {
  float all, above;
};
ErrorFloors error_floors(const float* a, int64_t g, float p1, float p2) {
  const __m256 inv1 = _mm256_set1_ps(1.f / p1), inv2 = _mm256_set1_ps(1.f / p2), at1 = _mm256_set1_ps(p1);
  const __m256 top = _mm256_set1_ps(7.f * p2), seven = _mm256_set1_ps(7.f), one = _mm256_set1_ps(1.f);
  const __m256 margin = _mm256_set1_ps(0x1p-15f), zero = _mm256_setzero_ps(), below = _mm256_set1_ps(1.f - 0x1p-15f);
  __m256 all = zero, above = zero;
  for (int64_t j = 0; j < g; j += 8) {
    const __m256 v = _mm256_load_ps(a + j);
    const __m256 t2 = _mm256_mul_ps(v, inv2), t1 = _mm256_mul_ps(v, inv1);
    const __m256 n = _mm256_round_ps(t1, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m256 d = _mm256_sub_ps(_mm256_min_ps(_mm256_sub_ps(t2, n), _mm256_sub_ps(_mm256_add_ps(n, one), t1)), margin);
    __m256 e = _mm256_mul_ps(at1, _mm256_max_ps(d, zero));
    e = _mm256_blendv_ps(e, _mm256_max_ps(_mm256_sub_ps(v, top), zero), _mm256_cmp_ps(t2, seven, _CMP_GE_OQ));
    all = _mm256_fmadd_ps(e, e, all);
    const __m256 near = _mm256_min_ps(v, _mm256_sub_ps(at1, v));
    above = _mm256_add_ps(above, _mm256_and_ps(_mm256_cmp_ps(t1, below, _CMP_LT_OQ), _mm256_mul_ps(near, near)));
  }
  return {hsum(all), hsum(above)};
}

uint16_t least_squares_scale(const float* x, int64_t g) {
  alignas(32) float a[kMaxGroup], as[kMaxGroup];
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 m = _mm256_setzero_ps();
  for (int64_t j = 0; j < g; j += 8) {
    const __m256 v = _mm256_and_ps(_mm256_loadu_ps(x + j), abs_mask);
    _mm256_store_ps(a + j, v);
    m = _mm256_max_ps(m, v);
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
  if (amax == 0.f) return 0;
  if (!(amax >= 0x1p-90f && amax < 0x1p100f)) return ref::least_squares_scale(x, g);
  const __m256 seven = _mm256_set1_ps(7.f), one = _mm256_set1_ps(1.f);
  // error_floors' units: amax scaled into [1, 2) (exact). sum a^2 and F(first) (first: amax/7 rounded up, which
  // clips nothing) in float64: their sum bounds the least squared error from above
  const float unit = bits_to_f32((254u - (f32_to_bits(amax) >> 23)) << 23);
  const double unit2 = static_cast<double>(unit) * unit;
  const uint32_t first = (f32_to_bits(amax / 7.0f) + 0xFFFFu) >> 16;
  const float p0 = bf16_to_f32(static_cast<uint16_t>(first));
  const __m256 inv0 = _mm256_set1_ps(1.f / p0);
  __m256d squares = _mm256_setzero_pd();
  __m256 s0 = _mm256_setzero_ps(), q0 = _mm256_setzero_ps();
  for (int64_t j = 0; j < g; j += 8) {
    const __m256 v = _mm256_load_ps(a + j);
    _mm256_store_ps(as + j, _mm256_mul_ps(v, _mm256_set1_ps(unit)));
    squares = _mm256_fmadd_pd(hi_pd(v), hi_pd(v), _mm256_fmadd_pd(lo_pd(v), lo_pd(v), squares));
    const __m256 c = _mm256_min_ps(_mm256_round_ps(_mm256_mul_ps(v, inv0), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), seven);
    s0 = _mm256_fmadd_ps(v, c, s0);  // per lane at most 16 products: exact
    q0 = _mm256_fmadd_ps(c, c, q0);
  }
  const double sum_a2 = hsum(squares) * (1.0 + 0x1p-40);  // above its rounding
  const double s_first = hsum(_mm256_add_pd(lo_pd(s0), hi_pd(s0)));  // exact in float64
  const double q_first = hsum(q0);
  double least = p0 * (p0 * q_first - 2.0 * s_first);  // F(first); the least F is at most this
  const uint32_t hi = ref::scale_ceiling_bits(amax);
  const __m256i last = _mm256_set1_epi32(static_cast<int>(hi)), lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256d best_f[2] = {_mm256_set1_pd(HUGE_VAL), _mm256_set1_pd(HUGE_VAL)};
  __m256d best_bits[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
  for (uint32_t b0 = ref::scale_floor_bits(amax, sum_a2 + least); b0 <= hi; b0 += 8) {
    // the least squared error found so far, from above, in error_floors' units: a block whose floor is higher
    // holds no scale that reaches (or ties) it; once the floor of everything above is higher, nothing does
    const double bound = (sum_a2 + least) * unit2;
    const ErrorFloors floors = error_floors(as, g, bf16_to_f32(static_cast<uint16_t>(b0)) * unit,
                                            bf16_to_f32(static_cast<uint16_t>(std::min(b0 + 7, hi))) * unit);
    if (floors.above * (1.0 - 0x1p-10) > bound) break;
    if (floors.all * (1.0 - 0x1p-10) > bound) continue;
    // lanes past hi repeat hi: the same F and bits, no other candidate
    const __m256i bits = _mm256_min_epu32(_mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(b0)), lanes), last);
    const __m256 p = _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
    const __m256 inv = _mm256_div_ps(one, p);
    __m256 s[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, q[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t j = 0; j < g; j += 2)  // two chains of at most 64 weights each
      for (int i = 0; i < 2; ++i) {
        const __m256 aj = _mm256_broadcast_ss(a + j + i);
        const __m256 c = _mm256_min_ps(_mm256_round_ps(_mm256_mul_ps(aj, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), seven);
        s[i] = _mm256_fmadd_ps(aj, c, s[i]);
        q[i] = _mm256_fmadd_ps(c, c, q[i]);
      }
    const __m256 qs = _mm256_add_ps(q[0], q[1]);  // at most 128 * 49: exact
    for (int h2 = 0; h2 < 2; ++h2) {
      const auto part = [h2](__m256 v) { return h2 ? hi_pd(v) : lo_pd(v); };
      const __m256d pd = part(p), sd = _mm256_add_pd(part(s[0]), part(s[1]));
      const __m256d f = _mm256_mul_pd(pd, _mm256_sub_pd(_mm256_mul_pd(pd, part(qs)), _mm256_add_pd(sd, sd)));
      const __m256d less = _mm256_cmp_pd(f, best_f[h2], _CMP_LT_OQ);  // a lane's candidates ascend: a tie keeps the first
      best_f[h2] = _mm256_blendv_pd(best_f[h2], f, less);
      const __m128i lane_bits = h2 ? _mm256_extracti128_si256(bits, 1) : _mm256_castsi256_si128(bits);
      best_bits[h2] = _mm256_blendv_pd(best_bits[h2], _mm256_cvtepi32_pd(lane_bits), less);
    }
    least = std::min(least, hmin(_mm256_min_pd(best_f[0], best_f[1])));
  }
  alignas(32) double f[8], b[8];
  for (int h2 = 0; h2 < 2; ++h2) {
    _mm256_store_pd(f + 4 * h2, best_f[h2]);
    _mm256_store_pd(b + 4 * h2, best_bits[h2]);
  }
  return ref::least_error_lane(f, b, 8);
}

// Codes q = clamp(rint_even(x / d), -7, 7) with the exact float quotient (ref::quantize_groups_row's), stored
// u = q + 8 two per byte, the even column in the low nibble.
void quantize_groups_row(const float* x, int64_t k, int64_t group, uint8_t* out, uint16_t* scales) {
  if (group % 32 || group > kMaxGroup) return ref::quantize_groups_row(x, k, group, out, scales);
  const __m256 lo = _mm256_set1_ps(-7.f), hi = _mm256_set1_ps(7.f);
  for (int64_t g0 = 0, gi = 0; g0 < k; g0 += group, ++gi) {
    const uint16_t sb = least_squares_scale(x + g0, group);
    scales[gi] = sb;
    if (sb == 0) {  // an all-zero group: codes 0
      std::memset(out + g0 / 2, 0x88, static_cast<size_t>(group / 2));
      continue;
    }
    const __m256 d = _mm256_set1_ps(bf16_to_f32(sb));
    for (int64_t j = 0; j < group; j += 32) {
      __m256i v[4];
      for (int i = 0; i < 4; ++i) {
        const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + g0 + j + 8 * i), d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v[i] = _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(r, hi), lo));
      }
      // u_even + 16 u_odd per int16 pair, then to bytes
      const __m256i u = _mm256_add_epi8(pack_i8(v[0], v[1], v[2], v[3]), _mm256_set1_epi8(8));
      const __m256i pairs = _mm256_maddubs_epi16(u, _mm256_set1_epi16(0x1001));
      const __m256i bytes = _mm256_permute4x64_epi64(_mm256_packus_epi16(pairs, pairs), 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + (g0 + j) / 2), _mm256_castsi256_si128(bytes));
    }
  }
}

}  // namespace

PackKernels kernels() { return {decoder, quantize_row, pack_nibbles, tile_block, quantize_groups_row}; }

}  // namespace avx2
}  // namespace kt
