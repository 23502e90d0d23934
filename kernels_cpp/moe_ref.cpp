// Portable reference dot kernel: walks the tiled layout of kt_format.md §2 element by element.
// This is the definition the SIMD kernels are tested against (exact int32 equality).
#include "moe.hpp"

namespace kt {
namespace moe {
namespace ref {

void dot_rowgroup(Method method, const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, ALayout la,
                  const int32_t* /*asum*/, int64_t m, int32_t* out) {
  const bool int4 = method == Method::Int4;
  const int64_t kstep = int4 ? 128 : 64;  // K elements per 2048-byte tile pair
  for (int64_t i = 0; i < m * 32; ++i) out[i] = 0;
  for (int64_t kb = 0; kb < k; kb += K_BLOCK) {
    const int64_t kbs = (k - kb) < K_BLOCK ? (k - kb) : K_BLOCK;
    const uint8_t* chunk = w + chunk_offset(method, n, k, r0, kb);
    for (int64_t ks = 0; ks < kbs; ks += kstep) {
      const uint8_t* tp = chunk + (ks / kstep) * TILE_PAIR_BYTES;
      for (int64_t i = 0; i < m; ++i) {
        const int8_t* ai = la.at(a, i, kb + ks);            // columns kb+ks .. +63
        const int8_t* ai_hi = int4 ? la.at(a, i, kb + ks + 64) : ai;  // INT4: columns +64 .. +127
        int32_t* o = out + i * 32;
        for (int row = 0; row < 32; ++row) {
          const uint8_t* rb = tp + (row / 16) * 1024 + (row % 16) * 4;
          int32_t s = 0;
          for (int c = 0; c < 64; ++c) {  // byte column c of this row inside the tile pair
            const uint8_t b = rb[(c / 4) * 64 + (c % 4)];
            if (int4) {
              const int32_t lo = static_cast<int8_t>(static_cast<uint8_t>(b << 4));  // element ks+c, *16
              const int32_t hi = static_cast<int8_t>(b & 0xF0);                      // element ks+64+c, *16
              s += lo * ai[c] + hi * ai_hi[c];
            } else {
              s += static_cast<int8_t>(b) * ai[c];
            }
          }
          o[row] += s;
        }
      }
    }
  }
}

}  // namespace ref
}  // namespace moe
}  // namespace kt
