// AVX-512 packer kernels, the AVX-512 row of pack.cpp's table; byte-identical to pack_ref.cpp (tests/test_pack.py).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "numerics.hpp"
#include "pack.hpp"

namespace kt {
namespace avx512 {
namespace {

// Zeroes non-finite lanes and returns how many there were.
inline __m512 zero_nonfinite(__m512 v, int64_t& count) {
  const __m512i exp_mask = _mm512_set1_epi32(0x7F800000);
  const __mmask16 bad = _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), exp_mask), exp_mask);
  if (bad) {
    count += __builtin_popcount(bad);
    v = _mm512_maskz_mov_ps(static_cast<__mmask16>(~bad), v);
  }
  return v;
}

// torch's float -> bfloat16 (round to nearest even), back to float; NaN lanes are kept as they are.
inline __m512 round_to_bf16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  const __m512i r = _mm512_and_si512(_mm512_add_epi32(b, bias), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  return _mm512_mask_mov_ps(_mm512_castsi512_ps(r), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
}

// 16 F8_E4M3FN bytes -> float, exact (as numerics.hpp e4m3_to_f32).
inline __m512 e4m3x16(const uint8_t* p) {
  const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i mag = _mm512_and_si512(x, _mm512_set1_epi32(0x7F));
  const __m512 normal = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23)));
  const __m512 subnormal = _mm512_mul_ps(_mm512_cvtepi32_ps(mag), _mm512_set1_ps(1.0f / 512.0f));
  __m512 v = _mm512_mask_mov_ps(normal, _mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(8)), subnormal);
  v = _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7F)),
                         _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000)));
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x80)), 24);
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), sign));
}

// 16 E2M1 codes (8 bytes, low nibble = even column) -> float.
inline __m512 e2m1x16(const uint8_t* p) {
  const __m512i byte_of = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i shift = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m512i nib = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(byte_of, b), shift),
                                       _mm512_set1_epi32(0x0F));
  return _mm512_permutexvar_ps(nib, _mm512_loadu_ps(kE2M1));
}

}  // namespace

int64_t decode_bf16(const PackJob& job, int64_t row, float* out) {
  const uint16_t* p = reinterpret_cast<const uint16_t*>(job.weight + row * job.weight_row_bytes) + job.col0;
  int64_t nonfinite = 0;
  for (int64_t j = 0; j < job.k; j += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j));
    __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    _mm512_storeu_ps(out + j, zero_nonfinite(v, nonfinite));
  }
  return nonfinite;
}

int64_t decode_f32(const PackJob& job, int64_t row, float* out) {
  const float* p = reinterpret_cast<const float*>(job.weight + row * job.weight_row_bytes) + job.col0;
  int64_t nonfinite = 0;
  for (int64_t j = 0; j < job.k; j += 16) _mm512_storeu_ps(out + j, zero_nonfinite(_mm512_loadu_ps(p + j), nonfinite));
  return nonfinite;
}

int64_t decode_mxfp4(const PackJob& job, int64_t row, float* out) {
  const __m512 lut = _mm512_loadu_ps(kE2M1);
  const __m512i even = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i odd = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const uint8_t* bytes = job.weight + row * job.weight_row_bytes + job.col0 / 2;
  const uint8_t* scales = job.scales + row * job.scale_row_bytes + job.col0 / 32;
  int64_t nonfinite = 0;
  for (int64_t j = 0; j < job.k; j += 32) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + j / 2)));
    const __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x0F)), lut);
    const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut);
    const __m512 s = _mm512_set1_ps(e8m0_to_f32(scales[j / 32]));
    const __m512 v0 = _mm512_mul_ps(_mm512_permutex2var_ps(lo, even, hi), s);
    const __m512 v1 = _mm512_mul_ps(_mm512_permutex2var_ps(lo, odd, hi), s);
    _mm512_storeu_ps(out + j, zero_nonfinite(v0, nonfinite));
    _mm512_storeu_ps(out + j + 16, zero_nonfinite(v1, nonfinite));
  }
  return nonfinite;
}

int64_t decode_f16(const PackJob& job, int64_t row, float* out) {
  const uint16_t* p = reinterpret_cast<const uint16_t*>(job.weight + row * job.weight_row_bytes) + job.col0;
  int64_t nonfinite = 0;
  for (int64_t j = 0; j < job.k; j += 16) {
    const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j)));
    _mm512_storeu_ps(out + j, zero_nonfinite(round_to_bf16(v), nonfinite));
  }
  return nonfinite;
}

int64_t decode_fp8_block(const PackJob& job, int64_t row, float* out) {
  if (job.block_k % 16 || job.col0 % 16) return ref::decode_row(job, row, out);  // a step would straddle two scales
  const uint8_t* src = job.weight + row * job.weight_row_bytes;
  const float* scales = reinterpret_cast<const float*>(
      job.scales + (job.row_offset + row) / job.block_n * job.scale_row_bytes);
  int64_t nonfinite = 0;
  for (int64_t j = 0; j < job.k; j += 16) {
    const int64_t c = job.col0 + j;
    const __m512 v = _mm512_mul_ps(e4m3x16(src + c), _mm512_set1_ps(scales[c / job.block_k]));
    _mm512_storeu_ps(out + j, zero_nonfinite(round_to_bf16(v), nonfinite));
  }
  return nonfinite;
}

int64_t decode_int4_group(const PackJob& job, int64_t row, float* out) {
  if (job.block_k % 16 || job.col0 % 16) return ref::decode_row(job, row, out);
  const uint8_t* src = job.weight + row * job.weight_row_bytes;
  const __m512i byte_of = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i shift = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  int64_t nonfinite = 0;
  for (int64_t j = 0; j < job.k; j += 16) {
    const int64_t c = job.col0 + j;
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + c / 2)));
    const __m512i u = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(byte_of, b), shift),
                                       _mm512_set1_epi32(0x0F));
    const __m512 q = _mm512_cvtepi32_ps(_mm512_sub_epi32(u, _mm512_set1_epi32(8)));
    const __m512 v = _mm512_mul_ps(q, _mm512_set1_ps(ref::int4_group_scale(job, row, c / job.block_k)));
    _mm512_storeu_ps(out + j, zero_nonfinite(round_to_bf16(v), nonfinite));
  }
  return nonfinite;
}

// NVFP4: one 16-column group per step (its scale from ref::nvfp4_group_scale, the same fp32 operation).
int64_t decode_nvfp4(const PackJob& job, int64_t row, float* out) {
  if (job.col0 % 16) return ref::decode_row(job, row, out);  // a step would straddle two scales
  const uint8_t* src = job.weight + row * job.weight_row_bytes;
  int64_t nonfinite = 0;
  for (int64_t j = 0; j < job.k; j += 16) {
    const int64_t c = job.col0 + j;
    const __m512 v = _mm512_mul_ps(e2m1x16(src + c / 2), _mm512_set1_ps(ref::nvfp4_group_scale(job, row, c / 16)));
    _mm512_storeu_ps(out + j, zero_nonfinite(round_to_bf16(v), nonfinite));
  }
  return nonfinite;
}

// MXFP8: 16 E4M3 codes times their E8M0 scale (a 16-aligned step never straddles a 32-column group).
int64_t decode_mxfp8(const PackJob& job, int64_t row, float* out) {
  if (job.col0 % 16) return ref::decode_row(job, row, out);
  const uint8_t* src = job.weight + row * job.weight_row_bytes;
  const uint8_t* scales = job.scales + row * job.scale_row_bytes;
  int64_t nonfinite = 0;
  for (int64_t j = 0; j < job.k; j += 16) {
    const int64_t c = job.col0 + j;
    const __m512 v = _mm512_mul_ps(e4m3x16(src + c), _mm512_set1_ps(e8m0_to_f32(scales[c / 32])));
    _mm512_storeu_ps(out + j, zero_nonfinite(round_to_bf16(v), nonfinite));
  }
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

namespace {
// x * id with subnormal x read as zero (DAZ, numerics.hpp flush_subnormal).
inline __m512 scaled(const float* x, __m512 id) {
  const __m512 v = _mm512_loadu_ps(x);
  const __mmask16 normal = _mm512_test_epi32_mask(_mm512_castps_si512(v), _mm512_set1_epi32(0x7F800000));
  return _mm512_maskz_mul_ps(normal, v, id);
}
}  // namespace

float quantize_row(Method method, const float* x, int64_t k, int8_t* q) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF), min_normal = _mm512_set1_epi32(kFltMinBits);
  __m512i amax = _mm512_setzero_si512();
  for (int64_t j = 0; j < k; j += 16) {
    const __m512i a = _mm512_and_si512(_mm512_loadu_si512(x + j), abs_mask);
    amax = _mm512_mask_max_epu32(amax, _mm512_cmpge_epu32_mask(a, min_normal), amax, a);  // subnormals read as 0
  }
  const float d = row_scale(method, bits_to_f32(_mm512_reduce_max_epu32(amax)));
  const __m512 id = _mm512_set1_ps(d != 0.f ? 1.0f / d : 0.f);
  if (method == Method::Int8) {
    for (int64_t j = 0; j < k; j += 16) {
      const __m512i v = _mm512_cvtps_epi32(scaled(x + j, id));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j), _mm512_cvtsepi32_epi8(v));
    }
  } else {
    const __m512i lo = _mm512_set1_epi32(-128), hi = _mm512_set1_epi32(127);
    const __m512i eight = _mm512_set1_epi32(8), high_nibble = _mm512_set1_epi32(0xF0);
    for (int64_t j = 0; j < k; j += 16) {
      __m512i v = _mm512_cvtps_epi32(scaled(x + j, id));
      v = _mm512_max_epi32(_mm512_min_epi32(v, hi), lo);
      const __m512i r = _mm512_srli_epi32(_mm512_and_si512(_mm512_add_epi32(_mm512_abs_epi32(v), eight), high_nibble), 4);
      const __mmask16 neg = _mm512_cmplt_epi32_mask(v, _mm512_setzero_si512());
      v = _mm512_mask_sub_epi32(r, neg, _mm512_setzero_si512(), r);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j), _mm512_cvtepi32_epi8(v));
    }
  }
  return d;
}

void pack_nibbles(const int8_t* q, int64_t k, uint8_t* out) {
  const __m512i low = _mm512_set1_epi8(0x0F), high = _mm512_set1_epi8(static_cast<char>(0xF0));
  for (int64_t s = 0; s < k; s += 128) {
    const __m512i a = _mm512_loadu_si512(q + s);
    const __m512i b = _mm512_loadu_si512(q + s + 64);
    const __m512i packed = _mm512_or_si512(_mm512_and_si512(a, low), _mm512_and_si512(_mm512_slli_epi16(b, 4), high));
    _mm512_storeu_si512(out + s / 2, packed);
  }
}

void tile_block(const uint8_t* rows, int64_t nbs, int64_t kbytes, int64_t kblock_bytes, uint8_t* out) {
  // one gather of 16 words (from the 16 source rows) per 64-byte tile row
  const __m512i row_offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                 _mm512_set1_epi32(static_cast<int>(kbytes)));
  for_each_tile_half(rows, nbs, kbytes, kblock_bytes, out, [&](const uint8_t* src, uint8_t* dst) {
    for (int r = 0; r < 16; ++r) _mm512_storeu_si512(dst + r * 64, _mm512_i32gather_epi32(row_offsets, src + r * 4, 1));
  });
}

namespace {

// RAWINT4: the least-error scale of a group (ref::least_squares_scale's result), as the AVX2 row finds it
// (pack_avx2.cpp says why it is exact), sixteen candidates per block.
constexpr int64_t kMaxGroup = 128;

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
  const __m512 inv1 = _mm512_set1_ps(1.f / p1), inv2 = _mm512_set1_ps(1.f / p2), at1 = _mm512_set1_ps(p1);
  const __m512 top = _mm512_set1_ps(7.f * p2), seven = _mm512_set1_ps(7.f), one = _mm512_set1_ps(1.f);
  const __m512 margin = _mm512_set1_ps(0x1p-15f), zero = _mm512_setzero_ps(), below = _mm512_set1_ps(1.f - 0x1p-15f);
  __m512 all = zero, above = zero;
  for (int64_t j = 0; j < g; j += 16) {
    const __m512 v = _mm512_load_ps(a + j);
    const __m512 t2 = _mm512_mul_ps(v, inv2), t1 = _mm512_mul_ps(v, inv1);
    const __m512 n = _mm512_roundscale_ps(t1, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 d = _mm512_sub_ps(_mm512_min_ps(_mm512_sub_ps(t2, n), _mm512_sub_ps(_mm512_add_ps(n, one), t1)), margin);
    __m512 e = _mm512_mul_ps(at1, _mm512_max_ps(d, zero));
    e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(t2, seven, _CMP_GE_OQ), _mm512_max_ps(_mm512_sub_ps(v, top), zero));
    all = _mm512_fmadd_ps(e, e, all);
    const __m512 near = _mm512_min_ps(v, _mm512_sub_ps(at1, v));
    above = _mm512_mask3_fmadd_ps(near, near, above, _mm512_cmp_ps_mask(t1, below, _CMP_LT_OQ));
  }
  return {_mm512_reduce_add_ps(all), _mm512_reduce_add_ps(above)};
}

// float64 halves of a float vector
inline __m512d lo_pd(__m512 v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
inline __m512d hi_pd(__m512 v) { return _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)); }

uint16_t least_squares_scale(const float* x, int64_t g) {
  alignas(64) float a[kMaxGroup], as[kMaxGroup];
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  __m512 m = _mm512_setzero_ps();
  for (int64_t j = 0; j < g; j += 16) {
    const __m512 v = _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(x + j), abs_mask));
    _mm512_store_ps(a + j, v);
    m = _mm512_max_ps(m, v);
  }
  const float amax = _mm512_reduce_max_ps(m);
  if (amax == 0.f) return 0;
  if (!(amax >= 0x1p-90f && amax < 0x1p100f)) return ref::least_squares_scale(x, g);
  const __m512 seven = _mm512_set1_ps(7.f), one = _mm512_set1_ps(1.f);
  // error_floors' units: amax scaled into [1, 2) (exact). sum a^2 and F(first) (first: amax/7 rounded up, which
  // clips nothing) in float64: their sum bounds the least squared error from above
  const float unit = bits_to_f32((254u - (f32_to_bits(amax) >> 23)) << 23);
  const double unit2 = static_cast<double>(unit) * unit;
  const uint32_t first = (f32_to_bits(amax / 7.0f) + 0xFFFFu) >> 16;
  const float p0 = bf16_to_f32(static_cast<uint16_t>(first));
  const __m512 inv0 = _mm512_set1_ps(1.f / p0);
  __m512d squares = _mm512_setzero_pd();
  __m512 s0 = _mm512_setzero_ps(), q0 = _mm512_setzero_ps();
  for (int64_t j = 0; j < g; j += 16) {
    const __m512 v = _mm512_load_ps(a + j);
    _mm512_store_ps(as + j, _mm512_mul_ps(v, _mm512_set1_ps(unit)));
    squares = _mm512_fmadd_pd(hi_pd(v), hi_pd(v), _mm512_fmadd_pd(lo_pd(v), lo_pd(v), squares));
    const __m512 c = _mm512_min_ps(_mm512_roundscale_ps(_mm512_mul_ps(v, inv0), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), seven);
    s0 = _mm512_fmadd_ps(v, c, s0);  // per lane at most 8 products: exact
    q0 = _mm512_fmadd_ps(c, c, q0);
  }
  const double sum_a2 = _mm512_reduce_add_pd(squares) * (1.0 + 0x1p-40);  // above its rounding
  const double s_first = _mm512_reduce_add_pd(_mm512_add_pd(lo_pd(s0), hi_pd(s0)));  // exact in float64
  const double q_first = _mm512_reduce_add_ps(q0);
  double least = p0 * (p0 * q_first - 2.0 * s_first);  // F(first); the least F is at most this
  const uint32_t hi = ref::scale_ceiling_bits(amax);
  const __m512i last = _mm512_set1_epi32(static_cast<int>(hi));
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512d best_f[2] = {_mm512_set1_pd(HUGE_VAL), _mm512_set1_pd(HUGE_VAL)};
  __m512d best_bits[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};
  for (uint32_t b0 = ref::scale_floor_bits(amax, sum_a2 + least); b0 <= hi; b0 += 16) {
    // the least squared error found so far, from above, in error_floors' units: a block whose floor is higher
    // holds no scale that reaches (or ties) it; once the floor of everything above is higher, nothing does
    const double bound = (sum_a2 + least) * unit2;
    const ErrorFloors floors = error_floors(as, g, bf16_to_f32(static_cast<uint16_t>(b0)) * unit,
                                            bf16_to_f32(static_cast<uint16_t>(std::min(b0 + 15, hi))) * unit);
    if (floors.above * (1.0 - 0x1p-10) > bound) break;
    if (floors.all * (1.0 - 0x1p-10) > bound) continue;
    const __m512i bits = _mm512_min_epu32(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(b0)), lanes), last);
    const __m512 p = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
    const __m512 inv = _mm512_div_ps(one, p);
    __m512 s[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()}, q[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t j = 0; j < g; j += 2)  // two chains of at most 64 weights each
      for (int i = 0; i < 2; ++i) {
        const __m512 aj = _mm512_set1_ps(a[j + i]);
        const __m512 c = _mm512_min_ps(_mm512_roundscale_ps(_mm512_mul_ps(aj, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), seven);
        s[i] = _mm512_fmadd_ps(aj, c, s[i]);
        q[i] = _mm512_fmadd_ps(c, c, q[i]);
      }
    const __m512 qs = _mm512_add_ps(q[0], q[1]);
    for (int h = 0; h < 2; ++h) {
      const auto part = [h](__m512 v) { return h ? hi_pd(v) : lo_pd(v); };
      const __m512d pd = part(p), sd = _mm512_add_pd(part(s[0]), part(s[1]));
      const __m512d f = _mm512_mul_pd(pd, _mm512_sub_pd(_mm512_mul_pd(pd, part(qs)), _mm512_add_pd(sd, sd)));
      const __mmask8 less = _mm512_cmp_pd_mask(f, best_f[h], _CMP_LT_OQ);  // a lane's candidates ascend
      best_f[h] = _mm512_mask_mov_pd(best_f[h], less, f);
      const __m256i lane_bits = h ? _mm512_extracti64x4_epi64(bits, 1) : _mm512_castsi512_si256(bits);
      best_bits[h] = _mm512_mask_mov_pd(best_bits[h], less, _mm512_cvtepi32_pd(lane_bits));
    }
    least = std::min(least, _mm512_reduce_min_pd(_mm512_min_pd(best_f[0], best_f[1])));
  }
  alignas(64) double f[16], b[16];
  for (int h = 0; h < 2; ++h) {
    _mm512_store_pd(f + 8 * h, best_f[h]);
    _mm512_store_pd(b + 8 * h, best_bits[h]);
  }
  return ref::least_error_lane(f, b, 16);
}

// Codes clamp(rint_even(x / d), -7, 7) with the exact quotient; u = q + 8 two per byte, the even column low.
void quantize_groups_row(const float* x, int64_t k, int64_t group, uint8_t* out, uint16_t* scales) {
  if (group % 32 || group > kMaxGroup) return ref::quantize_groups_row(x, k, group, out, scales);
  const __m512 lo = _mm512_set1_ps(-7.f), hi = _mm512_set1_ps(7.f);
  const __m512i eight = _mm512_set1_epi32(8);
  for (int64_t g0 = 0, gi = 0; g0 < k; g0 += group, ++gi) {
    const uint16_t sb = least_squares_scale(x + g0, group);
    scales[gi] = sb;
    if (sb == 0) {  // an all-zero group: codes 0
      std::memset(out + g0 / 2, 0x88, static_cast<size_t>(group / 2));
      continue;
    }
    const __m512 d = _mm512_set1_ps(bf16_to_f32(sb));
    for (int64_t j = 0; j < group; j += 16) {
      const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + g0 + j), d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i u = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_max_ps(_mm512_min_ps(r, hi), lo)), eight);
      // each 64-bit lane holds (u_even, u_odd): u_even | u_odd << 4 in its low byte
      const __m128i bytes = _mm512_cvtepi64_epi8(_mm512_or_si512(u, _mm512_srli_epi64(u, 28)));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + (g0 + j) / 2), bytes);
    }
  }
}

}  // namespace

PackKernels kernels() { return {decoder, quantize_row, pack_nibbles, tile_block, quantize_groups_row}; }

}  // namespace avx512
}  // namespace kt
