// AVX-512 MoE float stages: element for element the IEEE operations of the reference in
// moe_epilogue_ref.cpp, in the same order, so the results are bit-identical.
// This file is built with -mfma and GCC's default -ffp-contract=fast would fuse a plain
// _mm512_mul_ps feeding an _mm512_add_ps into an FMA (different rounding). Every float
// mul/add/sub/div here is therefore the explicit-rounding form (_MM_FROUND_TO_NEAREST_INT |
// _MM_FROUND_NO_EXC: round to nearest even, the default MXCSR mode), which the compiler never
// contracts. max/min keep the reference's NaN operand order: std::max(a, b) = (a < b) ? b : a
// = _mm512_max_ps(b, a); std::min(a, b) = (b < a) ? b : a = _mm512_min_ps(b, a).
#include <immintrin.h>

#include <cstdint>

#include "exp_det.hpp"
#include "moe.hpp"

namespace kt {
namespace moe {
namespace avx512 {
namespace {

constexpr int kRnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
inline __m512 mul(__m512 a, __m512 b) { return _mm512_mul_round_ps(a, b, kRnd); }
inline __m512 add(__m512 a, __m512 b) { return _mm512_add_round_ps(a, b, kRnd); }
inline __m512 sub(__m512 a, __m512 b) { return _mm512_sub_round_ps(a, b, kRnd); }
inline __m512 div(__m512 a, __m512 b) { return _mm512_div_round_ps(a, b, kRnd); }
inline __m512 set1(float v) { return _mm512_set1_ps(v); }

using namespace expc;  // exp_det.hpp

inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(set1(kHi), _mm512_max_ps(set1(kLo), x));  // std::min(std::max(x, lo), hi)
  const __m512 t = mul(x, set1(kLog2e));
  const __m512 tr = add(t, set1(kRound));
  const __m512 n = sub(tr, set1(kRound));
  __m512 r = sub(x, mul(n, set1(kC1)));
  r = sub(r, mul(n, set1(kC2)));
  const __m512 z = mul(r, r);
  __m512 y = set1(kP0);
  y = add(mul(y, r), set1(kP1));
  y = add(mul(y, r), set1(kP2));
  y = add(mul(y, r), set1(kP3));
  y = add(mul(y, r), set1(kP4));
  y = add(mul(y, r), set1(kP5));
  y = add(add(mul(y, z), r), set1(1.0f));
  const __m512i b = _mm512_slli_epi32(_mm512_add_epi32(_mm512_castps_si512(tr), _mm512_set1_epi32(127)), 23);
  return mul(y, _mm512_castsi512_ps(b));
}

float quantize(const float* x, int64_t k, int8_t* q, int32_t* qsum) {
  const __m512 absm = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  // amax = max over |x| skipping NaN: _mm512_max_ps(v, acc) returns acc when v is NaN. Masked-off
  // tail lanes load 0, which cannot raise a max over values >= 0. max is exact: any order is fine.
  __m512 m0 = _mm512_setzero_ps(), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 64 <= k; i += 64) {
    m0 = _mm512_max_ps(_mm512_and_ps(_mm512_loadu_ps(x + i), absm), m0);
    m1 = _mm512_max_ps(_mm512_and_ps(_mm512_loadu_ps(x + i + 16), absm), m1);
    m2 = _mm512_max_ps(_mm512_and_ps(_mm512_loadu_ps(x + i + 32), absm), m2);
    m3 = _mm512_max_ps(_mm512_and_ps(_mm512_loadu_ps(x + i + 48), absm), m3);
  }
  for (; i < k; i += 16) {
    const __mmask16 mk = k - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (k - i)) - 1);
    m0 = _mm512_max_ps(_mm512_and_ps(_mm512_maskz_loadu_ps(mk, x + i), absm), m0);
  }
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
  const float d = amax / 127.0f;
  const float id = d != 0.f ? 1.0f / d : 0.f;
  const __m512 vid = set1(id);
  const __m512i lo = _mm512_set1_epi32(-128), hi = _mm512_set1_epi32(127);
  __m512i s0 = _mm512_setzero_si512(), s1 = s0;
  i = 0;
  // cvtps2dq rounds under MXCSR like the reference's cvtss2si; NaN / out of range -> INT32_MIN -> -128
  for (; i + 32 <= k; i += 32) {
    __m512i v0 = _mm512_cvtps_epi32(mul(_mm512_loadu_ps(x + i), vid));
    __m512i v1 = _mm512_cvtps_epi32(mul(_mm512_loadu_ps(x + i + 16), vid));
    v0 = _mm512_min_epi32(_mm512_max_epi32(v0, lo), hi);
    v1 = _mm512_min_epi32(_mm512_max_epi32(v1, lo), hi);
    s0 = _mm512_add_epi32(s0, v0);
    s1 = _mm512_add_epi32(s1, v1);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(v0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i + 16), _mm512_cvtepi32_epi8(v1));
  }
  for (; i < k; i += 16) {
    const __mmask16 mk = k - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (k - i)) - 1);
    __m512i v = _mm512_cvtps_epi32(mul(_mm512_maskz_loadu_ps(mk, x + i), vid));
    v = _mm512_maskz_mov_epi32(mk, _mm512_min_epi32(_mm512_max_epi32(v, lo), hi));
    s0 = _mm512_add_epi32(s0, v);
    _mm512_mask_cvtepi32_storeu_epi8(q + i, mk, v);
  }
  *qsum = _mm512_reduce_add_epi32(_mm512_add_epi32(s0, s1));
  return d;
}

// Bias, clamp and activation of 16 gate/up values: lanes h*16.. of a 32-row group (p's biases, limit and
// activation).
class Activation {
 public:
  explicit Activation(const GateAct& p)
      : p_(p), L_(set1(p.limit)), nL_(set1(-p.limit)), alpha_(set1(p.alpha)), off_(set1(p.up_offset)) {
    const __m512 zero = _mm512_setzero_ps();
    for (int h = 0; h < 2; ++h) {
      bg_[h] = p.bg ? _mm512_loadu_ps(p.bg + h * 16) : zero;
      bu_[h] = p.bu ? _mm512_loadu_ps(p.bu + h * 16) : zero;
    }
  }
  __m512 operator()(__m512 g, __m512 u, int h) const {
    if (p_.situ) return scalar(g, u, h);
    if (p_.bg) g = add(g, bg_[h]);
    if (p_.bu) u = add(u, bu_[h]);
    if (p_.clamp) {
      g = _mm512_min_ps(L_, g);                      // std::min(g, L)
      u = _mm512_min_ps(L_, _mm512_max_ps(nL_, u));  // std::min(std::max(u, -L), L)
    }
    const __m512 one = set1(1.0f);
    return p_.gpt_oss ? mul(div(g, add(one, exp16(neg(mul(g, alpha_))))), add(u, off_))
                      : mul(div(g, add(one, exp16(neg(g)))), u);
  }

 private:
  static __m512 neg(__m512 v) {
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32(INT32_MIN)));
  }
  // SiTU has no SIMD version (std::tanh): the scalar definition per lane, so every ISA gives its bits
  __m512 scalar(__m512 g, __m512 u, int h) const {
    alignas(64) float gs[16], us[16], a[16];
    _mm512_store_ps(gs, g);
    _mm512_store_ps(us, u);
    for (int l = 0; l < 16; ++l) a[l] = ref::activate(gs[l], us[l], p_, h * 16 + l);
    return _mm512_load_ps(a);
  }
  const GateAct& p_;
  __m512 L_, nL_, alpha_, off_, bg_[2], bu_[2];
};

void silu_gate(const int32_t* ag, const int32_t* au, int64_t m, const float* xd, const float* sg, const float* su,
               const GateAct& p, float* act, int64_t stride) {
  const __m512 sg0 = _mm512_loadu_ps(sg), sg1 = _mm512_loadu_ps(sg + 16);
  const __m512 su0 = _mm512_loadu_ps(su), su1 = _mm512_loadu_ps(su + 16);
  const Activation activate(p);
  for (int64_t i = 0; i < m; ++i) {
    const __m512 xs = set1(xd[i]);
    const __m512 sgv[2] = {mul(xs, sg0), mul(xs, sg1)};
    const __m512 suv[2] = {mul(xs, su0), mul(xs, su1)};
    for (int h = 0; h < 2; ++h) {
      const __m512 g = mul(_mm512_cvtepi32_ps(_mm512_loadu_si512(ag + i * 32 + h * 16)), sgv[h]);
      const __m512 u = mul(_mm512_cvtepi32_ps(_mm512_loadu_si512(au + i * 32 + h * 16)), suv[h]);
      _mm512_storeu_ps(act + i * stride + h * 16, activate(g, u, h));
    }
  }
}

void group_silu_gate(const float* pg, const float* pu, int64_t m, const float* xd, const GateAct& p, float* act,
                     int64_t stride) {
  const Activation activate(p);
  for (int64_t i = 0; i < m; ++i) {
    const __m512 xs = set1(xd[i]);
    for (int h = 0; h < 2; ++h) {
      const __m512 g = mul(_mm512_loadu_ps(pg + i * 32 + h * 16), xs);
      const __m512 u = mul(_mm512_loadu_ps(pu + i * 32 + h * 16), xs);
      _mm512_storeu_ps(act + i * stride + h * 16, activate(g, u, h));
    }
  }
}

void down(const int32_t* acc, int64_t m, const float* ad, const float* sd, float* y, int64_t ys, bool first,
          const float* b) {
  const __m512 sd0 = _mm512_loadu_ps(sd), sd1 = _mm512_loadu_ps(sd + 16);
  const __m512 zero = _mm512_setzero_ps();
  const __m512 b0 = b ? _mm512_loadu_ps(b) : zero, b1 = b ? _mm512_loadu_ps(b + 16) : zero;
  for (int64_t i = 0; i < m; ++i) {
    const __m512 as = set1(ad[i]);
    const __m512 v0 = mul(_mm512_cvtepi32_ps(_mm512_loadu_si512(acc + i * 32)), mul(as, sd0));
    const __m512 v1 = mul(_mm512_cvtepi32_ps(_mm512_loadu_si512(acc + i * 32 + 16)), mul(as, sd1));
    float* yr = y + i * ys;
    _mm512_storeu_ps(yr, add(first ? b0 : _mm512_loadu_ps(yr), v0));
    _mm512_storeu_ps(yr + 16, add(first ? b1 : _mm512_loadu_ps(yr + 16), v1));
  }
}

void down_out(const int32_t* acc, int64_t gs, int64_t ng, int64_t m, const float* ad, const float* sd,
              const float* y, const float* b, const float* w, const int64_t* tok, float* out, int64_t os) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t i = 0; i < m; ++i) {
    const __m512 as = set1(ad[i]), vw = set1(w[i]);
    float* orow = out + tok[i] * os;
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t e = g * gs + i * 32;
      const __m512 v0 = mul(_mm512_cvtepi32_ps(_mm512_loadu_si512(acc + e)), mul(as, _mm512_loadu_ps(sd + g * 32)));
      const __m512 v1 =
          mul(_mm512_cvtepi32_ps(_mm512_loadu_si512(acc + e + 16)), mul(as, _mm512_loadu_ps(sd + g * 32 + 16)));
      const __m512 i0 = y ? _mm512_loadu_ps(y + e) : b ? _mm512_loadu_ps(b + g * 32) : zero;
      const __m512 i1 = y ? _mm512_loadu_ps(y + e + 16) : b ? _mm512_loadu_ps(b + g * 32 + 16) : zero;
      const __m512 y0 = add(i0, v0);
      const __m512 y1 = add(i1, v1);
      float* o = orow + g * 32;
      _mm512_storeu_ps(o, add(_mm512_loadu_ps(o), mul(vw, y0)));
      _mm512_storeu_ps(o + 16, add(_mm512_loadu_ps(o + 16), mul(vw, y1)));
    }
  }
}

void axpy(float* o, float w, const float* y, int64_t n) {
  const __m512 vw = set1(w);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) _mm512_storeu_ps(o + j, add(_mm512_loadu_ps(o + j), mul(vw, _mm512_loadu_ps(y + j))));
  if (j < n) {
    const __mmask16 mk = __mmask16((1u << (n - j)) - 1);
    _mm512_mask_storeu_ps(o + j, mk, add(_mm512_maskz_loadu_ps(mk, o + j), mul(vw, _mm512_maskz_loadu_ps(mk, y + j))));
  }
}

void exp_arr(const float* x, int64_t n, float* y) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, exp16(_mm512_loadu_ps(x + i)));
  if (i < n) {
    const __mmask16 mk = __mmask16((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(y + i, mk, exp16(_mm512_maskz_loadu_ps(mk, x + i)));
  }
}

}  // namespace
}  // namespace avx512

const Epilogue& epilogue_avx512() {
  static const Epilogue e{avx512::quantize, avx512::silu_gate, avx512::down,           avx512::down_out,
                          avx512::axpy,     avx512::exp_arr,   avx512::group_silu_gate};
  return e;
}

}  // namespace moe
}  // namespace kt
