// AVX2 MoE float stages: element for element the IEEE operations of the reference in
// moe_epilogue_ref.cpp, in the same order, so the results are bit-identical (as
// moe_epilogue_avx512.cpp, 8 lanes instead of 16). AVX2 has no explicit-rounding forms, and GCC
// implements _mm256_mul_ps / _mm256_add_ps as plain vector operators that -mfma would let it fuse
// into FMAs (one rounding instead of two): the *_avx2.cpp files are therefore built with
// -ffp-contract=off (CMakeLists.txt). max/min keep the reference's NaN operand order:
// std::max(a, b) = (a < b) ? b : a = _mm256_max_ps(b, a); std::min(a, b) = (b < a) ? b : a = _mm256_min_ps(b, a).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "exp_det.hpp"
#include "moe.hpp"

namespace kt {
namespace moe {
namespace avx2 {
namespace {

inline __m256 mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
inline __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
inline __m256 sub(__m256 a, __m256 b) { return _mm256_sub_ps(a, b); }
inline __m256 div(__m256 a, __m256 b) { return _mm256_div_ps(a, b); }
inline __m256 set1(float v) { return _mm256_set1_ps(v); }
inline __m256 cvt(const int32_t* p) {
  return _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

using namespace expc;  // exp_det.hpp

inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(set1(kHi), _mm256_max_ps(set1(kLo), x));  // std::min(std::max(x, lo), hi)
  const __m256 t = mul(x, set1(kLog2e));
  const __m256 tr = add(t, set1(kRound));
  const __m256 n = sub(tr, set1(kRound));
  __m256 r = sub(x, mul(n, set1(kC1)));
  r = sub(r, mul(n, set1(kC2)));
  const __m256 z = mul(r, r);
  __m256 y = set1(kP0);
  y = add(mul(y, r), set1(kP1));
  y = add(mul(y, r), set1(kP2));
  y = add(mul(y, r), set1(kP3));
  y = add(mul(y, r), set1(kP4));
  y = add(mul(y, r), set1(kP5));
  y = add(add(mul(y, z), r), set1(1.0f));
  const __m256i b = _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(tr), _mm256_set1_epi32(127)), 23);
  return mul(y, _mm256_castsi256_ps(b));
}

float quantize(const float* x, int64_t k, int8_t* q, int32_t* qsum) {
  const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  // amax = max over |x| skipping NaN: _mm256_max_ps(v, acc) returns acc when v is NaN; max is
  // exact, so any order gives the reference's value.
  __m256 m0 = _mm256_setzero_ps(), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    m0 = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), absm), m0);
    m1 = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i + 8), absm), m1);
    m2 = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i + 16), absm), m2);
    m3 = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i + 24), absm), m3);
  }
  const __m256 mv = _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mv);
  float amax = 0.f;
  for (float v : lanes) amax = std::max(amax, v);
  for (; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));  // NaN skipped, as the reference
  const float d = amax / 127.0f;
  const float id = d != 0.f ? 1.0f / d : 0.f;
  const __m256 vid = set1(id);
  const __m256i lo = _mm256_set1_epi32(-128), hi = _mm256_set1_epi32(127);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the lane interleave of the packs
  __m256i s0 = _mm256_setzero_si256(), s1 = s0;
  i = 0;
  // cvtps2dq rounds under MXCSR like the reference's cvtss2si; NaN / out of range -> INT32_MIN -> -128
  for (; i + 32 <= k; i += 32) {
    __m256i v[4];
    for (int c = 0; c < 4; ++c) {
      v[c] = _mm256_cvtps_epi32(mul(_mm256_loadu_ps(x + i + 8 * c), vid));
      v[c] = _mm256_min_epi32(_mm256_max_epi32(v[c], lo), hi);
    }
    s0 = _mm256_add_epi32(s0, _mm256_add_epi32(v[0], v[1]));
    s1 = _mm256_add_epi32(s1, _mm256_add_epi32(v[2], v[3]));
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(b, order));
  }
  const __m256i s = _mm256_add_epi32(s0, s1);
  alignas(32) int32_t sl[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(sl), s);
  int32_t sum = 0;
  for (int32_t v : sl) sum += v;
  for (; i < k; ++i) {
    int32_t v = _mm_cvtss_si32(_mm_set_ss(x[i] * id));
    v = std::min(127, std::max(-128, v));
    q[i] = static_cast<int8_t>(v);
    sum += v;
  }
  *qsum = sum;
  return d;
}

// Bias, clamp and activation of 8 gate/up values: lanes c*8.. of a 32-row group (p's biases, limit and
// activation).
class Activation {
 public:
  explicit Activation(const GateAct& p)
      : p_(p), L_(set1(p.limit)), nL_(set1(-p.limit)), alpha_(set1(p.alpha)), off_(set1(p.up_offset)) {}
  __m256 operator()(__m256 g, __m256 u, int c) const {
    if (p_.situ) return scalar(g, u, c);
    if (p_.bg) g = add(g, _mm256_loadu_ps(p_.bg + c * 8));
    if (p_.bu) u = add(u, _mm256_loadu_ps(p_.bu + c * 8));
    if (p_.clamp) {
      g = _mm256_min_ps(L_, g);                      // std::min(g, L)
      u = _mm256_min_ps(L_, _mm256_max_ps(nL_, u));  // std::min(std::max(u, -L), L)
    }
    const __m256 one = set1(1.0f);
    return p_.gpt_oss ? mul(div(g, add(one, exp8(neg(mul(g, alpha_))))), add(u, off_))
                      : mul(div(g, add(one, exp8(neg(g)))), u);
  }

 private:
  static __m256 neg(__m256 v) {
    return _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(v), _mm256_set1_epi32(INT32_MIN)));
  }
  // SiTU has no SIMD version (std::tanh): the scalar definition per lane, so every ISA gives its bits
  __m256 scalar(__m256 g, __m256 u, int c) const {
    alignas(32) float gs[8], us[8], a[8];
    _mm256_store_ps(gs, g);
    _mm256_store_ps(us, u);
    for (int l = 0; l < 8; ++l) a[l] = ref::activate(gs[l], us[l], p_, c * 8 + l);
    return _mm256_load_ps(a);
  }
  const GateAct& p_;
  __m256 L_, nL_, alpha_, off_;
};

void silu_gate(const int32_t* ag, const int32_t* au, int64_t m, const float* xd, const float* sg, const float* su,
               const GateAct& p, float* act, int64_t stride) {
  const Activation activate(p);
  for (int64_t i = 0; i < m; ++i) {
    const __m256 xs = set1(xd[i]);
    for (int c = 0; c < 4; ++c) {
      const __m256 g = mul(cvt(ag + i * 32 + c * 8), mul(xs, _mm256_loadu_ps(sg + c * 8)));
      const __m256 u = mul(cvt(au + i * 32 + c * 8), mul(xs, _mm256_loadu_ps(su + c * 8)));
      _mm256_storeu_ps(act + i * stride + c * 8, activate(g, u, c));
    }
  }
}

void group_silu_gate(const float* pg, const float* pu, int64_t m, const float* xd, const GateAct& p, float* act,
                     int64_t stride) {
  const Activation activate(p);
  for (int64_t i = 0; i < m; ++i) {
    const __m256 xs = set1(xd[i]);
    for (int c = 0; c < 4; ++c) {
      const __m256 g = mul(_mm256_loadu_ps(pg + i * 32 + c * 8), xs);
      const __m256 u = mul(_mm256_loadu_ps(pu + i * 32 + c * 8), xs);
      _mm256_storeu_ps(act + i * stride + c * 8, activate(g, u, c));
    }
  }
}

void down(const int32_t* acc, int64_t m, const float* ad, const float* sd, float* y, int64_t ys, bool first,
          const float* b) {
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t i = 0; i < m; ++i) {
    const __m256 as = set1(ad[i]);
    float* yr = y + i * ys;
    for (int c = 0; c < 4; ++c) {
      const __m256 v = mul(cvt(acc + i * 32 + c * 8), mul(as, _mm256_loadu_ps(sd + c * 8)));
      const __m256 y0 = first ? (b ? _mm256_loadu_ps(b + c * 8) : zero) : _mm256_loadu_ps(yr + c * 8);
      _mm256_storeu_ps(yr + c * 8, add(y0, v));
    }
  }
}

void down_out(const int32_t* acc, int64_t gs, int64_t ng, int64_t m, const float* ad, const float* sd,
              const float* y, const float* b, const float* w, const int64_t* tok, float* out, int64_t os) {
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t i = 0; i < m; ++i) {
    const __m256 as = set1(ad[i]), vw = set1(w[i]);
    float* orow = out + tok[i] * os;
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t e = g * gs + i * 32;
      float* o = orow + g * 32;
      for (int c = 0; c < 4; ++c) {
        const __m256 v = mul(cvt(acc + e + c * 8), mul(as, _mm256_loadu_ps(sd + g * 32 + c * 8)));
        const __m256 y0 = y ? _mm256_loadu_ps(y + e + c * 8) : b ? _mm256_loadu_ps(b + g * 32 + c * 8) : zero;
        const __m256 yv = add(y0, v);
        _mm256_storeu_ps(o + c * 8, add(_mm256_loadu_ps(o + c * 8), mul(vw, yv)));
      }
    }
  }
}

void axpy(float* o, float w, const float* y, int64_t n) {
  const __m256 vw = set1(w);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(o + j, add(_mm256_loadu_ps(o + j), mul(vw, _mm256_loadu_ps(y + j))));
  for (; j < n; ++j) o[j] += w * y[j];  // not contracted: -ffp-contract=off
}

void exp_arr(const float* x, int64_t n, float* y) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, exp8(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) y[i] = exp_det(x[i]);
}

}  // namespace
}  // namespace avx2

const Epilogue& epilogue_avx2() {
  static const Epilogue e{avx2::quantize, avx2::silu_gate, avx2::down,           avx2::down_out,
                          avx2::axpy,     avx2::exp_arr,   avx2::group_silu_gate};
  return e;
}

}  // namespace moe
}  // namespace kt
