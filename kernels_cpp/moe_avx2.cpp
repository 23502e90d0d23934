// AVX2 dot kernel (VPMADDUBSW, moe_avx2_dot.hpp) and the entry point of Isa::Avx2: CPUs with
// AVX-VNNI run the VPDPBUSD version instead (moe_avxvnni.cpp, a TU of its own built with
// -mavxvnni, entered only after the CPUID check here). Both return the reference's int32 sums.
#include <atomic>

#include "moe_avx2_dot.hpp"

namespace kt {
namespace moe {
namespace avx2 {
namespace {
std::atomic<int> g_vnni{-1};  // -1: not decided yet (CPUID is read on first use)
}

bool vnni() {
  int v = g_vnni.load(std::memory_order_relaxed);
  if (v < 0) {
    v = cpu_features().avx_vnni ? 1 : 0;
    g_vnni.store(v, std::memory_order_relaxed);
  }
  return v != 0;
}

void set_vnni(bool on) { g_vnni.store(on && cpu_features().avx_vnni ? 1 : 0, std::memory_order_relaxed); }

void dot_rowgroup(Method method, const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, ALayout la,
                  const int32_t* asum, int64_t m, int32_t* out) {
  if (vnni()) return avxvnni::dot_rowgroup(method, w, n, k, r0, a, la, asum, m, out);
  avx2_dot::dot_rowgroup<false>(method, w, n, k, r0, a, la, asum, m, out);
}

}  // namespace avx2
}  // namespace moe
}  // namespace kt
