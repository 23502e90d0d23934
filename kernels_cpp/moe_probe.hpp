// Register-only loops of the benchmarks' scaling probe (kt_kernels._testing.probe): each runs on the calling
// thread for about `seconds` and returns how many instructions it issued (TDPBSSD: 16x16x64 int8 products;
// VPDPBUSD: 64).
#pragma once
#include <cstdint>

namespace kt {
namespace moe {
namespace amx {
int64_t tile_probe(double seconds);  // moe_probe_amx.cpp
}
namespace avx512 {
int64_t vnni_probe(double seconds);  // moe_probe_avx512.cpp
}
}  // namespace moe
}  // namespace kt
