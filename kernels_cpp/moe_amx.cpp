// AMX tile kernel (TDPBSSD) for prefill. Each half of a 2048-byte tile pair IS an AMX B tile
// (16 K-groups of 4 bytes x 16 output rows, stride 64), so INT8 tiles are loaded in place; INT4
// halves are unpacked to two int8 tiles ((b&0x0F)<<4 for K 0..63, b&0xF0 for K 64..127).
// A tiles are 16 token rows x 64 K-bytes of the activation block (row-major or, for prefill, the
// contiguous panel layout); C tiles are 16 tokens x 16 rows int32. INT4 groups are unpacked once
// per call into a per-thread buffer (all of K) and reused by every 32-token block. Few tokens go
// to the AVX-512 kernel.
#include <immintrin.h>

#include <cstdlib>
#include <cstring>
#include <new>

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

// Tiles 0-3: C (16x16 int32); 4,5: A (16 x 64 B); 6,7: B (16 x 64 B). Loaded on every call of
// dot_rowgroup (other code on this thread, oneDNN, may have changed the configuration); forward()
// loads it once per thread and parallel region (configure_thread) and calls dot_rowgroup_nocfg.
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

// Per-thread buffer for the unpacked INT4 row group (grows, never shrinks; threads are long-lived).
struct UnpackBuf {
  int8_t* p = nullptr;
  int64_t cap = 0;
  ~UnpackBuf() { std::free(p); }
  int8_t* get(int64_t bytes) {
    if (bytes > cap) {
      std::free(p);
      p = static_cast<int8_t*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
      if (!p) throw std::bad_alloc();
      cap = bytes;
    }
    return p;
  }
};

// Unpacks the INT4 32-row group r0 (all of k) into INT8 tile pairs: 64-K step s (s = k0/64) at
// dst + s*2048, rows 0-15 then 16-31, the layout of an INT8 group; element value nibble*16.
void unpack_int4_group(const uint8_t* w, int64_t n, int64_t k, int64_t r0, int8_t* dst) {
  const __m512i f0 = _mm512_set1_epi8(static_cast<char>(0xF0));
  for (int64_t kb = 0; kb < k; kb += K_BLOCK) {
    const int64_t kbs = (k - kb) < K_BLOCK ? (k - kb) : K_BLOCK;
    const uint8_t* chunk = w + chunk_offset(Method::Int4, n, k, r0, kb);
    for (int64_t p = 0; p < kbs / 128; ++p) {
      const uint8_t* tp = chunk + p * TILE_PAIR_BYTES;
      int8_t* lo = dst + (kb + p * 128) / 64 * TILE_PAIR_BYTES;  // K k0..k0+63: low nibbles
      int8_t* hi = lo + TILE_PAIR_BYTES;                          // K k0+64..k0+127: high nibbles
      for (int j = 0; j < 32; ++j) {  // 32 rows of 64 bytes: both halves
        const __m512i b = _mm512_loadu_si512(tp + j * 64);
        _mm512_store_si512(lo + j * 64, _mm512_and_si512(_mm512_slli_epi16(b, 4), f0));
        _mm512_store_si512(hi + j * 64, _mm512_and_si512(b, f0));
      }
    }
  }
  // GCC's tileloadd asm has no memory input: without this barrier the unpack stores above may be
  // sunk past the tile loads or dropped as dead.
  __asm__ volatile("" : : "r"(dst) : "memory");
}

// B of 64-K step s: INT8 straight from the packed matrix; INT4 from the unpacked group.
template <bool INT4>
void run(const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, ALayout la, int64_t m,
         int32_t* out) {
  static thread_local UnpackBuf ubuf;
  const int8_t* ub = nullptr;
  if constexpr (INT4) {
    int8_t* d = ubuf.get(32 * k);
    unpack_int4_group(w, n, k, r0, d);
    ub = d;
  }
  alignas(64) int32_t c[32 * 32];
  const int64_t mp = (m + 15) / 16 * 16;
  for (int64_t mb = 0; mb < mp; mb += 32) {
    const bool two = mp - mb >= 32;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kb = 0; kb < k; kb += K_BLOCK) {
      const int64_t kbs = (k - kb) < K_BLOCK ? (k - kb) : K_BLOCK;
      const uint8_t* chunk = INT4 ? nullptr : w + chunk_offset(Method::Int8, n, k, r0, kb);
      for (int64_t p = 0; p < kbs / 64; ++p) {
        const int64_t k0 = kb + p * 64;
        const void* bp = INT4 ? static_cast<const void*>(ub + k0 / 64 * TILE_PAIR_BYTES)
                              : static_cast<const void*>(chunk + p * TILE_PAIR_BYTES);
        _tile_loadd(6, bp, 64);
        _tile_loadd(7, static_cast<const uint8_t*>(bp) + 1024, 64);
        _tile_loadd(4, la.at(a, mb, k0), la.rs);
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        if (two) {
          _tile_loadd(5, la.at(a, mb + 16, k0), la.rs);
          _tile_dpbssd(2, 5, 6);
          _tile_dpbssd(3, 5, 7);
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

void configure_thread() { configure_tiles(); }

void dot_rowgroup(Method method, const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, ALayout la,
                  const int32_t* asum, int64_t m, int32_t* out) {
  if (m < min_tokens()) return avx512::dot_rowgroup(method, w, n, k, r0, a, la, asum, m, out);
  configure_tiles();
  dot_rowgroup_nocfg(method, w, n, k, r0, a, la, asum, m, out);
}

void dot_rowgroup_nocfg(Method method, const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a,
                        ALayout la, const int32_t* asum, int64_t m, int32_t* out) {
  if (m < min_tokens()) return avx512::dot_rowgroup(method, w, n, k, r0, a, la, asum, m, out);
  if (method == Method::Int4)
    run<true>(w, n, k, r0, a, la, m, out);
  else
    run<false>(w, n, k, r0, a, la, m, out);
}

}  // namespace amx
}  // namespace moe
}  // namespace kt
