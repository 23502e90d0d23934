// AVX2 dot kernel (VPMADDUBSW, moe_avx2_dot.hpp): the avx2 row of the ISA table. CPUs with AVX-VNNI have
// the avxvnni row (moe_avxvnni.cpp, VPDPBUSD) above it. Both return the reference's int32 sums.
#include "moe_avx2_dot.hpp"

namespace kt {
namespace moe {
namespace avx2 {

void dot_rowgroup(Method method, const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, ALayout la,
                  const int32_t* asum, int64_t m, int32_t* out) {
  avx2_dot::dot_rowgroup<false>(method, w, n, k, r0, a, la, asum, m, out);
}

}  // namespace avx2
}  // namespace moe
}  // namespace kt
