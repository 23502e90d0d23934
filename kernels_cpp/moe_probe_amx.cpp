// Register-only AMX loop for the benchmarks' scaling probe (kt_kernels._testing.probe): TDPBSSD on four
// independent C tiles from tiles loaded once, so that no memory traffic and no dependency limits the rate.
// Its rate per thread, with 1 and with every core running it, separates the tile unit's own scaling from the
// engine's schedule and memory traffic.
#include <immintrin.h>

#include <chrono>

#include "amx_tile_config.hpp"
#include "moe_probe.hpp"

namespace kt {
namespace moe {
namespace amx {

int64_t tile_probe(double seconds) {
  amx_tiles::TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.set(i, 16, 64);
  amx_tiles::load(cfg);
  alignas(64) static const int8_t ones[16 * 64] = {1};
  _tile_loadd(4, ones, 64);
  _tile_loadd(5, ones, 64);
  _tile_loadd(6, ones, 64);
  _tile_loadd(7, ones, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  int64_t done = 0;
  const auto t0 = std::chrono::steady_clock::now();
  do {
    for (int i = 0; i < 256; ++i) {
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    }
    done += 1024;
  } while (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < seconds);
  alignas(64) int32_t sink[16 * 16];
  _tile_stored(0, sink, 64);
  __asm__ volatile("" : : "r"(sink) : "memory");
  return done;
}

}  // namespace amx
}  // namespace moe
}  // namespace kt
