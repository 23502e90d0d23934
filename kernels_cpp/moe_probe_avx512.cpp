// Register-only AVX-512 VNNI loop for the benchmarks' scaling probe (kt_kernels._testing.probe): VPDPBUSD on 12
// independent accumulators, no memory traffic.
#include <immintrin.h>

#include <chrono>

#include "moe_probe.hpp"

namespace kt {
namespace moe {
namespace avx512 {

int64_t vnni_probe(double seconds) {
  __m512i acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_epi32(i);
  const __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(2);
  int64_t done = 0;
  const auto t0 = std::chrono::steady_clock::now();
  do {
    for (int r = 0; r < 256; ++r)
      for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
    done += 256 * 12;
  } while (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < seconds);
  __m512i s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_epi32(s, acc[i]);
  volatile int32_t sink = _mm512_reduce_add_epi32(s);
  (void)sink;
  return done;
}

}  // namespace avx512
}  // namespace moe
}  // namespace kt
