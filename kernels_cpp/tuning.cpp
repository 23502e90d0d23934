#include "tuning.hpp"

#include <cstdlib>

namespace kt {

Tuning::Tuning() {
  if (const char* v = std::getenv("KT_MOE_SPIN_US")) {
    const long us = std::strtol(v, nullptr, 10);
    spin_us.store(us < 0 ? 0 : us, std::memory_order_relaxed);
  }
}

Tuning& tuning() {
  static Tuning knobs;
  return knobs;
}

}  // namespace kt
