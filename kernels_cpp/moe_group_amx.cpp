// AMX group-sum kernel of the group-wise INT4 engine (moe_group.hpp), for 16 activation rows (fewer go to the
// AVX-512 kernel). The 32 weight rows of the call are unpacked once into AMX B tiles (VNNI order: 4 columns
// of 16 rows per 64-byte tile row, the stored u = q + 8 as unsigned bytes) and kept for the next call that
// says same_rows (group_product asks for 16 activation rows at a time); per group TDPBSUD (A s8 x B u8)
// sums into two C tiles (rows 0-15, 16-31) from zero, and the offset is taken out: Σ(u - 8)·a = Σu·a - 8·Σa.
#include <immintrin.h>

#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "amx_tile_config.hpp"
#include "moe_group.hpp"
#include "tuning.hpp"

namespace kt {
namespace moe {
namespace amx {
namespace {

// Tiles 0,1: C (16 x 16 int32); 2: A (16 rows x gk bytes); 3,4: B (gk/4 rows x 64 bytes), gk = min(group, 64).
void configure(int gk) {
  amx_tiles::TileConfig cfg;
  cfg.set(0, 16, 64);
  cfg.set(1, 16, 64);
  cfg.set(2, 16, gk);
  cfg.set(3, gk / 4, 64);
  cfg.set(4, gk / 4, 64);
  amx_tiles::load(cfg);
}

struct Unpacked {  // the B tiles of the last rows this thread unpacked (valid for calls with same_rows)
  bool valid = false;
  uint8_t* b = nullptr;
  int64_t cap = 0;
  ~Unpacked() { std::free(b); }
};
thread_local Unpacked t_unpacked;

// B tile data: block (c / 64, half h) of 1024 bytes at ((c / 64) * 2 + h) * 1024; inside, tile row q holds
// columns c + 4q .. c + 4q + 3 of rows h*16 + 0..15, 4 bytes each.
const uint8_t* unpack(const uint8_t* w, int64_t k, int64_t r0, bool same_rows) {
  Unpacked& u = t_unpacked;
  if (same_rows && u.valid) return u.b;
  u.valid = false;
  const int64_t bytes = (k + 63) / 64 * 2048;  // whole 64-column blocks (k = 96: the last one half used)
  if (bytes > u.cap) {
    std::free(u.b);
    u.b = static_cast<uint8_t*>(std::aligned_alloc(64, bytes));
    u.cap = u.b ? bytes : 0;
    if (!u.b) throw std::bad_alloc();
  }
  alignas(64) uint8_t row[64];
  for (int n = 0; n < 32; ++n) {
    const uint8_t* src = w + (r0 + n) * (k / 2);
    for (int64_t c = 0; c < k; c += 64) {
      const __m512i w16 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + c / 2)));
      const __m512i v = _mm512_or_si512(_mm512_and_si512(w16, _mm512_set1_epi16(0x000F)),
                                        _mm512_and_si512(_mm512_slli_epi16(w16, 4), _mm512_set1_epi16(0x0F00)));
      _mm512_store_si512(row, v);
      uint8_t* blk = u.b + ((c / 64) * 2 + n / 16) * 1024 + (n % 16) * 4;
      const int64_t cols = (k - c) < 64 ? (k - c) : 64;
      for (int64_t q = 0; q < cols / 4; ++q) std::memcpy(blk + q * 64, row + q * 4, 4);
    }
  }
  u.valid = true;
  return u.b;
}

}  // namespace

void group_dot(const uint8_t* w, int64_t k, int64_t group, int64_t r0, const int8_t* a, int64_t lda,
               const int8_t* split, const int32_t* corr, int64_t m, int32_t* gsum, bool same_rows) {
  if (m < 16 || m < tuning().amx_min_tokens.load(std::memory_order_relaxed)) {
    t_unpacked.valid = false;
    return avx512::group_dot(w, k, group, r0, a, lda, split, corr, m, gsum, same_rows);
  }
  const int64_t G = k / group;
  const int gk = group < 64 ? static_cast<int>(group) : 64;
  const uint8_t* b = unpack(w, k, r0, same_rows);
  configure(gk);
  alignas(64) int32_t c0[16 * 16], c1[16 * 16];
  for (int64_t g = 0; g < G; ++g) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t c = g * group; c < (g + 1) * group; c += gk) {
      const uint8_t* blk = b + (c / 64) * 2 * 1024 + ((c % 64) / 4) * 64;
      _tile_loadd(2, a + c, lda);
      _tile_loadd(3, blk, 64);
      _tile_loadd(4, blk + 1024, 64);
      _tile_dpbsud(0, 2, 3);
      _tile_dpbsud(1, 2, 4);
    }
    _tile_stored(0, c0, 64);
    _tile_stored(1, c1, 64);
    for (int i = 0; i < 16; ++i) {
      int32_t s8 = 0;  // 8 · Σa over the group
      if (corr) {
        s8 = corr[i * G + g];
      } else {
        for (int64_t c = g * group; c < (g + 1) * group; ++c) s8 += a[i * lda + c];
        s8 *= 8;
      }
      int32_t* o = gsum + (i * G + g) * 32;
      for (int j = 0; j < 16; ++j) {
        o[j] = c0[i * 16 + j] - s8;
        o[16 + j] = c1[i * 16 + j] - s8;
      }
    }
  }
}

}  // namespace amx
}  // namespace moe
}  // namespace kt
