// Python bindings of the CPU MoE engine: kt_kernels.MoELayer and its HostJob (moe_layer.hpp), the host functions
// of stream-ordered jobs, the engine's pool and ISA names. Test and benchmark hooks are in kt_kernels._testing
// (moe_testing.cpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "moe_isa.hpp"
#include "moe_layer.hpp"
#include "thread_pool.hpp"

namespace py = pybind11;

namespace kt {

void bind_moe_testing(py::module_& t);  // moe_testing.cpp

void bind_moe(py::module_& m, py::module_& testing) {
  py::class_<MoELayer>(m, "MoELayer",
                       "One MoE layer's routed experts in a packed format (AMXINT4, AMXINT8, RAWINT4), read in place.")
      .def(py::init<const std::string&, const py::sequence&, int64_t, int64_t, int64_t, std::optional<double>,
                    const std::string&, double, double, const py::object&, const py::object&, const py::object&, double,
                    double>(),
           py::arg("method"), py::arg("weights"), py::arg("hidden_size"), py::arg("intermediate_size"),
           py::arg("threadpool_count"), py::arg("swiglu_limit") = py::none(), py::kw_only(),
           py::arg("activation") = "silu", py::arg("alpha") = 1.702, py::arg("up_offset") = 1.0,
           py::arg("gate_bias") = py::none(), py::arg("up_bias") = py::none(), py::arg("down_bias") = py::none(),
           py::arg("beta") = 4.0, py::arg("linear_beta") = 25.0,
           "weights[e][t] = (gate_w, gate_s, up_w, up_s, down_w, down_s): uint8 packed bytes and scales (float32 "
           "per row; rawint4: bf16 bits per group) of NUMA shard t of expert e (gate/up: [I/T, H], down: [H, I/T]). "
           "activation 'silu', 'gpt_oss' (g*sigmoid(alpha*g) * (u + up_offset)) or 'situ' "
           "(beta*tanh(g/beta)*sigmoid(g) * linear_beta*tanh(u/linear_beta); not on rawint4); gate_bias / up_bias "
           "float32 [E, I], down_bias [E, H] or None.")
      .def("forward", &MoELayer::forward, py::arg("x"), py::arg("topk_ids"), py::arg("topk_weights"),
           py::arg("isa") = "auto", py::arg("num_threads") = 0,
           "x float32 [T, H], topk_ids int64 [T, k], topk_weights float32 [T, k] -> float32 [T, H]")
      .def_property_readonly("num_experts", [](const MoELayer& l) { return l.config().experts; })
      .def_property_readonly("hidden_size", [](const MoELayer& l) { return l.config().hidden; })
      .def_property_readonly("intermediate_size", [](const MoELayer& l) { return l.config().intermediate; })
      .def_property_readonly("threadpool_count", [](const MoELayer& l) { return l.config().threadpool_count; })
      .def_property_readonly("activation", &MoELayer::activation)
      .def("host_job", [](py::object self, py::array x, py::array ids, py::array w, py::array out,
                          const std::string& isa, int64_t num_threads) {
             return new PyHostJob(self, x, ids, w, out, isa, num_threads);
           }, py::arg("x"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("out"), py::arg("isa") = "auto",
           py::arg("num_threads") = 0, py::return_value_policy::take_ownership,
           "A stream-ordered job over these fixed buffers (HostJob): forward(x, topk_ids, topk_weights) into out "
           "each time it is submitted, on the submission thread. The buffers are read when the job runs, not "
           "checked then: ids outside [-1, E) fail the run (out filled with NaN, counted in failures, last_error); "
           "non-finite x or weights give non-finite rows.")
      .def_property_readonly("has_biases", &MoELayer::has_biases);

  py::class_<PyHostJob>(m, "HostJob", "A MoELayer's stream-ordered job (MoELayer.host_job).")
      .def_property_readonly("address", &PyHostJob::address, "the job's address: the host functions' argument")
      .def("submit", [](PyHostJob& j) { moe::host_submit(&j.job()); }, "queue one run (what the stream's host "
           "function does)")
      .def("wait", [](PyHostJob& j) {
             py::gil_scoped_release release;
             moe::host_wait(&j.job());
           }, "block until every submission so far has run")
      .def_property_readonly("submitted", [](PyHostJob& j) { return j.job().submitted.load(); })
      .def_property_readonly("done", [](PyHostJob& j) { return j.job().done.load(); })
      .def_property_readonly("failures", [](PyHostJob& j) { return j.job().failures.load(); })
      .def_property_readonly("last_error", [](PyHostJob& j) {
        return j.job().failures.load() ? j.job().last_error : std::string();
      });
  m.def("host_functions", [] {
    return py::make_tuple(reinterpret_cast<uintptr_t>(&moe::host_submit), reinterpret_cast<uintptr_t>(&moe::host_wait));
  }, "(submit, wait) addresses of the host functions that take a HostJob's address (cudaLaunchHostFunc's shape)");
  m.def("start_moe_pool", [](int64_t num_threads) {
    const int n = checked_thread_count(num_threads);
    py::gil_scoped_release release;
    return moe::start_pool(n);
  }, py::arg("num_threads") = 0,
  "Starts the MoE engine's pool of num_threads threads now (0: every hardware thread) and returns its size; "
  "ThreadStartError when the system refuses a thread.");
  m.def("moe_isas", &moe::runnable_isas,
        "The engine's ISA names this CPU runs, in order (the last is what isa='auto' picks): portable, avx2, "
        "avxvnni, avx512, amx.");
  bind_moe_testing(testing);
}

}  // namespace kt
