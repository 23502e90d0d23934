"""One import name: the wheel installs kt_convert (and `kt_runtime`, an alias of kt_convert.kt_runtime), each
repository folder is one of its subpackages, and every module is loaded under that one name, even with the
repository root on sys.path, where the folders' own names would load a second copy of each module."""
from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
import types

import pytest

from helpers import ROOT
from helpers.namespace import PACKAGE_FOLDERS, stray_modules

IMPORT_ALL = """
import importlib, json, sys
sys.path.insert(1, {tests!r})
from helpers import ROOT
from helpers.namespace import PACKAGE_FOLDERS, stray_modules
names = sorted(".".join(("kt_convert",) + p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for f in PACKAGE_FOLDERS for p in (ROOT / f).rglob("*.py") if p.name != "__main__.py")
imported, missing = [], {{}}
for name in names:
    try:
        importlib.import_module(name)
        imported.append(name)
    except ImportError as e:  # a third-party module this machine lacks (triton without a GPU)
        missing[name] = e.name
import kt_runtime, kt_runtime.loader, kt_runtime.hybrid.placement
print(json.dumps({{"names": names, "imported": imported, "missing": missing, "stray": stray_modules(),
                   "cwd_first": sys.path[0] == ""}}))
"""


def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_every_module_loads_under_its_one_name_with_the_source_tree_on_sys_path():
    r = run_python(IMPORT_ALL.format(tests=str(ROOT / "tests")), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["cwd_first"]  # the repository root is sys.path[0]: convert/, quant/, ... are importable by name
    assert out["stray"] == []
    assert set(out["missing"].values()) <= {"triton"}, out["missing"]
    assert len(out["imported"]) == len(out["names"]) - len(out["missing"]) > 50
    assert {"kt_convert.convert.pipeline", "kt_convert.kt_runtime.format.manifest", "kt_convert.quant.cpu",
            "kt_convert.synthetic.families"} <= set(out["imported"])


def test_the_check_sees_a_module_loaded_a_second_time(monkeypatch):
    copy = types.ModuleType("convert.units")
    copy.__file__ = str(ROOT / "convert" / "units.py")
    monkeypatch.setitem(sys.modules, "convert.units", copy)
    assert stray_modules() == [f"convert.units ({copy.__file__})"]


@pytest.mark.parametrize("folder", PACKAGE_FOLDERS)
def test_a_folder_loaded_by_its_own_name_refuses(folder):
    spec = importlib.util.spec_from_file_location(folder, ROOT / folder / "__init__.py")
    with pytest.raises(ImportError, match=rf"^'{folder}' is the folder of kt_convert\.{folder} in a source tree: "
                                          rf"import kt_convert\.{folder} \(pip install -e \. makes it importable\)$"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_import_convert_in_the_source_tree_refuses():
    r = run_python("import convert", cwd=ROOT)  # the repository root is sys.path[0]
    assert r.returncode == 1 and "ImportError: 'convert' is the folder of kt_convert.convert" in r.stderr, r.stderr


def test_kt_runtime_is_kt_convert_kt_runtime_under_its_former_name(tmp_path):
    code = """
import sys
import kt_runtime
import kt_runtime.loader
from kt_runtime.format.errors import PackedWeightsError as E1
import kt_convert.kt_runtime as runtime
from kt_convert.kt_runtime.format.errors import PackedWeightsError as E2
loader = sys.modules["kt_convert.kt_runtime.loader"]
assert kt_runtime is runtime and kt_runtime.loader is loader and sys.modules["kt_runtime.loader"] is loader
assert E1 is E2 and kt_runtime.PackedWeightsError is E2
assert loader.__name__ == loader.__spec__.name == "kt_convert.kt_runtime.loader", loader.__spec__
assert kt_runtime.__name__ == "kt_convert.kt_runtime" and kt_runtime.load_experts is loader.load_experts
print("same")
"""
    r = run_python(code, cwd=tmp_path)  # outside the repository: the installed names only
    assert r.returncode == 0 and r.stdout.strip() == "same", r.stderr


def test_python_m_kt_convert_is_the_program():
    r = subprocess.run([sys.executable, "-m", "kt_convert", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("Usage: convert-cpu-weights"), r.stdout + r.stderr


def test_the_wheel_maps_every_package_folder_into_kt_convert():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["scikit-build"]["wheel"]["packages"]
    assert packages == {"kt_convert": "package/kt_convert", "kt_runtime": "package/kt_runtime",
                        **{f"kt_convert/{f}": f for f in PACKAGE_FOLDERS}}
    # a new package folder at the top would be left out of the wheel (and importable by its own name only)
    folders = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert folders == sorted(PACKAGE_FOLDERS)
    assert re.search(r"install\(TARGETS kt_kernels LIBRARY DESTINATION kt_convert\)", (ROOT / "CMakeLists.txt").read_text())
    assert project["project"]["scripts"] == {"convert-cpu-weights": "kt_convert.convert.cli:main"}
    assert "scikit-build-core>=0.10" in project["build-system"]["requires"]  # the table form of wheel.packages


def test_safetensors_is_a_test_dependency_only():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("safetensors") for d in project["dependencies"])
    assert any(d.startswith("safetensors") for d in project["optional-dependencies"]["test"])
    imports = []
    for folder in PACKAGE_FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                imports += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "safetensors"]
    assert imports == []
