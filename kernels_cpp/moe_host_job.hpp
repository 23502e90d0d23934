// Stream-ordered CPU experts: a persistent MoE job over fixed host buffers, run by the process's one
// submission thread. host_submit(job) / host_wait(job) are plain functions of one void* argument, the
// shape cudaLaunchHostFunc / cuLaunchHostFunc take: the CUDA runtime calls them in stream order on its
// callback thread (they never call CUDA themselves). submit queues the job and returns at once; wait
// blocks until every submission of that job made so far has run. Captured into a CUDA graph they run
// at each replay with the same job (pointers baked in), reading the buffers the stream filled before.
// This file knows nothing of CUDA; kt_runtime/hybrid/stream_ops.py launches the functions.
#pragma once
#include <atomic>
#include <cstdint>
#include <string>

#include "moe.hpp"
#include "moe_isa.hpp"

namespace kt {
namespace moe {

struct HostJob {
  const Weights* weights = nullptr;
  const float* x = nullptr;      // [tokens, H]
  const int64_t* ids = nullptr;  // [tokens, topk]; -1: a slot computed elsewhere
  const float* w = nullptr;      // [tokens, topk]
  float* out = nullptr;          // [tokens, H]
  int64_t tokens = 0, topk = 0;
  const IsaKernels* kernels = nullptr;  // the ISA table row the job runs on
  int threads = 1;
  std::atomic<uint64_t> submitted{0}, done{0};
  std::atomic<uint64_t> failures{0};  // runs that threw: their out is filled with NaN (nothing can raise there)
  std::string last_error;             // written by the submission thread before `done` moves
};

void host_submit(void* job);
void host_wait(void* job);

}  // namespace moe
}  // namespace kt
