// The engine's ISA table (moe_isa.hpp): each row's own kernels, its base, and the CPU features it needs;
// the inheritance that fills a row's other entries from its base is applied once, when the table is built.
#include "moe_isa.hpp"

#include <stdexcept>

#include "cpu_features.hpp"

namespace kt {
namespace moe {
namespace {

// Every entry of a row, by name (the inheritance and the tests' provider list walk this list).
#define KT_ISA_ENTRIES(X)                                                                                       \
  X(tiled.dot) X(tiled.prepare_thread) X(tiled.hint_next_group) X(tiled.hint_next_rows) X(group.dot)           \
  X(group.scale) X(group.prepare) X(group.gemm) X(epilogue)

struct Row {
  IsaKernels own;                          // the kernels this ISA provides; null entries come from the base
  const char* base;                        // the row it extends (nullptr: none)
  bool (*runs)(const CpuFeatures& f, Isa best);  // the CPU has this row's features (its base's are checked apart)
};

std::vector<Row> rows() {
  std::vector<Row> r(5);
  IsaKernels& p = r[0].own;
  p.name = "portable";
  p.tiled.dot = ref::dot_rowgroup;
  p.group = {ref::group_dot, ref::group_scale, ref::group_prepare, ref::group_gemm};
  p.epilogue = &epilogue_ref();
  r[0].base = nullptr;
  r[0].runs = [](const CpuFeatures&, Isa) { return true; };

  IsaKernels& a2 = r[1].own;
  a2.name = "avx2";
  a2.tiled.dot = avx2::dot_rowgroup;
  a2.group = {avx2::group_dot, avx2::group_scale, avx2::group_prepare, avx2::group_gemm};
  a2.epilogue = &epilogue_avx2();
  r[1].base = "portable";
  r[1].runs = [](const CpuFeatures&, Isa best) { return best >= Isa::Avx2; };

  IsaKernels& vn = r[2].own;
  vn.name = "avxvnni";
  vn.tiled.dot = avxvnni::dot_rowgroup;
  r[2].base = "avx2";
  r[2].runs = [](const CpuFeatures& f, Isa) { return f.avx_vnni; };

  IsaKernels& a5 = r[3].own;
  a5.name = "avx512";
  a5.tiled.dot = avx512::dot_rowgroup;
  a5.group = {avx512::group_dot, avx512::group_scale, avx512::group_prepare, avx512::group_gemm};
  a5.epilogue = &epilogue_avx512();
  r[3].base = "avx2";  // not avxvnni: AVX-512 CPUs without AVX-VNNI exist (Zen 4, Ice Lake)
  r[3].runs = [](const CpuFeatures& f, Isa best) { return best >= Isa::Avx512 && f.avx512vnni; };

  IsaKernels& am = r[4].own;
  am.name = "amx";
  am.tiled = {amx::dot_rowgroup_nocfg, amx::configure_thread, amx::hint_next_group, amx::hint_next_rows};
  am.group.dot = amx::group_dot;
  am.group.gemm = amx::group_gemm;
  r[4].base = "avx512";
  r[4].runs = [](const CpuFeatures&, Isa best) { return best >= Isa::Amx; };
  return r;
}

const std::vector<Row>& own_rows() {
  static const std::vector<Row> r = rows();
  return r;
}

int64_t index_of(const char* name) {
  const std::vector<Row>& r = own_rows();
  for (size_t i = 0; i < r.size(); ++i)
    if (std::string(r[i].own.name) == name) return static_cast<int64_t>(i);
  return -1;
}

// Whether this CPU runs row i: its own features and, through its base, every row it inherits from.
bool runs(int64_t i) {
  const std::vector<Row>& r = own_rows();
  const CpuFeatures& f = cpu_features();
  const Isa best = best_isa();
  for (; i >= 0; i = r[i].base ? index_of(r[i].base) : -1)
    if (!r[i].runs(f, best)) return false;
  return true;
}

std::vector<IsaKernels> inherit() {
  const std::vector<Row>& r = own_rows();
  std::vector<IsaKernels> t;
  for (const Row& row : r) {
    IsaKernels k = row.own;
    if (row.base) {
      const int64_t b = index_of(row.base);  // listed before this row: already complete
      const IsaKernels& base = t.at(static_cast<size_t>(b));
#define KT_INHERIT(e) \
  if (!k.e) k.e = base.e;
      KT_ISA_ENTRIES(KT_INHERIT)
#undef KT_INHERIT
    }
    t.push_back(k);
  }
  return t;
}

}  // namespace

const std::vector<IsaKernels>& isa_table() {
  static const std::vector<IsaKernels> t = inherit();
  return t;
}

const IsaKernels& isa_kernels(const std::string& name) {
  const std::vector<IsaKernels>& t = isa_table();
  if (name == "auto" || name.empty()) {
    for (int64_t i = static_cast<int64_t>(t.size()) - 1; i > 0; --i)
      if (runs(i)) return t[i];
    return t[0];
  }
  const int64_t i = index_of(name.c_str());
  if (i < 0) {
    std::string names;
    for (const IsaKernels& k : t) names += std::string(", ") + k.name;
    throw std::invalid_argument("unknown isa '" + name + "' (expected auto" + names + ")");
  }
  if (!runs(i)) {
    const std::vector<std::string> ok = runnable_isas();
    throw std::invalid_argument("this CPU cannot run isa '" + name + "' (best available: " + ok.back() + ")");
  }
  return t[i];
}

std::vector<std::string> runnable_isas() {
  std::vector<std::string> names;
  const std::vector<IsaKernels>& t = isa_table();
  for (size_t i = 0; i < t.size(); ++i)
    if (runs(static_cast<int64_t>(i))) names.push_back(t[i].name);
  return names;
}

std::vector<IsaRowInfo> isa_table_info() {
  const std::vector<Row>& r = own_rows();
  const std::vector<IsaKernels>& t = isa_table();
  std::vector<IsaRowInfo> info;
  for (size_t i = 0; i < r.size(); ++i) {
    IsaRowInfo row;
    row.name = r[i].own.name;
    row.base = r[i].base ? r[i].base : "";
    row.runs = runs(static_cast<int64_t>(i));
    // the provider of an entry: the nearest row on the base chain whose own entry it is
#define KT_PROVIDER(e)                                                                  \
  {                                                                                     \
    std::string from;                                                                   \
    for (int64_t j = static_cast<int64_t>(i); j >= 0 && t[i].e; j = r[j].base ? index_of(r[j].base) : -1) \
      if (r[j].own.e == t[i].e) {                                                       \
        from = r[j].own.name;                                                           \
        break;                                                                          \
      }                                                                                 \
    row.providers.emplace_back(#e, from);                                               \
  }
    KT_ISA_ENTRIES(KT_PROVIDER)
#undef KT_PROVIDER
    info.push_back(row);
  }
  return info;
}

}  // namespace moe
}  // namespace kt
