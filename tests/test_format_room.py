"""kt_runtime.format, the on-disk format's own package: torch-free, one error base class."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_importing_the_format_loads_no_engine():
    code = ("import sys, kt_convert.kt_runtime.format, kt_convert.kt_runtime.format.names, "
            "kt_convert.kt_runtime.format.byte_orders, "
            "kt_convert.kt_runtime.format.methods, kt_convert.kt_runtime.format.spec, "
            "kt_convert.kt_runtime.format.manifest, "
            "kt_convert.kt_runtime.format.safetensors_file, kt_convert.kt_runtime.format.fsio, "
            "kt_convert.kt_runtime.format.input_files, "
            "kt_convert.kt_runtime.format.json_fields, kt_convert.kt_runtime.format.digest, "
            "kt_convert.kt_runtime.format.reader, kt_convert.kt_runtime.format.writer\n"
            "bad = sorted(m for m in ('torch', 'triton', 'kt_convert.kt_kernels', 'kt_convert.convert', "
            "'kt_convert.quant', 'kt_convert.kt_runtime.cpu_moe', "
            "'kt_convert.kt_runtime.loader', 'kt_convert.kt_runtime.hybrid') if m in sys.modules)\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing kt_runtime.format loaded {out.stdout.strip()}"


@pytest.mark.parametrize("name", ["SafetensorsFormatError", "SafetensorsChangedError", "ManifestError",
                                  "PackedWeightsError", "UnsafePathError", "InputFileError", "FieldError"])
def test_every_format_error_derives_from_one_base(name):
    from kt_convert import kt_runtime
    from kt_convert.kt_runtime import format as room

    cls = getattr(room, name)
    assert issubclass(cls, room.PackedFormatError) and issubclass(cls, ValueError)
    if name == "PackedWeightsError":
        assert kt_runtime.PackedWeightsError is cls


# -- the method table -------------------------------------------------------------------------------

def test_method_rows_and_what_reads_them():
    from kt_convert.convert.cli.conversion import convert_command as cli
    from kt_convert.kt_runtime.format.methods import CHOICES, INT4, INT8, METHODS, get_method
    from kt_convert.kt_runtime.format.names import KT_FOLDERS

    assert (INT4.bits, INT4.levels, INT4.n_block, INT4.k_align, INT4.kt_method, INT4.kt_file_prefix) == \
        (4, 112, 128, 128, "AMXINT4", "INT4")
    assert (INT8.bits, INT8.levels, INT8.n_block, INT8.k_align, INT8.kt_method, INT8.kt_file_prefix) == \
        (8, 127, 64, 64, "AMXINT8", "INT8")
    assert INT4.weight_bytes(128, 256) == 128 * 128 and INT8.weight_bytes(64, 64) == 64 * 64
    assert INT4.k_block_bytes == 1792 and INT8.k_block_bytes == 3584
    tiled = [m for m in METHODS.values() if m.byte_order.output_problem(m, KT_FOLDERS, None, "") is None]
    assert len({m.kt_file_prefix for m in tiled}) == len({m.kt_method for m in tiled}) == len(tiled)
    assert get_method("INT8") is INT8
    with pytest.raises(ValueError, match="unknown quant method 'int3'"):
        get_method("int3")
    option = next(p for p in cli.params if p.name == "quant_method")
    assert list(option.type.choices) == list(CHOICES) == ["int4", "int8", "rawint4"]


@pytest.mark.parametrize("H,I,T,method,problem", [
    (384, 512, 2, "int4", None), (384, 512, 4, "int4", None), (384, 512, 8, "int4", "512 / 8 = 64 is not a multiple of 128"),
    (384, 512, 8, "int8", None), (384, 512, 3, "int8", "not divisible by threadpool_count 3"),
    (320, 512, 1, "int4", "hidden_size 320 is not a multiple of 128"), (320, 512, 1, "int8", None),
])
def test_one_alignment_rule(H, I, T, method, problem):
    from kt_convert.kt_runtime.format.methods import alignment_problem, get_method, working_threadpool_counts

    got = alignment_problem(get_method(method), H, I, T)
    assert (got is None) if problem is None else (problem in got)
    assert (T in working_threadpool_counts(get_method(method), H, I)) == (problem is None)


def test_names_and_their_parsers_agree():
    from kt_convert.kt_runtime.format.byte_orders import MergedKey, merged_key, parse_merged_key
    from kt_convert.kt_runtime.format.spec import KtFileName, kt_file_names, parse_kt_file_name
    from kt_convert.kt_runtime.format.methods import INT4, INT8

    assert merged_key(3, "down", 17, 1, "scale") == "blk.3.ffn_down_exps.17.numa.1.scale"
    assert parse_merged_key("blk.3.ffn_down_exps.17.numa.1.scale") == MergedKey(3, "down", 17, 1, "scale")
    assert parse_merged_key("blk.3.ffn_down_exps.17.numa.1.bias") is None
    quant, scale = kt_file_names("int4", "gate", 5, 32768, 256)
    assert (quant, scale) == ("INT4_gate_5_32768Byte_quant_.kt", "INT4_gate_5_1024Byte_scale_.kt")
    assert parse_kt_file_name(quant) == KtFileName(INT4, "gate", 5, 32768, "quant")
    assert parse_kt_file_name("INT8_up_0_64Byte_scale_.kt") == KtFileName(INT8, "up", 0, 64, "scale")
    assert parse_kt_file_name("INT3_up_0_64Byte_scale_.kt") is None


@pytest.mark.parametrize("method,T", [("int4", 1), ("int4", 2), ("int8", 4)])
def test_layer_sizes_one_way(method, T):
    """layer_data_bytes (computed) equals the tensors of layer_entries, and the sum written out by hand."""
    from kt_convert.kt_runtime.format.spec import PackedSpec
    from kt_convert.kt_runtime.format.safetensors_file import tensor_nbytes

    H, I, E = 384, 512, 3
    spec = PackedSpec(method, T, H, I, E, 2, (0, 1))
    entries = spec.layer_entries(1)
    assert len(entries) == E * 3 * T * 2 and len(spec.kt_layer_files(1)) == len(entries)
    per_byte = 2 if method == "int4" else 1
    by_hand = E * T * ((2 * (I // T) * H + H * (I // T)) // per_byte + 4 * (2 * (I // T) + H))
    assert spec.layer_data_bytes() == sum(tensor_nbytes(d, s) for _, d, s in entries) == by_hand


def test_shard_metadata_is_written_and_checked_by_one_pair():
    from kt_convert.kt_runtime.format.manifest import LayerRecord, Manifest, shard_metadata, shard_metadata_problem

    m = Manifest(method="int8", threadpool_count=2, hidden_size=384, moe_intermediate_size=512, num_experts=4,
                 num_experts_per_tok=2, layers=[0, 1], layout="merged", swiglu_limit=7.0,
                 source={"fingerprint": "f" * 64}, converter_version="9.9")
    meta = shard_metadata(m, 1, "a" * 64)
    assert list(meta) == ["format", "kt_format_version", "kt_method", "quant_method", "threadpool_count", "hidden_size",
                          "moe_intermediate_size", "num_experts", "num_experts_per_tok", "layer", "activation",
                          "swiglu_limit", "source_sha256", "converter_version"]
    assert meta["kt_method"] == "AMXINT8" and meta["layer"] == "1" and meta["swiglu_limit"] == "7.0"
    assert meta["source_sha256"] == "a" * 64 and "f" * 64 not in meta.values()  # the content, not the stat
    m.completed[1] = LayerRecord(1, ["x.safetensors"], 0, "0" * 64, source_sha256="a" * 64)
    assert shard_metadata_problem(meta, m.spec, 1, m) is None
    m.completed[1].source_sha256 = "b" * 64
    assert "source_sha256 is " + repr("a" * 64) + " but the manifest says " + repr("b" * 64) in \
        shard_metadata_problem(meta, m.spec, 1, m)
    # a layer recorded by a converter before source_sha256: its shard carried the manifest's source fingerprint
    m.completed[1].source_sha256 = None
    legacy = {**{k: v for k, v in meta.items() if k != "source_sha256"}, "source_fingerprint": "f" * 64}
    assert shard_metadata_problem(legacy, m.spec, 1, m) is None
    assert "source_fingerprint is None" in shard_metadata_problem(meta, m.spec, 1, m)
    m.completed[1].source_sha256 = "a" * 64
    assert shard_metadata_problem({**meta, "converter_version": "0.0"}, m.spec, 1, m) is None
    assert "layer is '1' but the manifest says '0'" in shard_metadata_problem(meta, m.spec, 0, m)
    no_limit = {k: v for k, v in meta.items() if k != "swiglu_limit"}
    assert "swiglu_limit is None" in shard_metadata_problem(no_limit, m.spec, 1, m)
    # without a manifest: only what the tensors determine, and only where present
    assert shard_metadata_problem({"layer": "1", "activation": "gelu"}, m.spec, 1, None) is None
    assert "tensors say '2'" in shard_metadata_problem({"threadpool_count": "1"}, m.spec, 1, None)


def test_kernels_hold_the_same_method_table():
    """kernels_cpp's method_info (the packer's and the engine's constants) agrees with every row."""
    from kt_convert import kt_kernels

    from kt_convert.kt_runtime.format.byte_orders import AMX_TILED
    from kt_convert.kt_runtime.format.methods import FP32_RECIPROCAL, METHODS

    for m in METHODS.values():
        assert (m.byte_order is AMX_TILED) == (m.group_size is None) == (m.scale_dtype == "F32")
        assert kt_kernels.method_info(m.name) == {
            "n_block": m.n_block, "k_align": m.k_align, "elems_per_byte": m.elems_per_byte, "levels": m.levels,
            "fp32_reciprocal": m.scale_arithmetic == FP32_RECIPROCAL, "group_size": m.group_size or 0}, m.name
    with pytest.raises(ValueError, match="unknown quant method"):
        kt_kernels.method_info("int3")


def test_the_converter_and_the_generators_never_import_the_engine():
    """convert (the CLI and the pipeline) and synthetic read and write through kt_runtime.format only: no
    CPU/GPU engine, no loader, no torch, when they are imported."""
    code = ("import sys, kt_convert.convert.cli, kt_convert.convert.pipeline, kt_convert.convert.verify, "
            "kt_convert.synthetic as synthetic\n"
            "bad = sorted(m for m in ('torch', 'triton', 'kt_convert.kt_runtime.cpu_moe', "
            "'kt_convert.kt_runtime.hybrid', "
            "'kt_convert.kt_runtime.loader', 'kt_convert.kt_runtime.reference', 'kt_convert.kt_runtime.integrations') "
            "if m in sys.modules)\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the converter imported {out.stdout.strip()}"


# -- the layers: which package may import which (docs/ARCHITECTURE.md), every import statement counted,
# those inside functions too, so that a lazy import cannot cross a layer unseen ---------------------------

FORMAT, QUANT, ENGINE, CONVERTER, SYNTHETIC, TOP, KERNELS = (
    "format", "quant", "engine", "converter", "synthetic", "commands", "kt_kernels")
MAY_IMPORT = {
    FORMAT: set(),  # the packed format: the bottom, torch-free
    QUANT: {FORMAT, KERNELS},  # numerics
    ENGINE: {FORMAT, QUANT, KERNELS},  # the runtime: loader face, CPU engine, hybrid, integrations
    CONVERTER: {FORMAT, QUANT, KERNELS},  # never the engine: outputs are read back through the format
    SYNTHETIC: {FORMAT, QUANT},  # the tests' oracle
    TOP: {FORMAT, QUANT, KERNELS, ENGINE, CONVERTER},  # the commands (click) and eval, which runs the engine
}
NO_TORCH = {FORMAT}  # layers that never import torch or triton, not even in a function


def layer_of(module: str) -> str | None:
    """The layer of a project module (None: not the project's)."""
    if not module.startswith("kt_convert."):
        return None
    top = module.split(".")[1]
    if module == "kt_convert.kt_runtime.format" or module.startswith("kt_convert.kt_runtime.format."):
        return FORMAT
    if module in ("kt_convert.__main__", "kt_convert.convert.cli",
                  "kt_convert.convert.eval") or module.startswith(("kt_convert.convert.cli.",
                                                                                         "kt_convert.convert.eval.")):
        return TOP
    return {"kt_runtime": ENGINE, "convert": CONVERTER, "quant": QUANT, "synthetic": SYNTHETIC,
            "kt_kernels": KERNELS}.get(top)


def _is_module(name: str) -> bool:
    if name == "kt_convert.kt_kernels":  # the extension
        return True
    path = ROOT / Path(*name.removeprefix("kt_convert.").split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every import of `source` (the module `module`), at any depth: module level,
    functions, methods, conditionals; relative imports resolved; `from P import name` as P.name where that
    is a module, else P; importlib.import_module / __import__ of a constant name."""
    import ast

    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                name = f"{base}.{alias.name}"
                found.append((node.lineno, name if _is_module(name) else base))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module"))
                   or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"))):
            name = node.args[0].value
            found.append((node.lineno, f"{package}{name}" if name.startswith(".") else name))
    return sorted(set(found))


def layering_problems(source: str, module: str, is_package: bool = False) -> list[str]:
    here = layer_of(module)
    problems = []
    for line, name in imported_modules(source, module, is_package):
        there = layer_of(name)
        if here in NO_TORCH and name.split(".")[0] in ("torch", "triton"):
            problems.append(f"{module}:{line} imports {name} ({here} is torch-free)")
        if there is not None and there != here and there not in MAY_IMPORT[here]:
            problems.append(f"{module}:{line} imports {name} ({here} may not import {there})")
    return problems


def test_imports_go_one_way():
    """Every module of the project against the layer table, with the imports inside its functions."""
    problems = []
    for package in ("kt_runtime", "quant", "convert", "synthetic"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            module = ".".join(("kt_convert", *(parts[:-1] if is_package else parts)))
            problems += layering_problems(path.read_text(), module, is_package)
    assert not problems, "imports against docs/ARCHITECTURE.md's layers:\n" + "\n".join(problems)


@pytest.mark.parametrize("module,source,crosses", [
    ("kt_convert.convert.verify", "def f():\n    from kt_convert.kt_runtime.loader import load_experts\n",
     True),  # lazy, in a function
    ("kt_convert.convert.verify", "class A:\n    def f(self):\n        import kt_convert.kt_runtime.hybrid\n", True),
    ("kt_convert.convert.pipeline", "def f():\n    if x:\n        from .cli import main\n", True),  # a command, upward
    ("kt_convert.convert.plan", "from kt_convert import kt_runtime\n", True),  # the engine's package face
    ("kt_convert.kt_runtime.format.reader", "def f():\n    from kt_convert.quant.reference import dequantize_expert\n",
     True),
    ("kt_convert.kt_runtime.format.spec", "def f():\n    import torch\n", True),
    ("kt_convert.kt_runtime.loader", "def f():\n    from kt_convert.convert.plan import build_plan\n", True),
    ("kt_convert.quant.reference",
     "import importlib\ndef f():\n    importlib.import_module('kt_convert.kt_runtime.cpu_moe')\n", True),
    ("kt_convert.convert.verify", "def f():\n    from kt_convert.kt_runtime.format.reader import open_output\n", False),
    ("kt_convert.convert.eval.evaluate", "def f():\n    from kt_convert.kt_runtime.integrations import swap_experts\n",
     False),
    ("kt_convert.convert.cli.verify", "def f():\n    from ..verify import verify\n", False),
    ("kt_convert.kt_runtime.loader", "def f():\n    from kt_convert.quant.reference import dequantize_expert\n", False),
])
def test_the_layer_check_sees_lazy_imports(module, source, crosses):
    assert bool(layering_problems(source, module)) == crosses


def test_tests_share_through_helpers_only():
    """A test module imports no other test module and nothing from conftest.py (its fixtures reach the tests by
    name): what tests share is in tests/helpers."""
    tests = ROOT / "tests"
    local = {p.stem for p in tests.glob("*.py")}
    problems = [f"{path.name}:{line} imports {name}"
                for path in sorted([*tests.glob("*.py"), *(tests / "helpers").glob("*.py")])
                for line, name in imported_modules(path.read_text(), path.stem)
                if name.split(".")[0] in local]
    assert not problems, "\n".join(problems)
    assert imported_modules("def f():\n    from test_download import hub_env\n", "test_x") == [(2, "test_download")]


def test_a_byte_order_of_its_own_is_all_the_format_needs(tmp_path, monkeypatch):
    """An imaginary method whose bytes lie in an order of its own (whole row-major int8 matrices under keys of
    its own, a third tensor per pair checked when read): its row and its ByteOrder alone, and the format's
    writer, manifest and reader handle it, with no branch on the method anywhere in them."""
    import numpy as np

    from kt_convert.kt_runtime.format import methods
    from kt_convert.kt_runtime.format.byte_orders import ByteOrder
    from kt_convert.kt_runtime.format.errors import PackedWeightsError
    from kt_convert.kt_runtime.format.manifest import Manifest, shard_metadata, write_manifest
    from kt_convert.kt_runtime.format.reader import open_output
    from kt_convert.kt_runtime.format.writer import MergedShardWriter

    class RowMajor(ByteOrder):
        name = "row-major"
        numa_split = False
        cuda_packer = False

        def scale_count(self, method, n, k):
            return n

        def pair_entries(self, method, layer, proj, expert, numa, n, k):
            base = f"rows.{layer}.{expert}.{proj}"
            return [(f"{base}.q", "I8", (n, k)), (f"{base}.s", "F32", (n,)), (f"{base}.k", "I64", (1,))]

        def pair_arrays(self, entries, weight, scale, n, k):
            return [*super().pair_arrays(entries, weight, scale, n, k), (entries[2][0], np.array([k]))]

        def pair_problem(self, entries, arrays, n, k):
            return None if int(arrays[2][0]) == k else f"tensor {entries[2][0]} says K = {int(arrays[2][0])}"

    order = RowMajor()
    monkeypatch.setattr(methods, "BYTE_ORDERS", (*methods.BYTE_ORDERS, order))
    row = methods.QuantMethod("int8-rows", "ROWINT8", "", bits=8, levels=127, scale_arithmetic=methods.FP32_RECIPROCAL,
                              byte_order=order, n_block=1, k_align=64)
    monkeypatch.setitem(methods.METHODS, row.name, row)
    H, I, E = 128, 64, 2
    m = Manifest(method=row.name, threadpool_count=1, hidden_size=H, moe_intermediate_size=I, num_experts=E,
                 num_experts_per_tok=1, layers=[0], layout="merged", converter_version="test")
    spec = m.spec
    assert spec.layer_data_bytes() == E * (2 * (I * H + 4 * I + 8) + H * I + 4 * H + 8)
    writer = MergedShardWriter(tmp_path, "model-00001-of-00001.safetensors", 0, spec.layer_entries(0),
                               lambda source: shard_metadata(m, 0, source), spec=spec)
    rng = np.random.default_rng(0)
    written = {}
    for expert in range(E):
        for proj in ("gate", "up", "down"):
            n, k = spec.shard_shape(proj)
            written[expert, proj] = (rng.integers(-127, 128, (n, k), dtype=np.int8), rng.random(n, dtype=np.float32))
            writer.write_pair(proj, expert, 0, *written[expert, proj])
    writer.set_source("a" * 64)
    m.completed[0] = writer.commit()
    m.complete = True
    write_manifest(tmp_path, m)
    out = open_output(tmp_path, verify=True)
    for (expert, proj), (q, s) in written.items():
        got_q, got_s = out.expert_tensors(0, expert, proj, 0)
        assert np.array_equal(got_q.view(np.int8).reshape(q.shape), q) and np.array_equal(got_s, s)
    # the order's read check runs: a third tensor that lies is refused by name
    monkeypatch.setattr(RowMajor, "pair_problem", lambda self, entries, arrays, n, k: f"tensor {entries[2][0]} lies")
    with pytest.raises(PackedWeightsError, match=r"rows\.0\.0\.gate\.k lies: the output is damaged"):
        open_output(tmp_path, verify=False)
