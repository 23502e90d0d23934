// The MoE engine's kernels per ISA: one row per ISA, holding every kernel the engine calls, chosen once per
// call by name (moe_isa.cpp). A row names only the kernels its ISA provides; every other entry comes from the
// row it extends (its base), so the fallback rule is this one inheritance, written once (isa_table). A row
// runs on a CPU that has its own features and its base's.
//
//   row       base     own entries
//   portable  -        every entry: the scalar references (moe_ref.cpp, moe_epilogue_ref.cpp, moe_group_ref.cpp)
//   avx2      portable tiled dot (VPMADDUBSW), epilogue, group-wise kernels   (AVX2 + FMA)
//   avxvnni   avx2     tiled dot (VEX VPDPBUSD)                                (+ AVX-VNNI)
//   avx512    avx2     tiled dot, epilogue, group-wise kernels                 (AVX-512 F/BW/VL/DQ + VNNI)
//   amx       avx512   tiled dot (tiles), its thread set-up and hints, group-wise dot and GEMM (AMX-INT8)
//
// Every row gives bit-identical results (exact int32 sums, the same float operations in the same order).
#pragma once
#include <string>
#include <vector>

#include "moe.hpp"
#include "moe_group.hpp"

namespace kt {
namespace moe {

// The tiled byte order (AMXINT4 / AMXINT8): the dot kernel and what it asks of the schedule.
struct TiledKernels {
  DotFn dot = nullptr;                // expects prepare_thread() to have run on the calling thread
  void (*prepare_thread)() = nullptr;  // once per thread and parallel region before dot (AMX: tile config)
  void (*hint_next_group)(const uint8_t* w, int64_t n, int64_t k, int64_t r0) = nullptr;  // amx::hint_next_group
  void (*hint_next_rows)(const void* p, int64_t bytes) = nullptr;                        // amx::hint_next_rows
};

// The group-wise byte order (RAWINT4): exact group sums (few rows), their float step, the rows' preparation,
// and the GEMM that fuses both for many rows (moe_group.hpp).
struct GroupKernels {
  GroupDotFn dot = nullptr;
  GroupScaleFn scale = nullptr;
  GroupPrepareFn prepare = nullptr;
  GroupGemmFn gemm = nullptr;
};

struct IsaKernels {
  const char* name = nullptr;
  TiledKernels tiled;
  GroupKernels group;
  const Epilogue* epilogue = nullptr;
};

// The rows in order (portable first, each row after its base), entries inherited; built once.
const std::vector<IsaKernels>& isa_table();

// The row for `name` ("auto": the last row this CPU runs); throws std::invalid_argument for an unknown name
// or a row this CPU cannot run.
const IsaKernels& isa_kernels(const std::string& name);

// Names of the rows this CPU runs, in table order.
std::vector<std::string> runnable_isas();

// For tests: per row, its base and whether this CPU runs it, and per entry the row that provides it.
struct IsaRowInfo {
  std::string name, base;
  bool runs = false;
  std::vector<std::pair<std::string, std::string>> providers;  // (entry, providing row); "" where none
};
std::vector<IsaRowInfo> isa_table_info();

}  // namespace moe
}  // namespace kt
