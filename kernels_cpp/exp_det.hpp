// Constants of exp_det, the deterministic exp of the MoE float stages (a Cephes-style range
// reduction + degree-5 polynomial, max rel. error 8e-8): shared by the scalar reference
// (moe_epilogue_ref.cpp) and its SIMD versions, which must use the same values in the same order.
#pragma once

namespace kt {
namespace moe {
namespace expc {
constexpr float kLo = -87.0f, kHi = 88.0f;        // n = rne(x*log2e) stays in [-126, 127]
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kRound = 12582912.0f;             // 1.5 * 2^23: (t + kRound) - kRound = rne(t)
constexpr float kC1 = 0.693359375f, kC2 = -2.12194440e-4f;  // ln2 = C1 + C2 (C1 exact in 9 bits)
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f,
                kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;
}  // namespace expc
}  // namespace moe
}  // namespace kt
