// AMX tile kernel (TDPBSSD) for prefill. Each half of a 2048-byte tile pair IS an AMX B tile
// (16 K-groups of 4 bytes x 16 output rows, stride 64), so INT8 tiles are loaded in place; INT4
// halves are unpacked to two int8 tiles ((b&0x0F)<<4 for K 0..63, b&0xF0 for K 64..127).
// A tiles are 16 token rows x 64 K-bytes of the (zero-padded) activation block; C tiles are
// 16 tokens x 16 rows int32. Few tokens go to the AVX-512 kernel.
#include <immintrin.h>

#include <cstring>

#include "moe.hpp"

namespace kt {
namespace moe {
namespace amx {
namespace {


struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-3: C (16x16 int32); 4,5: A (16 x 64 B); 6,7: B (16 x 64 B). Loaded on every call:
// other code on this thread (oneDNN) may have changed the configuration.
inline void configure_tiles() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  _tile_loadconfig(&cfg);
}

template <bool INT4>
void run(const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, int64_t lda, int64_t m,
         int32_t* out) {
  constexpr int64_t KSTEP = INT4 ? 128 : 64;
  const Method method = INT4 ? Method::Int4 : Method::Int8;
  configure_tiles();
  alignas(64) int32_t c[32 * 32];
  alignas(64) int8_t unpacked[4][1024];  // lo half0, lo half1, hi half0, hi half1
  const __m512i f0 = _mm512_set1_epi8(static_cast<char>(0xF0));
  const int64_t mp = (m + 15) / 16 * 16;
  for (int64_t mb = 0; mb < mp; mb += 32) {
    const bool two = mp - mb >= 32;
    const int8_t* a0 = a + mb * lda;
    const int8_t* a1 = a0 + 16 * lda;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kb = 0; kb < k; kb += K_BLOCK) {
      const int64_t kbs = (k - kb) < K_BLOCK ? (k - kb) : K_BLOCK;
      const uint8_t* chunk = w + chunk_offset(method, n, k, r0, kb);
      for (int64_t p = 0; p < kbs / KSTEP; ++p) {
        const uint8_t* tp = chunk + p * TILE_PAIR_BYTES;
        const int64_t k0 = kb + p * KSTEP;
        if constexpr (INT4) {
          for (int h = 0; h < 2; ++h)
            for (int j = 0; j < 16; ++j) {
              const __m512i b = _mm512_loadu_si512(tp + h * 1024 + j * 64);
              _mm512_store_si512(unpacked[h] + j * 64, _mm512_and_si512(_mm512_slli_epi16(b, 4), f0));
              _mm512_store_si512(unpacked[2 + h] + j * 64, _mm512_and_si512(b, f0));
            }
          // GCC's tileloadd asm has no memory input: without this barrier the unpack stores above
          // may be sunk past the tile loads or dropped as dead.
          __asm__ volatile("" : : "r"(&unpacked[0][0]) : "memory");
          for (int s = 0; s < 2; ++s) {
            _tile_loadd(6, unpacked[2 * s], 64);
            _tile_loadd(7, unpacked[2 * s + 1], 64);
            _tile_loadd(4, a0 + k0 + 64 * s, lda);
            _tile_dpbssd(0, 4, 6);
            _tile_dpbssd(1, 4, 7);
            if (two) {
              _tile_loadd(5, a1 + k0 + 64 * s, lda);
              _tile_dpbssd(2, 5, 6);
              _tile_dpbssd(3, 5, 7);
            }
          }
        } else {
          _tile_loadd(6, tp, 64);
          _tile_loadd(7, tp + 1024, 64);
          _tile_loadd(4, a0 + k0, lda);
          _tile_dpbssd(0, 4, 6);
          _tile_dpbssd(1, 4, 7);
          if (two) {
            _tile_loadd(5, a1 + k0, lda);
            _tile_dpbssd(2, 5, 6);
            _tile_dpbssd(3, 5, 7);
          }
        }
      }
    }
    _tile_stored(0, c, 128);
    _tile_stored(1, c + 16, 128);
    if (two) {
      _tile_stored(2, c + 16 * 32, 128);
      _tile_stored(3, c + 16 * 32 + 16, 128);
    }
    __asm__ volatile("" : : "r"(c) : "memory");
    const int64_t rows = (m - mb) < 32 ? (m - mb) : 32;
    std::memcpy(out + mb * 32, c, rows * 32 * sizeof(int32_t));
  }
}

}  // namespace

void dot_rowgroup(Method method, const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, int64_t lda,
                  const int32_t* asum, int64_t m, int32_t* out) {
  if (m < min_tokens()) return avx512::dot_rowgroup(method, w, n, k, r0, a, lda, asum, m, out);
  if (method == Method::Int4)
    run<true>(w, n, k, r0, a, lda, m, out);
  else
    run<false>(w, n, k, r0, a, lda, m, out);
}

}  // namespace amx
}  // namespace moe
}  // namespace kt
