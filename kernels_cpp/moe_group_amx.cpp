// AMX kernels of the group-wise INT4 engine (moe_group.hpp): the group sums of 16 activation rows and the GEMM
// of 16 or more (fewer go to the AVX-512 kernels). The 32 weight rows of the call are unpacked once into AMX B
// tiles (VNNI order: 4 columns of 16 rows per 64-byte tile row, the stored u = q + 8 as unsigned bytes) and, for
// the group sums, kept for the next call that says same_rows (group_product asks for 16 activation rows at a
// time); per group TDPBSUD (A s8 x B u8) sums into C tiles from zero, and the offset is taken out:
// Σ(u - 8)·a = Σu·a - 8·Σa.
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

namespace {

// Tiles 0-3: C (16 x 16 int32: tokens 0-15 / 16-31 x rows 0-15 / 16-31); 4,5: A (16 x gk bytes); 6,7: B.
void configure_gemm(int gk) {
  amx_tiles::TileConfig cfg;
  for (int t = 0; t < 4; ++t) cfg.set(t, 16, 64);
  cfg.set(4, 16, gk);
  cfg.set(5, 16, gk);
  cfg.set(6, gk / 4, 64);
  cfg.set(7, gk / 4, 64);
  amx_tiles::load(cfg);
}

}  // namespace

// 32 tokens at a time (two A tiles; 16 when fewer are left) against the 32 rows unpacked once per call (two B
// tiles): per group the C tiles sum Σu·a from zero, are stored, and each token's sums less 8·Σa enter
// P = (((0 + float(sum_0) · s_0) + float(sum_1) · s_1) + ...) in group order with explicit rounding (AVX-512, as
// avx512::group_scale). Rows past m (up to a multiple of 16) are read and dropped.
void group_gemm(const uint8_t* w, const uint16_t* st, int64_t k, int64_t group, int64_t r0, const int8_t* a,
                int64_t lda, const int8_t* split, const int32_t* corr, int64_t m, float* P) {
  if (m < 16 || m < tuning().amx_min_tokens.load(std::memory_order_relaxed))
    return avx512::group_gemm(w, st, k, group, r0, a, lda, split, corr, m, P);
  constexpr int kRnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const int64_t G = k / group;
  const int gk = group < 64 ? static_cast<int>(group) : 64;
  const uint8_t* b = unpack(w, k, r0, false);
  __asm__ volatile("" : : "r"(b) : "memory");  // the unpack's stores feed tile loads (GCC's tileloadd reads no memory)
  static thread_local std::vector<float> sf;  // the rows' scales as float, [G][32]
  sf.resize(static_cast<size_t>(G * 32));
  const uint16_t* sr = st + (r0 / 32) * G * 32;
  for (int64_t e = 0; e < G * 32; e += 16) {  // bf16 -> float, exact
    const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sr + e)));
    _mm512_storeu_ps(sf.data() + e, _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16)));
  }
  configure_gemm(gk);
  alignas(64) int32_t c[4][16 * 16];
  const int64_t mp = (m + 15) / 16 * 16;
  // the next 32 rows (the caller's next call on this matrix, or another thread's) into L2 meanwhile, spread over
  // the groups (a prefetch past the matrix's end does not fault)
  const char* next = reinterpret_cast<const char*>(w + (r0 + 32) * (k / 2));
  int64_t next_lines = 32 * k / 2 / 64;
  const int64_t per = (next_lines + G * ((mp + 31) / 32) - 1) / (G * ((mp + 31) / 32));
  for (int64_t i0 = 0; i0 < mp; i0 += 32) {
    const bool two = mp - i0 >= 32;
    const int64_t i1 = i0 + 32 < m ? i0 + 32 : m;  // rows of P written
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t l = 0; l < per && next_lines > 0; ++l, --next_lines, next += 64) _mm_prefetch(next, _MM_HINT_T1);
      _tile_zero(0);
      _tile_zero(1);
      if (two) {
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t cc = g * group; cc < (g + 1) * group; cc += gk) {
        const uint8_t* blk = b + (cc / 64) * 2 * 1024 + ((cc % 64) / 4) * 64;
        _tile_loadd(6, blk, 64);
        _tile_loadd(7, blk + 1024, 64);
        _tile_loadd(4, a + i0 * lda + cc, lda);
        _tile_dpbsud(0, 4, 6);
        _tile_dpbsud(1, 4, 7);
        if (two) {
          _tile_loadd(5, a + (i0 + 16) * lda + cc, lda);
          _tile_dpbsud(2, 5, 6);
          _tile_dpbsud(3, 5, 7);
        }
      }
      _tile_stored(0, c[0], 64);
      _tile_stored(1, c[1], 64);
      if (two) {
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
      }
      __asm__ volatile("" : : "r"(&c[0][0]) : "memory");  // the tile stores feed the loads below
      const __m512 s0 = _mm512_loadu_ps(sf.data() + g * 32), s1 = _mm512_loadu_ps(sf.data() + g * 32 + 16);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t blk = (i - i0) / 16, row = (i - i0) % 16;
        const __m512i cr = _mm512_set1_epi32(corr[i * G + g]);
        const __m512 v0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(c[2 * blk] + row * 16), cr));
        const __m512 v1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(c[2 * blk + 1] + row * 16), cr));
        float* p = P + i * 32;
        const __m512 p0 = g == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(p);
        const __m512 p1 = g == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(p + 16);
        _mm512_storeu_ps(p, _mm512_add_round_ps(p0, _mm512_mul_round_ps(v0, s0, kRnd), kRnd));
        _mm512_storeu_ps(p + 16, _mm512_add_round_ps(p1, _mm512_mul_round_ps(v1, s1, kRnd), kRnd));
      }
    }
  }
}

}  // namespace amx
}  // namespace moe
}  // namespace kt
