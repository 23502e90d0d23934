// AMX tile kernel (TDPBSSD) for prefill. Each half of a 2048-byte tile pair IS an AMX B tile
// (16 K-groups of 4 bytes x 16 output rows, stride 64), so INT8 tiles are loaded in place; INT4
// halves are unpacked to two int8 tiles ((b&0x0F)<<4 for K 0..63, b&0xF0 for K 64..127).
// A tiles are 16 token rows x 64 K-bytes of the activation block (row-major or, for prefill, the
// contiguous panel layout); C tiles are 16 tokens x 16 rows int32. INT4 groups are unpacked once
// per call into a per-thread buffer (all of K) and reused by every 32-token block. Few tokens go
// to the AVX-512 kernel.
#include <immintrin.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>

#include "moe.hpp"
#include "tuning.hpp"

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
  // Not _tile_loadconfig: GCC 12's version declares only the first 8 bytes as read, so the
  // compiler drops the rows/colsb stores and the tiles stay unconfigured (tile ops then #UD).
  __asm__ volatile("ldtilecfg %0" ::"m"(cfg));
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

// Copies the INT8 32-row group r0 (all of k) into dst in kernel order: 64-K step s at dst + s*2048
// (each K-block chunk of the group is kbs*32 contiguous bytes, already in tile-pair order).
void copy_int8_group(const uint8_t* w, int64_t n, int64_t k, int64_t r0, int8_t* dst) {
  for (int64_t kb = 0; kb < k; kb += K_BLOCK) {
    const int64_t kbs = (k - kb) < K_BLOCK ? (k - kb) : K_BLOCK;
    const uint8_t* chunk = w + chunk_offset(Method::Int8, n, k, r0, kb);
    int8_t* d = dst + kb / 64 * TILE_PAIR_BYTES;
    const int64_t bytes = kbs * 32;
    for (int64_t o = 0; o < bytes; o += 256) {
      const __m512i v0 = _mm512_loadu_si512(chunk + o);
      const __m512i v1 = _mm512_loadu_si512(chunk + o + 64);
      const __m512i v2 = _mm512_loadu_si512(chunk + o + 128);
      const __m512i v3 = _mm512_loadu_si512(chunk + o + 192);
      _mm512_store_si512(d + o, v0);
      _mm512_store_si512(d + o + 64, v1);
      _mm512_store_si512(d + o + 128, v2);
      _mm512_store_si512(d + o + 192, v3);
    }
  }
  __asm__ volatile("" : : "r"(dst) : "memory");  // stores feed tile loads (see unpack_int4_group)
}

// Tile pairs (64-K steps) the INT8 software prefetch runs ahead of the tile loads.
constexpr int64_t kPrefetchSteps = 8;

// B of 64-K step s: INT8 straight from the packed matrix (MODE 0; 1: with software prefetch of
// step s+kPrefetchSteps in every token block; 3: in the first token block only) or copied once
// per call into the per-thread buffer (MODE 2); INT4 from the unpacked group. The int32 sums do
// not depend on the mode.
template <bool INT4, int MODE>
void run(const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, ALayout la, int64_t m,
         int32_t* out) {
  static thread_local UnpackBuf ubuf;
  constexpr bool BUF = INT4 || MODE == 2;
  constexpr bool PF = !INT4 && (MODE == 1 || MODE == 3);
  const int8_t* ub = nullptr;
  if constexpr (INT4) {
    int8_t* d = ubuf.get(32 * k);
    unpack_int4_group(w, n, k, r0, d);
    ub = d;
  } else if constexpr (BUF) {
    int8_t* d = ubuf.get(32 * k);
    copy_int8_group(w, n, k, r0, d);
    ub = d;
  }
  const int64_t ns = k / 64;
  auto step_ptr = [&](int64_t s) -> const uint8_t* {
    const int64_t k0 = s * 64, kb = k0 / K_BLOCK * K_BLOCK;
    return w + chunk_offset(Method::Int8, n, k, r0, kb) + (k0 - kb) / 64 * TILE_PAIR_BYTES;
  };
  alignas(64) int32_t c[32 * 32];
  const int64_t mp = (m + 15) / 16 * 16;
  for (int64_t mb = 0; mb < mp; mb += 32) {
    const bool two = mp - mb >= 32;
    const bool pf = PF && (MODE == 1 || mb == 0);
    if (pf) {  // the first steps of the walk
      for (int64_t s = 0; s < (ns < kPrefetchSteps ? ns : kPrefetchSteps); ++s) {
        const char* q = reinterpret_cast<const char*>(step_ptr(s));
        for (int l = 0; l < 32; ++l) _mm_prefetch(q + l * 64, _MM_HINT_T0);
      }
    }
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kb = 0; kb < k; kb += K_BLOCK) {
      const int64_t kbs = (k - kb) < K_BLOCK ? (k - kb) : K_BLOCK;
      const uint8_t* chunk = BUF ? nullptr : w + chunk_offset(Method::Int8, n, k, r0, kb);
      for (int64_t p = 0; p < kbs / 64; ++p) {
        const int64_t k0 = kb + p * 64;
        if (pf && k0 / 64 + kPrefetchSteps < ns) {
          const char* q = reinterpret_cast<const char*>(step_ptr(k0 / 64 + kPrefetchSteps));
          for (int l = 0; l < 32; ++l) _mm_prefetch(q + l * 64, _MM_HINT_T0);
        }
        const void* bp = BUF ? static_cast<const void*>(ub + k0 / 64 * TILE_PAIR_BYTES)
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
  if (m < tuning().amx_min_tokens.load(std::memory_order_relaxed))
    return avx512::dot_rowgroup(method, w, n, k, r0, a, la, asum, m, out);
  configure_tiles();
  dot_rowgroup_nocfg(method, w, n, k, r0, a, la, asum, m, out);
}

void dot_rowgroup_nocfg(Method method, const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a,
                        ALayout la, const int32_t* asum, int64_t m, int32_t* out) {
  if (m < tuning().amx_min_tokens.load(std::memory_order_relaxed))
    return avx512::dot_rowgroup(method, w, n, k, r0, a, la, asum, m, out);
  if (method == Method::Int4) return run<true, 0>(w, n, k, r0, a, la, m, out);
  switch (tuning().amx_int8_mode.load(std::memory_order_relaxed)) {
    case 0: return run<false, 0>(w, n, k, r0, a, la, m, out);
    case 2: return run<false, 2>(w, n, k, r0, a, la, m, out);
    case 3: return run<false, 3>(w, n, k, r0, a, la, m, out);
    default: return run<false, 1>(w, n, k, r0, a, la, m, out);
  }
}

}  // namespace amx
}  // namespace moe
}  // namespace kt
