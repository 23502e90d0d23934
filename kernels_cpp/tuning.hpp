// The MoE engine's tuning knobs, in one place. No value changes a result (bytes, int32 sums and
// floats are identical for every setting); they trade speed only. Tests and benchmarks set them
// through kt_kernels._moe_* (moe_bindings.cpp); the kernels read them with relaxed loads.
#pragma once
#include <atomic>
#include <cstdint>

namespace kt {

struct Tuning {
  // SpinPool: microseconds a worker spins after a call before it sleeps (KT_MOE_SPIN_US, default 2000).
  std::atomic<int64_t> spin_us{2000};
  // AMX: the smallest expert group (rows) sent to the tile kernel; smaller ones take the AVX-512 one.
  std::atomic<int> amx_min_tokens{16};
  // AMX INT8: how the tile kernel reads each K chunk of B. 0 tiles loaded in place; 1 in place, the
  // next chunk prefetched (default); 2 copied into a per-thread buffer (as INT4 is unpacked); 3 copied,
  // the next chunk prefetched.
  std::atomic<int> amx_int8_mode{1};
  // AMX INT4: prefetch the next chunk of B while the current one is multiplied (1, default) or not (0).
  std::atomic<int> amx_int4_prefetch{1};
  // AMX: K per chunk of B (a multiple of 128, clipped to K-blocks): B's 32 rows x this many bytes stay
  // in L1 while every token block of the call uses them. 0 (default): 256 for calls of <= 64 tokens,
  // 512 above.
  std::atomic<int64_t> amx_k_chunk{0};
  // AMX: how many chunks ahead of the one being multiplied B is prefetched (when prefetch is on).
  std::atomic<int64_t> amx_prefetch_chunks{2};
  // forward(): the prefill schedule runs when rows (tokens x top-k) >= this x active experts
  // (0: always; huge: never); below, the decode schedule.
  std::atomic<int64_t> prefill_min_avg_rows{8};
  // Decode schedule: while rows x H x 4 bytes <= this, each (expert, column chunk) of the down stage
  // is its own task with no barrier after the re-quantize stage; above, a task per 32 columns runs
  // over every expert.
  std::atomic<int64_t> per_expert_down_limit_bytes{int64_t(8) << 20};
  // Prefill schedule: a gate/up task covers at most this many bytes of its expert's activation panel
  // (rows x H, at least 32 rows; an expert's rows are split into balanced blocks), so that the
  // panel block stays in L2 while the task's row groups use it.
  std::atomic<int64_t> prefill_a_block_bytes{int64_t(1) << 20};
  // Prefill schedule: record the stage profile of every call (moe::last_profile()).
  std::atomic<bool> profiling{false};

  Tuning();  // reads KT_MOE_SPIN_US
};

// The process's knobs.
Tuning& tuning();

}  // namespace kt
