// AVX2 (+F16C, FMA) packer kernels, the AVX2 row of pack.cpp's table; byte-identical to pack_ref.cpp
// (tests/test_pack.py, tests/test_kt_exact.py). Eight fp32 lanes per step. A source kind is one decode_*
// function (one row of the source into fp32) and its line in `decoder`; a kind without one is decoded by the
// reference.
#include <immintrin.h>

#include <algorithm>
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

// RAWINT4, one candidate scale `d` for a group of g columns (g a multiple of 32): q = clamp(rint_even(x / d), -8, 7)
// (0 where d is 0), the same float32 division as ref::quantize_group; returns whether a weight was clipped.
bool quantize_group(const float* x, int64_t g, float d, int8_t* q) {
  if (d == 0.f) {
    std::fill(q, q + g, int8_t{0});
    return false;
  }
  const __m256 dv = _mm256_set1_ps(d);
  const __m256i lo = _mm256_set1_epi32(-8), hi = _mm256_set1_epi32(7);
  __m256i clipped = _mm256_setzero_si256();
  for (int64_t j = 0; j < g; j += 32) {
    __m256i v[4];
    for (int i = 0; i < 4; ++i) {
      const __m256i r = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + j + 8 * i), dv));  // |x / d| <= 8.1
      clipped = _mm256_or_si256(clipped, _mm256_or_si256(_mm256_cmpgt_epi32(r, hi), _mm256_cmpgt_epi32(lo, r)));
      v[i] = _mm256_max_epi32(_mm256_min_epi32(r, hi), lo);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j), pack_i8(v[0], v[1], v[2], v[3]));
  }
  return !_mm256_testz_si256(clipped, clipped);
}

// The float64 squared errors (x - q d)^2 of a group, each rounded as ref::quantize_group rounds it.
void squared_errors(const float* x, const int8_t* q, int64_t g, float d, double* sq) {
  const __m256d dd = _mm256_set1_pd(static_cast<double>(d));
  for (int64_t j = 0; j < g; j += 4) {
    const __m256d xd = _mm256_cvtps_pd(_mm_loadu_ps(x + j));
    int32_t q4;
    std::memcpy(&q4, q + j, 4);
    const __m256d qd = _mm256_cvtepi32_pd(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(q4)));
    const __m256d e = _mm256_sub_pd(xd, _mm256_mul_pd(qd, dd));
    _mm256_storeu_pd(sq + j, _mm256_mul_pd(e, e));
  }
}

void quantize_groups_row(const float* x, int64_t k, int64_t group, uint8_t* out, uint16_t* scales) {
  if (group % 32 || group > 128) return ref::quantize_groups_row(x, k, group, out, scales);
  alignas(32) int8_t q7[128], q8[128];
  alignas(32) double sq7[128], sq8[128];
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  for (int64_t g0 = 0, gi = 0; g0 < k; g0 += group, ++gi) {
    __m256 amax = _mm256_setzero_ps();
    for (int64_t j = 0; j < group; j += 8)
      amax = _mm256_max_ps(amax, _mm256_and_ps(_mm256_loadu_ps(x + g0 + j), _mm256_castsi256_ps(abs_mask)));
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    const float a = _mm_cvtss_f32(m);
    const uint16_t s7 = static_cast<uint16_t>(f32_to_bits(kt::round_to_bf16(a / 7.0f)) >> 16);
    const uint16_t s8 = static_cast<uint16_t>(f32_to_bits(kt::round_to_bf16(a / 8.0f)) >> 16);
    const float d7 = bf16_to_f32(s7), d8 = bf16_to_f32(s8);
    // d8 is kept when it clips no weight and its squared error, summed in column order as the reference
    // does, is smaller; d7 on a tie. A clipped candidate's error is infinite: no sum is needed then.
    const bool clipped8 = quantize_group(x + g0, group, d8, q8);
    const bool clipped7 = quantize_group(x + g0, group, d7, q7);
    bool use8 = !clipped8;
    if (!clipped8 && !clipped7) {
      squared_errors(x + g0, q7, group, d7, sq7);
      squared_errors(x + g0, q8, group, d8, sq8);
      double e7 = 0.0, e8 = 0.0;
      for (int64_t j = 0; j < group; ++j) {
        e7 += sq7[j];
        e8 += sq8[j];
      }
      use8 = e8 < e7;
    }
    scales[gi] = use8 ? s8 : s7;
    // u = q + 8 two per byte, the even column in the low nibble: u_even + 16 u_odd per int16 pair
    const int8_t* q = use8 ? q8 : q7;
    for (int64_t j = 0; j < group; j += 32) {
      const __m256i u = _mm256_add_epi8(_mm256_load_si256(reinterpret_cast<const __m256i*>(q + j)), _mm256_set1_epi8(8));
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
