#include "cpu_features.hpp"

#include <cpuid.h>
#include <stdexcept>
#include <sys/syscall.h>
#include <unistd.h>

namespace kt {
namespace {

unsigned long long xgetbv0() {
  unsigned int eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

// Linux gates AMX tile data behind arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
bool request_amx_permission() {
  constexpr int ARCH_REQ_XCOMP_PERM = 0x1023;
  constexpr int XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  f.fma = c & (1u << 12);
  f.f16c = c & (1u << 29);
  if (!osxsave) return f;
  const unsigned long long xcr0 = xgetbv0();
  const bool os_avx = (xcr0 & 0x6) == 0x6;
  f.os_avx512 = os_avx && (xcr0 & 0xE0) == 0xE0;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = os_avx && (b & (1u << 5));
  f.bmi2 = b & (1u << 8);
  f.avx512f = f.os_avx512 && (b & (1u << 16));
  f.avx512dq = f.os_avx512 && (b & (1u << 17));
  f.avx512bw = f.os_avx512 && (b & (1u << 30));
  f.avx512vl = f.os_avx512 && (b & (1u << 31));
  f.avx512vnni = f.os_avx512 && (c & (1u << 11));
  f.amx_bf16 = d & (1u << 22);
  f.amx_tile = d & (1u << 24);
  f.amx_int8 = d & (1u << 25);
  __cpuid_count(7, 1, a, b, c, d);
  f.avx_vnni = os_avx && (a & (1u << 4));
  f.avx512bf16 = f.os_avx512 && (a & (1u << 5));
  const bool os_amx = (xcr0 & (3ull << 17)) == (3ull << 17);
  f.amx_usable = f.amx_tile && f.amx_int8 && f.avx512bw && os_amx && request_amx_permission();
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

Isa best_isa() {
  const CpuFeatures& f = cpu_features();
  // What CMakeLists.txt lets the compiler use in *_avx2.cpp; every higher level includes it.
  const bool avx2 = f.avx2 && f.fma && f.f16c && f.bmi2;
  const bool avx512 = avx2 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq;
  if (avx512 && f.amx_usable) return Isa::Amx;
  if (avx512) return Isa::Avx512;
  if (avx2) return Isa::Avx2;
  return Isa::Portable;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Portable: return "portable";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::Amx: return "amx";
  }
  return "?";
}

Isa parse_isa(const std::string& name) {
  if (name == "portable") return Isa::Portable;
  if (name == "avx2") return Isa::Avx2;
  if (name == "avx512") return Isa::Avx512;
  if (name == "amx") return Isa::Amx;
  throw std::invalid_argument("unknown ISA '" + name + "' (expected auto, portable, avx2, avx512 or amx)");
}

Isa resolve_isa(const std::string& name) {
  if (name == "auto" || name.empty()) return best_isa();
  const Isa want = parse_isa(name);
  if (static_cast<int>(want) > static_cast<int>(best_isa()))
    throw std::invalid_argument(std::string("this CPU cannot run ISA '") + name + "' (best available: " +
                                isa_name(best_isa()) + ")");
  return want;
}

}  // namespace kt
