// AMX tile configuration (palette 1) and its load; included only by translation units built with
// -mamx-tile (moe_amx.cpp, moe_group_amx.cpp).
#pragma once

#include <cstdint>
#include <cstring>

namespace kt {
namespace amx_tiles {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];

  TileConfig() {
    std::memset(this, 0, sizeof(*this));
    palette_id = 1;
  }
  void set(int tile, int num_rows, int bytes_per_row) {
    rows[tile] = static_cast<uint8_t>(num_rows);
    colsb[tile] = static_cast<uint16_t>(bytes_per_row);
  }
};

// Not _tile_loadconfig: GCC 12's version declares only the first 8 bytes as read, so the compiler
// drops the rows/colsb stores and the tiles stay unconfigured (tile ops then #UD).
inline void load(const TileConfig& cfg) { __asm__ volatile("ldtilecfg %0" ::"m"(cfg)); }

}  // namespace amx_tiles
}  // namespace kt
