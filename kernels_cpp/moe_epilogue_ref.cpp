// Portable reference of the MoE float stages (built for the baseline x86-64: SSE2, no FMA, so
// the compiler cannot contract a*b+c). moe_epilogue_avx512.cpp does the same IEEE operations in
// the same order per element; tests/test_cpu_moe.py checks bit identity.
#include <emmintrin.h>
#include <xmmintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "exp_det.hpp"
#include "moe.hpp"

namespace kt {
namespace moe {


float exp_det(float x) {
  using namespace expc;
  // std::max(x, lo) = (x < lo) ? lo : x  (NaN stays NaN), then std::min(., hi) = (hi < .) ? hi : .
  x = std::min(std::max(x, kLo), kHi);
  const float t = x * kLog2e;
  const float tr = t + kRound;
  const float n = tr - kRound;
  float r = x - n * kC1;
  r = r - n * kC2;
  const float z = r * r;
  float y = kP0;
  y = y * r + kP1;
  y = y * r + kP2;
  y = y * r + kP3;
  y = y * r + kP4;
  y = y * r + kP5;
  y = (y * z + r) + 1.0f;
  uint32_t b;
  std::memcpy(&b, &tr, 4);
  b = (b + 127u) << 23;  // tr's low bits hold n (two's complement); 2^n in the exponent field
  float p;
  std::memcpy(&p, &b, 4);
  return y * p;
}

float quantize_act(const float* x, int64_t k, int8_t* q, int32_t* qsum) {
  float amax = 0.f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));  // NaN skipped
  const float d = amax / 127.0f;
  const float id = d != 0.f ? 1.0f / d : 0.f;
  int32_t s = 0;
  for (int64_t i = 0; i < k; ++i) {
    // cvtss2si: round half to even under the default MXCSR, as kt's _mm512_cvtps_epi32
    int32_t v = _mm_cvtss_si32(_mm_set_ss(x[i] * id));
    v = std::min(127, std::max(-128, v));
    q[i] = static_cast<int8_t>(v);
    s += v;
  }
  *qsum = s;
  return d;
}

namespace ref {

// Never inlined: the build links with LTO, and a copy inlined into an -mfma translation unit (the AVX-512
// epilogue calls this for SiTU) may be contracted there (a*b+c in one rounding, in exp_det's polynomial).
__attribute__((noinline)) float activate(float gv, float uv, const GateAct& p, int j) {
  if (p.bg) gv = gv + p.bg[j];
  if (p.bu) uv = uv + p.bu[j];
  if (p.clamp) {
    gv = std::min(gv, p.limit);
    uv = std::min(std::max(uv, -p.limit), p.limit);
  }
  if (p.situ)  // std::tanh: no SIMD version; the SIMD epilogues call this function for SiTU
    return p.beta * std::tanh(gv / p.beta) / (1.0f + exp_det(-gv)) * (p.linear_beta * std::tanh(uv / p.linear_beta));
  if (p.gpt_oss) return gv / (1.0f + exp_det(-(gv * p.alpha))) * (uv + p.up_offset);
  return gv / (1.0f + exp_det(-gv)) * uv;
}

namespace {

void silu_gate(const int32_t* ag, const int32_t* au, int64_t m, const float* xd, const float* sg, const float* su,
               const GateAct& p, float* act, int64_t stride) {
  for (int64_t i = 0; i < m; ++i)
    for (int j = 0; j < 32; ++j) {
      const float gv = static_cast<float>(ag[i * 32 + j]) * (xd[i] * sg[j]);
      const float uv = static_cast<float>(au[i * 32 + j]) * (xd[i] * su[j]);
      act[i * stride + j] = activate(gv, uv, p, j);
    }
}

void group_silu_gate(const float* pg, const float* pu, int64_t m, const float* xd, const GateAct& p, float* act,
                     int64_t stride) {
  for (int64_t i = 0; i < m; ++i)
    for (int j = 0; j < 32; ++j) act[i * stride + j] = activate(pg[i * 32 + j] * xd[i], pu[i * 32 + j] * xd[i], p, j);
}

void down(const int32_t* acc, int64_t m, const float* ad, const float* sd, float* y, int64_t ys, bool first,
          const float* b) {
  for (int64_t i = 0; i < m; ++i)
    for (int j = 0; j < 32; ++j) {
      const float v = static_cast<float>(acc[i * 32 + j]) * (ad[i] * sd[j]);
      y[i * ys + j] = (first ? (b ? b[j] : 0.0f) : y[i * ys + j]) + v;
    }
}

void down_out(const int32_t* acc, int64_t gs, int64_t ng, int64_t m, const float* ad, const float* sd,
              const float* y, const float* b, const float* w, const int64_t* tok, float* out, int64_t os) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t g = 0; g < ng; ++g) {
      float* o = out + tok[i] * os + g * 32;
      const int64_t e = g * gs + i * 32;
      for (int j = 0; j < 32; ++j) {
        const float y0 = y ? y[e + j] : b ? b[g * 32 + j] : 0.0f;
        const float v = y0 + static_cast<float>(acc[e + j]) * (ad[i] * sd[g * 32 + j]);
        o[j] += w[i] * v;
      }
    }
}

void axpy(float* o, float w, const float* y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) o[j] += w * y[j];
}

void exp_arr(const float* x, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = exp_det(x[i]);
}

}  // namespace
}  // namespace ref

const Epilogue& epilogue_ref() {
  static const Epilogue e{quantize_act, ref::silu_gate, ref::down,   ref::down_out,
                          ref::axpy,    ref::exp_arr,   ref::group_silu_gate};
  return e;
}

}  // namespace moe
}  // namespace kt
