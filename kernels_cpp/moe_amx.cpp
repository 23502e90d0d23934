// AMX tile kernel (TDPBSSD) for prefill. Each half of a 2048-byte tile pair IS an AMX B tile
// (16 K-groups of 4 bytes x 16 output rows, stride 64), so INT8 tiles can be loaded in place; INT4
// halves are unpacked to two int8 tiles ((b&0x0F)<<4 for K 0..63, b&0xF0 for K 64..127).
// A tiles are 16 token rows x 64 K-bytes of the activation block (row-major or, for prefill, the
// contiguous panel layout); C tiles are 16 tokens x 16 rows int32, 2 A x 2 B -> 4 C per 64-K step.
// Loop order: K chunks outside, 32-token blocks inside, so that a chunk of B (unpacked once per
// call) stays in L1 while every token block uses it; the C tiles are stored after each chunk and
// loaded for the next. Few tokens go to the AVX-512 kernel.
#include <immintrin.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>

#include "amx_tile_config.hpp"
#include "moe.hpp"
#include "tuning.hpp"

namespace kt {
namespace moe {
namespace amx {
namespace {

// Tiles 0-3: C (16x16 int32); 4,5: A (16 x 64 B); 6,7: B (16 x 64 B). Loaded on every call of
// dot_rowgroup (other code on this thread, oneDNN, may have changed the configuration); forward()
// loads it once per thread and parallel region (configure_thread) and calls dot_rowgroup_nocfg.
inline void configure_tiles() {
  amx_tiles::TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.set(i, 16, 64);
  amx_tiles::load(cfg);
}

// Per-thread buffer (grows, never shrinks; threads are long-lived).
template <typename T>
struct ThreadBuf {
  T* p = nullptr;
  int64_t cap = 0;
  ~ThreadBuf() { std::free(p); }
  T* get(int64_t n) {
    if (n > cap) {
      std::free(p);
      p = static_cast<T*>(std::aligned_alloc(64, (n * static_cast<int64_t>(sizeof(T)) + 63) / 64 * 64));
      if (!p) {
        cap = 0;
        throw std::bad_alloc();
      }
      cap = n;
    }
    return p;
  }
};

// Unpacks the first `pairs` INT4 tile pairs (128 K each) at src into INT8 tile pairs in kernel
// order: 64-K step 2p (low nibbles, K 0..63 of pair p) and 2p+1 (high nibbles) at dst + step*2048,
// rows 0-15 then 16-31; element value nibble*16.
void unpack_int4(const uint8_t* src, int64_t pairs, int8_t* dst) {
  const __m512i f0 = _mm512_set1_epi8(static_cast<char>(0xF0));
  for (int64_t p = 0; p < pairs; ++p) {
    const uint8_t* tp = src + p * TILE_PAIR_BYTES;
    int8_t* lo = dst + p * 2 * TILE_PAIR_BYTES;
    int8_t* hi = lo + TILE_PAIR_BYTES;
    for (int j = 0; j < 32; ++j) {  // 32 rows of 64 bytes: both halves
      const __m512i b = _mm512_loadu_si512(tp + j * 64);
      _mm512_store_si512(lo + j * 64, _mm512_and_si512(_mm512_slli_epi16(b, 4), f0));
      _mm512_store_si512(hi + j * 64, _mm512_and_si512(b, f0));
    }
  }
  // GCC's tileloadd asm has no memory input: without this barrier the unpack stores above may be
  // sunk past the tile loads or dropped as dead.
  __asm__ volatile("" : : "r"(dst) : "memory");
}

// Copies `bytes` (a multiple of 256) of INT8 tile pairs into dst (same order).
void copy_int8(const uint8_t* src, int64_t bytes, int8_t* dst) {
  for (int64_t o = 0; o < bytes; o += 256) {
    const __m512i v0 = _mm512_loadu_si512(src + o);
    const __m512i v1 = _mm512_loadu_si512(src + o + 64);
    const __m512i v2 = _mm512_loadu_si512(src + o + 128);
    const __m512i v3 = _mm512_loadu_si512(src + o + 192);
    _mm512_store_si512(dst + o, v0);
    _mm512_store_si512(dst + o + 64, v1);
    _mm512_store_si512(dst + o + 128, v2);
    _mm512_store_si512(dst + o + 192, v3);
  }
  __asm__ volatile("" : : "r"(dst) : "memory");  // stores feed tile loads (see unpack_int4)
}

// Software prefetch, spread over the k-steps of the work it overlaps (a burst would fill the load
// buffers and stall the tile instructions behind it): `per` lines a step. Two streams: the next
// chunk of B (restarted every chunk, hint HB) and bytes the schedule named for this call (rows of A
// it reads next, hint_next_rows; spread over the whole call, into L2).
template <int HB>
struct Prefetcher {
  struct Stream {
    const char* p = nullptr;
    int64_t lines = 0, per = 0;
    void start(const void* q, int64_t bytes, int64_t steps) {
      p = static_cast<const char*>(q);
      lines = q ? bytes / 64 : 0;
      per = steps > 0 ? (lines + steps - 1) / steps : lines;
    }
  } b, a;
  inline void step() {
    for (int64_t i = 0; i < b.per && b.lines > 0; ++i, --b.lines, b.p += 64)
      _mm_prefetch(b.p, static_cast<_mm_hint>(HB));
    for (int64_t i = 0; i < a.per && a.lines > 0; ++i, --a.lines, a.p += 64) _mm_prefetch(a.p, _MM_HINT_T1);
  }
};

// One K chunk (steps 64-K steps of B at b, A columns from k0) for 32 (two) or 16 token rows from
// row mb: C tiles 0-3 are zeroed (first), loaded from c0 / c1 (rows mb.. / mb+16.., stride 32
// int32; load) or kept from the last chunk (neither: one token block), accumulated, and stored
// back (store).
template <class PF>
inline void chunk_block(const int8_t* b, int64_t steps, const int8_t* a, ALayout la, int64_t mb, int64_t k0, bool two,
                        bool first, bool load, bool store, int32_t* c0, int32_t* c1, PF& pf) {
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    if (two) {
      _tile_zero(2);
      _tile_zero(3);
    }
  } else if (load) {
    _tile_loadd(0, c0, 128);
    _tile_loadd(1, c0 + 16, 128);
    if (two) {
      _tile_loadd(2, c1, 128);
      _tile_loadd(3, c1 + 16, 128);
    }
  }
  const int8_t* a0 = la.at(a, mb, k0);
  if (two) {
    const int8_t* a1 = la.at(a, mb + 16, k0);
    for (int64_t s = 0; s < steps; ++s) {
      const int8_t* bp = b + s * TILE_PAIR_BYTES;
      _tile_loadd(6, bp, 64);
      _tile_loadd(7, bp + 1024, 64);
      _tile_loadd(4, a0 + s * la.ks, la.rs);
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      _tile_loadd(5, a1 + s * la.ks, la.rs);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
      pf.step();
    }
  } else {
    for (int64_t s = 0; s < steps; ++s) {
      const int8_t* bp = b + s * TILE_PAIR_BYTES;
      _tile_loadd(6, bp, 64);
      _tile_loadd(7, bp + 1024, 64);
      _tile_loadd(4, a0 + s * la.ks, la.rs);
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      pf.step();
    }
  }
  if (!store) return;
  _tile_stored(0, c0, 128);
  _tile_stored(1, c0 + 16, 128);
  if (two) {
    _tile_stored(2, c1, 128);
    _tile_stored(3, c1 + 16, 128);
  }
}

// What the calling thread multiplies next (hint_next_group, hint_next_rows), taken by the next call.
struct NextGroup {
  const uint8_t* w = nullptr;
  int64_t n = 0, k = 0, r0 = 0;
};
struct NextRows {
  const void* p = nullptr;
  int64_t bytes = 0;
};
thread_local NextGroup t_next;
thread_local NextRows t_next_rows;

// The K chunks of a 32-row group: K-block by K-block, kc K per chunk (the last of a K-block
// shorter); chunk j covers K kb + c .. kb + c + kn.
struct Chunks {
  int64_t k, kc, per_full, nfull, count;
  Chunks(int64_t k_, int64_t kc_) : k(k_), kc(kc_) {
    per_full = (K_BLOCK + kc - 1) / kc;
    nfull = k / K_BLOCK;
    const int64_t rest = k - nfull * K_BLOCK;
    count = nfull * per_full + (rest + kc - 1) / kc;
  }
  void at(int64_t j, int64_t* kb, int64_t* c, int64_t* kn) const {
    const int64_t blk = j < nfull * per_full ? j / per_full : nfull;
    *kb = blk * K_BLOCK;
    *c = (j - blk * per_full) * kc;
    const int64_t kbs = (k - *kb) < K_BLOCK ? (k - *kb) : K_BLOCK;
    *kn = (kbs - *c) < kc ? (kbs - *c) : kc;
  }
};

// The group's K runs in chunks of kc (tuning().amx_k_chunk, within K-blocks). Each chunk of B
// (32 rows x kc) is made ready once (INT4: unpacked into one of two per-thread buffers, which stay
// in L1; INT8: in place or copied, see MODE) and then used by every 32-token block of A, whose
// int32 sums are accumulated in out (C tiles stored after each chunk and loaded for the next; with
// one token block they stay in the tiles). The last 16-row block, when m % 16 != 0, accumulates in
// a per-thread side buffer (out has only m rows). With prefetch on, the packed bytes of the chunk
// tuning().amx_prefetch_chunks ahead (past the group's end: of the group named by hint_next_group,
// if any) are prefetched while the current one is multiplied, so that memory reads overlap the tile
// work; so are the bytes named by hint_next_rows (in any mode).
// MODE (INT8): 0 in place; 1 in place, prefetched; 2 copied; 3 copied, prefetched. INT4: 0 / 1
// without / with prefetch. The int32 sums do not depend on the mode or the chunk size.
template <bool INT4, int MODE>
void run(const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, ALayout la, int64_t m,
         int32_t* out) {
  static thread_local ThreadBuf<int8_t> bbuf;
  static thread_local ThreadBuf<int32_t> tail;
  constexpr bool COPY = INT4 || MODE >= 2;
  constexpr bool PF = MODE & 1;
  const Method method = INT4 ? Method::Int4 : Method::Int8;
  constexpr int64_t kPair = INT4 ? 128 : 64;      // K per packed tile pair
  constexpr int64_t kBytesPerK = INT4 ? 16 : 32;  // packed bytes per K of a 32-row group
  // auto: short chunks for few tokens (the weights stream from memory: more chunks to prefetch ahead
  // in), longer ones for many (each chunk's C tiles are stored and reloaded once per token block)
  int64_t kc = tuning().amx_k_chunk.load(std::memory_order_relaxed);
  kc = kc <= 0 ? (m <= 64 ? 256 : 512) : kc < 128 ? 128 : kc / 128 * 128;
  const int64_t dist = PF ? tuning().amx_prefetch_chunks.load(std::memory_order_relaxed) : 0;
  int8_t* buf = COPY ? bbuf.get(2 * 32 * kc) : nullptr;
  int32_t* tb = tail.get(16 * 32);
  const int64_t mfull = m / 16 * 16, mp = (m + 15) / 16 * 16, blocks = (mp + 31) / 32;
  auto cptr = [&](int64_t row) { return row < mfull ? out + row * 32 : tb; };
  const Chunks ch(k, kc);
  const NextGroup nx = t_next;
  t_next = NextGroup{};
  const Chunks chx(nx.w ? nx.k : k, kc);
  Prefetcher<COPY ? _MM_HINT_T1 : _MM_HINT_T0> pf;
  pf.a.start(t_next_rows.p, t_next_rows.bytes, blocks * (k / 64));
  t_next_rows = NextRows{};
  for (int64_t j = 0; j < ch.count; ++j) {
    int64_t kb, c, kn;
    ch.at(j, &kb, &c, &kn);
    const uint8_t* src = w + chunk_offset(method, n, k, r0, kb) + c / kPair * TILE_PAIR_BYTES;
    if (dist > 0) {  // chunk j + dist of this group, or of the next group
      const int64_t jq = j + dist;
      const uint8_t* q = nullptr;
      int64_t qb = 0, qc = 0, qn = 0;
      if (jq < ch.count) {
        ch.at(jq, &qb, &qc, &qn);
        q = w + chunk_offset(method, n, k, r0, qb) + qc / kPair * TILE_PAIR_BYTES;
      } else if (nx.w && jq - ch.count < chx.count) {
        chx.at(jq - ch.count, &qb, &qc, &qn);
        q = nx.w + chunk_offset(method, nx.n, nx.k, nx.r0, qb) + qc / kPair * TILE_PAIR_BYTES;
      }
      pf.b.start(q, qn * kBytesPerK, blocks * (kn / 64));
    }
    const int8_t* b;
    if constexpr (INT4) {
      int8_t* d = buf + (j & 1) * 32 * kc;  // two buffers: this chunk's unpack need not wait for the
      unpack_int4(src, kn / kPair, d);      // last chunk's tile loads
      b = d;
    } else if constexpr (COPY) {
      int8_t* d = buf + (j & 1) * 32 * kc;
      copy_int8(src, kn * 32, d);
      b = d;
    } else {
      b = reinterpret_cast<const int8_t*>(src);
    }
    // one token block (<= 32 rows): its C tiles stay in the tile registers from chunk to chunk
    const bool spill = blocks > 1;
    for (int64_t mb = 0; mb < mp; mb += 32) {
      const bool two = mp - mb >= 32;
      chunk_block(b, kn / 64, a, la, mb, kb + c, two, j == 0, spill, spill || j + 1 == ch.count, cptr(mb),
                  cptr(mb + 16), pf);
    }
  }
  __asm__ volatile("" : : "r"(tb), "r"(out) : "memory");  // tile stores feed the copy below
  if (mfull < m) std::memcpy(out + mfull * 32, tb, (m - mfull) * 32 * sizeof(int32_t));
}

}  // namespace

void configure_thread() { configure_tiles(); }

void hint_next_group(const uint8_t* w, int64_t n, int64_t k, int64_t r0) { t_next = NextGroup{w, n, k, r0}; }

void hint_next_rows(const void* p, int64_t bytes) { t_next_rows = NextRows{p, bytes}; }

void dot_rowgroup(Method method, const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a, ALayout la,
                  const int32_t* asum, int64_t m, int32_t* out) {
  if (m < tuning().amx_min_tokens.load(std::memory_order_relaxed)) {
    t_next = NextGroup{};
    t_next_rows = NextRows{};
    return avx512::dot_rowgroup(method, w, n, k, r0, a, la, asum, m, out);
  }
  configure_tiles();
  dot_rowgroup_nocfg(method, w, n, k, r0, a, la, asum, m, out);
}

void dot_rowgroup_nocfg(Method method, const uint8_t* w, int64_t n, int64_t k, int64_t r0, const int8_t* a,
                        ALayout la, const int32_t* asum, int64_t m, int32_t* out) {
  if (m < tuning().amx_min_tokens.load(std::memory_order_relaxed)) {
    t_next = NextGroup{};
    t_next_rows = NextRows{};
    return avx512::dot_rowgroup(method, w, n, k, r0, a, la, asum, m, out);
  }
  if (method == Method::Int4) {
    if (tuning().amx_int4_prefetch.load(std::memory_order_relaxed)) return run<true, 1>(w, n, k, r0, a, la, m, out);
    return run<true, 0>(w, n, k, r0, a, la, m, out);
  }
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
