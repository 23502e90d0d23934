// CPU feature detection (CPUID + OS support) and the ISA levels kernels dispatch on.
#pragma once
#include <string>

namespace kt {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false, bmi2 = false;
  bool avx_vnni = false;  // VEX VPDPBUSD on ymm (AVX-VNNI)
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false, avx512bf16 = false;
  bool amx_tile = false, amx_int8 = false, amx_bf16 = false;
  bool os_avx512 = false;  // XCR0 enables ZMM state
  bool amx_usable = false; // CPU has AMX and the kernel granted tile data permission
};

// Detected once; AMX permission is requested from the kernel on first use.
const CpuFeatures& cpu_features();

// Ordered ISA levels; a kernel for level L runs on any CPU whose best level is >= L.
enum class Isa { Portable = 0, Avx2 = 1, Avx512 = 2, Amx = 3 };

Isa best_isa();
Isa parse_isa(const std::string& name);  // "auto", "portable", "avx2", "avx512", "amx"
const char* isa_name(Isa isa);
// Resolves "auto" to the best level; throws std::invalid_argument if the CPU lacks `name`.
Isa resolve_isa(const std::string& name);

}  // namespace kt
