#include "tuning.hpp"

#include <cstdlib>
#include <limits>

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

const std::vector<Knob>& knob_table() {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  static const std::vector<Knob> table = {
      {"spin_us", &Tuning::spin_us, 0, kMax,
       "SpinPool: microseconds a worker spins after a call before it sleeps (KT_MOE_SPIN_US at start, default 2000); "
       "takes effect after the workers' current wait."},
      {"amx_min_tokens", &Tuning::amx_min_tokens, 1, kMax,
       "AMX: the smallest expert group (rows) sent to the tile kernels; smaller ones take the AVX-512 ones."},
      {"amx_int8_mode", &Tuning::amx_int8_mode, 0, 3,
       "AMX INT8: how the tile kernel reads each K chunk of B: 0 tiles loaded in place; 1 in place, the next chunk "
       "prefetched (default); 2 copied into a per-thread buffer (as INT4 is unpacked); 3 copied, the next chunk "
       "prefetched."},
      {"amx_int4_prefetch", &Tuning::amx_int4_prefetch, 0, 1,
       "AMX INT4: prefetch the next chunk of B while the current one is multiplied (1, default) or not (0)."},
      {"amx_k_chunk", &Tuning::amx_k_chunk, 0, kMax,
       "AMX: K per chunk of B (rounded down to a multiple of 128, at least 128, clipped to K-blocks): B's 32 rows x "
       "this many bytes stay in L1 while every token block of the call uses them. 0 (default): 256 for calls of "
       "<= 64 tokens, 512 above."},
      {"amx_prefetch_chunks", &Tuning::amx_prefetch_chunks, 0, kMax,
       "AMX: how many chunks ahead of the one being multiplied B is prefetched (when prefetch is on; 0: none)."},
      {"prefill_min_avg_rows", &Tuning::prefill_min_avg_rows, 0, kMax,
       "Tiled methods: the prefill schedule runs when rows (tokens x top-k) >= this x active experts (0: always; "
       "huge: never); below, the decode schedule."},
      {"per_expert_down_limit_bytes", &Tuning::per_expert_down_limit_bytes, 0, kMax,
       "Decode schedule: while rows x H x 4 bytes <= this, each (expert, column chunk) of the down stage is its "
       "own task with no barrier after the re-quantize stage; above, a task per 32 columns runs over every expert."},
      {"prefill_a_block_bytes", &Tuning::prefill_a_block_bytes, 1, kMax,
       "Prefill schedule: a gate/up task covers at most this many bytes of its expert's activation panel (rows x H, "
       "at least 32 rows; an expert's rows are split into balanced blocks), so that the panel block stays in L2 "
       "while the task's row groups use it."},
      {"group_gemm_min_rows", &Tuning::group_gemm_min_rows, 0, kMax,
       "Group-wise schedule: an expert with at least this many rows runs the ISA's GEMM (its 32 weight rows "
       "unpacked once per call), one with fewer the group-sum kernel on 16 rows at a time (0: always the GEMM; "
       "huge: never)."},
      {"profiling", &Tuning::profiling, 0, 1,
       "Prefill and group-wise schedules: record the stage profile of every call (1) or not (0, default)."},
  };
  return table;
}

}  // namespace kt
