// AVX-VNNI dot kernel (VEX VPDPBUSD on ymm, moe_avx2_dot.hpp): the avxvnni row of the ISA table, which runs
// only where CPUID shows AVX-VNNI (moe_isa.cpp). Built with -mavx2 -mavxvnni.
#include "moe_avx2_dot.hpp"

namespace kt {
namespace moe {
namespace avxvnni {

void dot_rowgroup(Method method, const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, ALayout la,
                  const int32_t* asum, int64_t m, int32_t* out) {
  avx2_dot::dot_rowgroup<true>(method, w, n, k, r0, a, la, asum, m, out);
}

}  // namespace avxvnni
}  // namespace moe
}  // namespace kt
