#include "pack.hpp"

#include <atomic>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>

#include "numerics.hpp"
#include "thread_pool.hpp"

namespace kt {

Method parse_method(const std::string& name) {
  if (name == "int4") return Method::Int4;
  if (name == "int8") return Method::Int8;
  if (name == "rawint4-g32") return Method::RawInt4G32;
  if (name == "rawint4-g64") return Method::RawInt4G64;
  if (name == "rawint4-g128") return Method::RawInt4G128;
  throw std::invalid_argument("unknown quant method '" + name +
                              "' (expected int4, int8, rawint4-g32, rawint4-g64 or rawint4-g128)");
}

int64_t packed_weight_bytes(Method method, int64_t n, int64_t k) { return n * k / method_info(method).elems_per_byte; }

namespace {

// The packer's dispatch table: one row per ISA, lowest first. A row runs on CPUs whose best level is at
// least its own; kernels_for takes each entry from the highest such row that has it.
struct IsaRow {
  Isa isa;
  PackKernels kernels;
};
const std::vector<IsaRow>& isa_rows() {
  static const std::vector<IsaRow> rows = {
      {Isa::Portable, ref::kernels()},  // every entry
      {Isa::Avx2, avx2::kernels()},
      {Isa::Avx512, avx512::kernels()},
  };
  return rows;
}

// The entry `get` of the highest row at or below `isa` that has it, and that row's level.
template <class Get>
auto pick(Isa isa, Get get) -> std::pair<decltype(get(std::declval<const PackKernels&>())), Isa> {
  std::pair<decltype(get(std::declval<const PackKernels&>())), Isa> chosen{nullptr, Isa::Portable};
  for (const IsaRow& row : isa_rows())
    if (row.isa <= isa)
      if (auto entry = get(row.kernels)) chosen = {entry, row.isa};
  return chosen;
}

auto decoder_of(SourceKind kind) {
  return [kind](const PackKernels& k) { return k.decoder ? k.decoder(kind) : nullptr; };
}
constexpr auto quantize_row_of = [](const PackKernels& k) { return k.quantize_row; };
constexpr auto pack_nibbles_of = [](const PackKernels& k) { return k.pack_nibbles; };
constexpr auto tile_block_of = [](const PackKernels& k) { return k.tile_block; };
constexpr auto quantize_groups_row_of = [](const PackKernels& k) { return k.quantize_groups_row; };

void validate(Method method, const PackJob& job, size_t index) {
  const MethodInfo info = method_info(method);
  const std::string where = "pack job " + std::to_string(index) + ": ";
  if (job.n <= 0 || job.k <= 0) throw std::invalid_argument(where + "empty matrix");
  if (!is_grouped(method) && job.n % TILE_ROWS != 0) throw std::invalid_argument(where + "rows (" + std::to_string(job.n) + ") must be a multiple of 32");
  if (job.k % info.k_align != 0)
    throw std::invalid_argument(where + "columns (" + std::to_string(job.k) + ") must be a multiple of " + std::to_string(info.k_align));
  if (!job.weight || !job.out_weight || !job.out_scale) throw std::invalid_argument(where + "null buffer");
  if (job.kind == SourceKind::MXFP4 && (!job.scales || job.col0 % 32 != 0))
    throw std::invalid_argument(where + "MXFP4 needs scales and a first column aligned to 32");
  if (job.kind == SourceKind::FP8_BLOCK && (!job.scales || job.block_n <= 0 || job.block_k <= 0 || job.row_offset < 0))
    throw std::invalid_argument(where + "FP8_BLOCK needs float32 scales, positive block sizes and row_offset >= 0");
  if (job.kind == SourceKind::INT4_GROUP &&
      (!job.scales || job.block_k <= 0 || (job.scale_bits != 16 && job.scale_bits != 32)))
    throw std::invalid_argument(where + "INT4_GROUP needs bf16/float32 scales and a positive group size");
  if (job.carry_codes &&
      (!is_grouped(method) || job.kind != SourceKind::INT4_GROUP || job.scale_bits != 16 ||
       job.block_k % info.group_size != 0 || job.col0 % info.group_size != 0))
    throw std::invalid_argument(where + "codes are carried over only from INT4_GROUP with bf16 scales whose groups "
                                "hold whole output groups");
}

struct Task {
  size_t job;
  int64_t row0;
};

// Per-thread scratch, reused across calls.
struct Scratch {
  std::vector<float> row;
  std::vector<int8_t> q;
  std::vector<uint8_t> block;
};

}  // namespace

DecodeRowFn ChosenKernels::decoder(SourceKind kind) const { return pick(isa, decoder_of(kind)).first; }

ChosenKernels kernels_for(Isa isa) {
  return {isa, pick(isa, quantize_row_of).first, pick(isa, pack_nibbles_of).first, pick(isa, tile_block_of).first,
          pick(isa, quantize_groups_row_of).first};
}

std::vector<std::pair<std::string, Isa>> kernel_rows(Isa isa, SourceKind kind) {
  return {{"decode", pick(isa, decoder_of(kind)).second},
          {"quantize_row", pick(isa, quantize_row_of).second},
          {"pack_nibbles", pick(isa, pack_nibbles_of).second},
          {"tile_block", pick(isa, tile_block_of).second},
          {"quantize_groups_row", pick(isa, quantize_groups_row_of).second}};
}

void pack_jobs(Method method, std::vector<PackJob>& jobs, Isa isa, int num_threads) {
  const MethodInfo info = method_info(method);
  std::vector<Task> tasks;
  const int64_t rows_per_task = is_grouped(method) ? TILE_ROWS : info.n_block;  // row-major: any split
  for (size_t i = 0; i < jobs.size(); ++i) {
    validate(method, jobs[i], i);
    for (int64_t r = 0; r < jobs[i].n; r += rows_per_task) tasks.push_back({i, r});
  }
  const ChosenKernels kern = kernels_for(isa);
  std::vector<DecodeRowFn> decode(jobs.size());
  for (size_t i = 0; i < jobs.size(); ++i) decode[i] = kern.decoder(jobs[i].kind);
  ThreadPool& pool = shared_pool(num_threads);
  std::vector<Scratch> scratch(pool.size());
  std::unique_ptr<std::atomic<int64_t>[]> nonfinite(new std::atomic<int64_t>[jobs.size()]);
  for (size_t i = 0; i < jobs.size(); ++i) nonfinite[i] = 0;

  pool.parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t t, int tid) {
    const MxcsrGuard ieee;  // same bytes whatever FTZ/DAZ/rounding state this thread was left in
    const Task task = tasks[t];
    const PackJob& job = jobs[task.job];
    const int64_t nbs = std::min<int64_t>(rows_per_task, job.n - task.row0);
    const int64_t kbytes = job.k / info.elems_per_byte;
    Scratch& s = scratch[tid];
    s.row.resize(job.k);
    if (is_grouped(method)) {
      int64_t bad = 0;
      const int64_t groups = job.k / info.group_size;
      for (int64_t row = task.row0; row < task.row0 + nbs; ++row) {
        uint8_t* out_row = job.out_weight + row * kbytes;
        uint16_t* out_scales = static_cast<uint16_t*>(job.out_scale) + row * groups;
        if (job.carry_codes) {
          bad += ref::carry_group_codes_row(job, row, info.group_size, out_row, out_scales, s.row.data());
          continue;
        }
        bad += decode[task.job](job, row, s.row.data());
        kern.quantize_groups_row(s.row.data(), job.k, info.group_size, out_row, out_scales);
      }
      if (bad) nonfinite[task.job] += bad;
      return;
    }
    s.q.resize(job.k);
    s.block.resize(nbs * kbytes);
    int64_t bad = 0;
    for (int64_t r = 0; r < nbs; ++r) {
      const int64_t row = task.row0 + r;
      bad += decode[task.job](job, row, s.row.data());
      uint8_t* packed_row = s.block.data() + r * kbytes;
      if (method == Method::Int8) {
        static_cast<float*>(job.out_scale)[row] = kern.quantize_row(method, s.row.data(), job.k, reinterpret_cast<int8_t*>(packed_row));
      } else {
        static_cast<float*>(job.out_scale)[row] = kern.quantize_row(method, s.row.data(), job.k, s.q.data());
        kern.pack_nibbles(s.q.data(), job.k, packed_row);
      }
    }
    kern.tile_block(s.block.data(), nbs, kbytes, K_BLOCK / info.elems_per_byte, job.out_weight + task.row0 * kbytes);
    if (bad) nonfinite[task.job] += bad;
  });
  for (size_t i = 0; i < jobs.size(); ++i) jobs[i].nonfinite = nonfinite[i];
}

}  // namespace kt
