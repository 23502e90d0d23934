// The kt_kernels extension module: CPU features, the packer, and (moe_bindings.cpp) the MoE engine; test and
// benchmark hooks in the private submodule kt_kernels._testing (moe_testing.cpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <stdexcept>
#include <string>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include "cpu_features.hpp"
#include "pack.hpp"
#include "thread_pool.hpp"

namespace py = pybind11;

namespace kt {
void bind_moe(py::module_& m, py::module_& testing);  // moe_bindings.cpp
}

namespace {

using kt::PackJob;
using kt::SourceKind;

SourceKind parse_kind(const std::string& s) {
  if (s == "bf16") return SourceKind::BF16;
  if (s == "f32") return SourceKind::F32;
  if (s == "mxfp4") return SourceKind::MXFP4;
  if (s == "f16") return SourceKind::F16;
  if (s == "fp8_block") return SourceKind::FP8_BLOCK;
  if (s == "int4_group") return SourceKind::INT4_GROUP;
  if (s == "nvfp4") return SourceKind::NVFP4;
  if (s == "mxfp8") return SourceKind::MXFP8;
  throw std::invalid_argument("unknown source kind '" + s +
                              "' (expected bf16, f32, mxfp4, f16, fp8_block, int4_group, nvfp4 or mxfp8)");
}

int64_t element_bits(SourceKind kind) {
  switch (kind) {
    case SourceKind::BF16: return 16;
    case SourceKind::F32: return 32;
    case SourceKind::MXFP4: return 4;
    case SourceKind::F16: return 16;
    case SourceKind::FP8_BLOCK: return 8;
    case SourceKind::INT4_GROUP: return 4;
    case SourceKind::NVFP4: return 4;
    case SourceKind::MXFP8: return 8;
  }
  return 0;
}

void require(bool ok, const std::string& where, const std::string& what) {
  if (!ok) throw std::invalid_argument(where + what);
}

// A job tuple: (kind, weight[n, row_bytes...], scales or None, col0, k, out_weight, out_scale
// [, (row_offset, block_n, block_k)[, carry_codes] | (global_scale, global_divides)]). The block tuple is
// needed by fp8_block (the scale grid and where row 0 sits in it) and int4_group (block_k = group size);
// carry_codes (int4_group to a group-wise method): copy the codes and scales instead of quantizing; nvfp4
// takes its per-tensor scale and whether it divides the group scales.
PackJob make_job(kt::Method method, const py::tuple& t, size_t index) {
  const std::string where = "pack job " + std::to_string(index) + ": ";
  require(t.size() >= 7 && t.size() <= 9, where,
          "expected (kind, weight, scales, col0, k, out_weight, out_scale[, (row_offset, block_n, block_k)"
          "[, carry_codes] | (global_scale, global_divides)])");
  PackJob job;
  job.kind = parse_kind(t[0].cast<std::string>());
  const py::array weight = t[1].cast<py::array>();
  require(weight.ndim() == 2, where, "weight must be 2-D");
  require(weight.strides(1) == weight.itemsize(), where, "weight rows must be contiguous");
  job.n = weight.shape(0);
  job.weight = static_cast<const uint8_t*>(weight.data());
  job.weight_row_bytes = weight.strides(0);
  job.col0 = t[3].cast<int64_t>();
  job.k = t[4].cast<int64_t>();
  require(job.col0 >= 0 && job.k > 0, where, "bad column range");
  const int64_t row_bytes = weight.shape(1) * weight.itemsize();
  require((job.col0 + job.k) * element_bits(job.kind) <= row_bytes * 8, where, "column range exceeds the source row");
  if (job.kind == SourceKind::MXFP4 || job.kind == SourceKind::MXFP8 || job.kind == SourceKind::NVFP4) {
    const int64_t group = job.kind == SourceKind::NVFP4 ? 16 : 32;  // columns per one-byte scale
    require(!t[2].is_none(), where, "MXFP4/MXFP8/NVFP4 need scales");
    const py::array scales = t[2].cast<py::array>();
    require(scales.ndim() == 2 && scales.itemsize() == 1 && scales.strides(1) == 1, where, "scales must be 2-D uint8 rows");
    require(scales.shape(0) == job.n, where, "scales rows differ from weight rows");
    require(scales.shape(1) * group >= job.col0 + job.k, where, "scales do not cover the column range");
    job.scales = static_cast<const uint8_t*>(scales.data());
    job.scale_row_bytes = scales.strides(0);
  }
  if (job.kind == SourceKind::NVFP4) {
    require(t.size() == 8, where, "nvfp4 needs (global_scale, global_divides)");
    const py::tuple g = t[7].cast<py::tuple>();
    require(g.size() == 2, where, "nvfp4: expected (global_scale, global_divides)");
    job.global_scale = g[0].cast<float>();
    job.global_divides = g[1].cast<bool>();
    require(std::isfinite(job.global_scale) && job.global_scale > 0.f, where,
            "nvfp4 global_scale must be a positive finite number");
  }
  if (job.kind == SourceKind::FP8_BLOCK || job.kind == SourceKind::INT4_GROUP) {
    const bool fp8 = job.kind == SourceKind::FP8_BLOCK;
    require(!t[2].is_none() && t.size() >= 8, where, "fp8_block/int4_group need scales and (row_offset, block_n, block_k)");
    const py::tuple block = t[7].cast<py::tuple>();
    require(block.size() == 3, where, "block must be (row_offset, block_n, block_k)");
    job.row_offset = block[0].cast<int64_t>();
    job.block_n = block[1].cast<int64_t>();
    job.block_k = block[2].cast<int64_t>();
    require(job.row_offset >= 0 && job.block_n > 0 && job.block_k > 0, where, "bad block sizes");
    const py::array scales = t[2].cast<py::array>();
    const int64_t item = scales.itemsize();
    require(scales.ndim() == 2 && scales.strides(1) == item && (item == 4 || (!fp8 && item == 2)), where,
            fp8 ? "fp8_block scales must be 2-D float32 rows" : "int4_group scales must be 2-D bf16 or float32 rows");
    if (fp8) {
      require(scales.shape(0) * job.block_n >= job.row_offset + job.n, where, "scales do not cover the rows");
    } else {
      require(job.row_offset == 0 && job.block_n == 1, where, "int4_group scales are per row: use (0, 1, group)");
      require(scales.shape(0) == job.n, where, "scales rows differ from weight rows");
    }
    require(scales.shape(1) * job.block_k >= job.col0 + job.k, where, "scales do not cover the column range");
    job.scales = static_cast<const uint8_t*>(scales.data());
    job.scale_row_bytes = scales.strides(0);
    job.scale_bits = static_cast<int>(item * 8);
  }
  if (t.size() == 9) {
    require(job.kind == SourceKind::INT4_GROUP, where, "carry_codes is for int4_group sources only");
    job.carry_codes = t[8].cast<bool>();
  }
  py::array out_w = t[5].cast<py::array>();
  py::array out_s = t[6].cast<py::array>();
  require(out_w.writeable() && out_s.writeable(), where, "outputs must be writable");
  require(out_w.nbytes() == kt::packed_weight_bytes(method, job.n, job.k), where, "out_weight has the wrong size");
  const kt::MethodInfo info = kt::method_info(method);
  if (info.group_size) {
    require(out_s.itemsize() == 2 && out_s.size() == job.n * (job.k / info.group_size) &&
            (out_s.flags() & py::array::c_style), where, "out_scale must be n * k / group contiguous bf16 (uint16)");
  } else {
    require(out_s.itemsize() == 4 && out_s.size() == job.n && (out_s.flags() & py::array::c_style), where,
            "out_scale must be n contiguous float32");
  }
  require(out_w.flags() & py::array::c_style, where, "out_weight must be contiguous");
  job.out_weight = static_cast<uint8_t*>(out_w.mutable_data());
  job.out_scale = out_s.mutable_data();
  return job;
}

std::vector<int64_t> pack(const std::string& method_name, const py::list& job_list, const std::string& isa_name,
                          int64_t num_threads) {
  const int threads = kt::checked_thread_count(num_threads);
  const kt::Method method = kt::parse_method(method_name);
  const kt::Isa isa = kt::resolve_isa(isa_name);
  std::vector<PackJob> jobs;
  jobs.reserve(job_list.size());
  for (size_t i = 0; i < job_list.size(); ++i) jobs.push_back(make_job(method, job_list[i].cast<py::tuple>(), i));
  {
    py::gil_scoped_release release;
    kt::pack_jobs(method, jobs, isa, threads);
  }
  std::vector<int64_t> nonfinite;
  for (const auto& j : jobs) nonfinite.push_back(j.nonfinite);
  return nonfinite;
}

unsigned set_mxcsr(unsigned value) {
#if defined(__x86_64__) || defined(__i386__)
  const unsigned old = _mm_getcsr();
  _mm_setcsr(value);
  return old;
#else
  (void)value;
  throw std::invalid_argument("set_mxcsr needs an x86 CPU");
#endif
}

}  // namespace

PYBIND11_MODULE(kt_kernels, m) {
  m.doc() = "kt-convert CPU kernels: AMXINT4/AMXINT8 packer and MoE engine";
  py::register_exception<std::invalid_argument>(m, "KernelArgumentError", PyExc_ValueError);
  py::register_exception<kt::ThreadStartError>(m, "ThreadStartError", PyExc_RuntimeError);
  m.attr("MAX_THREADS") = kt::kMaxThreads;

  m.def("cpu_features", [] {
    const kt::CpuFeatures& f = kt::cpu_features();
    py::dict d;
    d["avx2"] = f.avx2; d["fma"] = f.fma; d["f16c"] = f.f16c; d["bmi2"] = f.bmi2; d["avx_vnni"] = f.avx_vnni;
    d["avx512f"] = f.avx512f; d["avx512bw"] = f.avx512bw; d["avx512vl"] = f.avx512vl; d["avx512dq"] = f.avx512dq;
    d["avx512vnni"] = f.avx512vnni; d["avx512bf16"] = f.avx512bf16;
    d["amx_tile"] = f.amx_tile; d["amx_int8"] = f.amx_int8; d["amx_bf16"] = f.amx_bf16; d["amx_usable"] = f.amx_usable;
    return d;
  });
  m.def("best_isa", [] { return std::string(kt::isa_name(kt::best_isa())); });
  m.def("resolve_isa", [](const std::string& name) { return std::string(kt::isa_name(kt::resolve_isa(name))); },
        py::arg("name"), "The ISA level `name` (auto, portable, avx2, avx512, amx) runs at on this CPU (auto: the best); "
        "ValueError for another name or a level this CPU lacks.");
  m.def("hardware_threads", &kt::hardware_threads);
  m.def("start_pack_pool", [](int64_t num_threads) {
    const int n = kt::checked_thread_count(num_threads);
    py::gil_scoped_release release;
    return kt::shared_pool(n).size();
  }, py::arg("num_threads") = 0,
  "Starts the packer's pool of num_threads threads now (0: every hardware thread) and returns its size; "
  "ThreadStartError when the system refuses a thread.");
  m.def("pack", &pack, py::arg("method"), py::arg("jobs"), py::arg("isa") = "auto", py::arg("num_threads") = 0,
        "Quantize and AMX-tile source matrices. Each job is (kind, weight, scales|None, col0, k, out_weight, "
        "out_scale); returns the count of non-finite source values per job (packed as 0).");
  m.def("method_info", [](const std::string& name) {
    const kt::MethodInfo info = kt::method_info(kt::parse_method(name));
    py::dict d;
    d["n_block"] = info.n_block; d["k_align"] = info.k_align; d["elems_per_byte"] = info.elems_per_byte;
    d["levels"] = info.levels; d["fp32_reciprocal"] = info.fp32_reciprocal; d["group_size"] = info.group_size;
    return d;
  }, py::arg("method"), "The kernels' constants of a quant method (int4 | int8 | rawint4-gG); ValueError for another name.");
  py::module_ testing = m.def_submodule("_testing", "Hooks for tests and benchmarks (not an API).");
  py::module_::import("sys").attr("modules")["kt_convert.kt_kernels._testing"] = testing;  // `import kt_convert.kt_kernels._testing`
  testing.def("set_mxcsr", &set_mxcsr, py::arg("value"),
              "Sets the calling thread's MXCSR (x86) and returns the previous value; threads the packer creates "
              "afterwards inherit it.");
  testing.def("pack_kernel_rows", [](const std::string& isa, const std::string& kind) {
    py::dict d;
    for (const auto& [entry, row] : kt::kernel_rows(kt::parse_isa(isa), parse_kind(kind))) d[entry.c_str()] = kt::isa_name(row);
    return d;
  }, py::arg("isa"), py::arg("kind"),
  "For each entry of the packer's kernels at ISA level `isa` (the decoder of source `kind`), the row "
  "it comes from.");
  kt::bind_moe(m, testing);
}
