// Scalar numeric primitives shared by every packer/kernel ISA variant.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#else
#include <cfenv>
#endif

#include "pack.hpp"

namespace kt {

// E2M1 (MXFP4 element) values by 4-bit code.
inline constexpr float kE2M1[16] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f,
                                    -0.f, -0.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

inline float bits_to_f32(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
inline float bf16_to_f32(uint16_t bits) { return bits_to_f32(static_cast<uint32_t>(bits) << 16); }
// E8M0 scale as kt reads it: the byte placed in the fp32 exponent field (0x00 -> 0, 0xFF -> +inf).
inline float e8m0_to_f32(uint8_t e) { return bits_to_f32(static_cast<uint32_t>(e) << 23); }
// torch's float -> bfloat16 (round to nearest even, NaN kept NaN) and back to float.
inline float round_to_bf16(float f) {
  const uint32_t b = f32_to_bits(f);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return f;  // NaN: counted as non-finite by the caller
  return bits_to_f32((b + (((b >> 16) & 1u) + 0x7FFFu)) & 0xFFFF0000u);
}
// IEEE half bits -> float (exact, subnormals included).
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1F) return bits_to_f32(sign | 0x7F800000u | (m << 13));
  if (e == 0) {
    const float v = std::ldexp(static_cast<float>(m), -24);
    return sign ? -v : v;
  }
  return bits_to_f32(sign | ((e + 112u) << 23) | (m << 13));
}
// F8_E4M3FN (bias 7, no inf, 0x7F/0xFF NaN) -> float, exact.
inline float e4m3_to_f32(uint8_t x) {
  const uint32_t mag = x & 0x7Fu;
  float v;
  if (mag == 0x7Fu) {
    v = bits_to_f32(0x7FC00000u);
  } else if ((mag >> 3) == 0) {
    v = std::ldexp(static_cast<float>(mag), -9);
  } else {
    v = bits_to_f32((mag << 20) + (120u << 23));
  }
  return (x & 0x80u) ? -v : v;
}
inline uint32_t abs_bits(float f) { return f32_to_bits(f) & 0x7FFFFFFFu; }
inline bool is_finite_bits(float f) { return (f32_to_bits(f) & 0x7F800000u) != 0x7F800000u; }

// kt-kernel is built with -ffast-math, whose crtfastmath.o turns on FTZ and DAZ in MXCSR for the
// whole process, and GCC compiles its INT8 `amax / 127` as `amax * fl32(1/127)`. The packer does
// not depend on the MXCSR it finds (MxcsrGuard sets the IEEE default); these functions write kt's
// flushing out explicitly instead (docs/FORMAT.md §2).
inline constexpr uint32_t kFltMinBits = 0x00800000u;   // smallest normal float, 2^-126

// DAZ: a subnormal input reads as zero (the quantizer's inputs; source decoding stays IEEE).
inline float flush_subnormal(float x) { return abs_bits(x) < kFltMinBits ? 0.f : x; }

// FTZ rounding of an exact (or fp64-rounded) non-negative result to float. x86 detects tininess
// after rounding: the result is flushed when, rounded to 24 bits with an unbounded exponent, it
// is below 2^-126, i.e. when it is below 2^-126 * (1 - 2^-25) (the midpoint rounds up, to even).
// A result in [2^-126 * (1 - 2^-25), 2^-126) becomes 2^-126 (measured: docs/FORMAT.md §2).
inline float ftz_to_f32(double x) {
  constexpr double kFltMin = 0x1p-126, kFtzBelow = 0x1p-126 * (1.0 - 0x1p-25);
  if (x < kFtzBelow) return 0.f;
  if (x < kFltMin) return bits_to_f32(kFltMinBits);
  return static_cast<float>(x);
}

// kt's per-row scale from amax (normal or 0), as method_info says: INT8 fl32(amax * fl32(1/127))
// (fl32(1/127) = 0x3c010204; the fp64 product is exact); INT4 fl32((double)amax / 112.0). Both with
// FTZ: a scale that would be subnormal is 0.
inline float row_scale(Method method, float amax) {
  const MethodInfo m = method_info(method);
  const double a = static_cast<double>(amax);
  if (m.fp32_reciprocal) return ftz_to_f32(a * static_cast<double>(1.0f / static_cast<float>(m.levels)));
  return ftz_to_f32(a / static_cast<double>(m.levels));
}

// cvtps2dq under MxcsrGuard: round half to even; NaN or out of range -> INT32_MIN.
inline int32_t cvt_rne_i32(float y) {
  if (!(std::fabs(y) < 2147483648.0f)) return INT32_MIN;
  return static_cast<int32_t>(std::nearbyint(y));
}

// kt's round_4bit_s8: int8 grid value to a signed 4-bit level, ties away from zero.
inline int32_t round_4bit(int32_t v) {
  const int32_t a = v < 0 ? -v : v;
  const int32_t r = ((a + 8) & 0xF0) >> 4;
  return v < 0 ? -r : r;
}

// Sets the IEEE default floating-point state (round to nearest even, no FTZ/DAZ, exceptions
// masked) for a scope and restores the caller's on exit: another library in the process (kt-kernel
// itself, torch.set_flush_denormal, ...) may have changed it, and the packer's bytes must not depend
// on that. MXCSR is per thread: take one in every task that computes.
class MxcsrGuard {
 public:
#if defined(__x86_64__) || defined(__i386__)
  MxcsrGuard() : saved_(_mm_getcsr()) { _mm_setcsr(0x1F80u); }
  ~MxcsrGuard() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#else
  MxcsrGuard() { std::fegetenv(&saved_); std::fesetenv(FE_DFL_ENV); }
  ~MxcsrGuard() { std::fesetenv(&saved_); }

 private:
  std::fenv_t saved_;
#endif
 public:
  MxcsrGuard(const MxcsrGuard&) = delete;
  MxcsrGuard& operator=(const MxcsrGuard&) = delete;
};

}  // namespace kt
