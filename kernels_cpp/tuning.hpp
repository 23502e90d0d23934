// The MoE engine's tuning knobs, in one place. No value changes a result (bytes, int32 sums and
// floats are identical for every setting); they trade speed only. Every knob is an int64 in the
// table knob_table() (tuning.cpp: name, range, meaning), through which tests and benchmarks read and
// set them (kt_kernels._testing.knob); the kernels read them with relaxed loads.
#pragma once
#include <atomic>
#include <cstdint>
#include <vector>

namespace kt {

struct Tuning {
  std::atomic<int64_t> spin_us{2000};  // KT_MOE_SPIN_US at start
  std::atomic<int64_t> amx_min_tokens{16};
  std::atomic<int64_t> amx_int8_mode{1};
  std::atomic<int64_t> amx_int4_prefetch{1};
  std::atomic<int64_t> amx_k_chunk{0};
  std::atomic<int64_t> amx_prefetch_chunks{2};
  std::atomic<int64_t> prefill_min_avg_rows{8};
  std::atomic<int64_t> per_expert_down_limit_bytes{int64_t(8) << 20};
  std::atomic<int64_t> prefill_a_block_bytes{int64_t(1) << 20};
  std::atomic<int64_t> group_gemm_min_rows{2};
  std::atomic<int64_t> profiling{0};

  Tuning();  // reads KT_MOE_SPIN_US
};

// The process's knobs.
Tuning& tuning();

// One knob: its field, the values it takes, what it does.
struct Knob {
  const char* name;
  std::atomic<int64_t> Tuning::*field;
  int64_t min, max;
  const char* meaning;
};
const std::vector<Knob>& knob_table();

}  // namespace kt
