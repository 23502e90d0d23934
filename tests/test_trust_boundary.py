"""One trust boundary: no code of the converter, the runtime or the numerics opens, creates, lists, parses
or removes a file except through the file layer of the format room (kt_runtime/format/files.py and the
modules it names), where each access has a declared role. An AST scan of every module, so that a new
`open(...)`, `Path.unlink()` or `json.loads(...)` anywhere else fails here, naming the line."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("convert", "kt_runtime", "quant")
LAYER = {f"kt_runtime/format/{name}.py" for name in ("files", "fsio", "input_files", "hub_cache")}

# module -> functions that touch files by path (or parse JSON text)
BANNED_FUNCTIONS = {
    "os": {"open", "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "link", "symlink",
           "mkdir", "makedirs", "listdir", "scandir", "walk", "mkfifo", "mknod", "truncate", "chmod", "chown"},
    "shutil": {"rmtree", "copy", "copy2", "copyfile", "copytree", "move", "copyfileobj"},
    "json": {"load", "loads"},
    "glob": {"glob", "iglob"},
    "tempfile": {"TemporaryDirectory", "NamedTemporaryFile", "TemporaryFile", "mkstemp", "mkdtemp",
                 "SpooledTemporaryFile"},
    "io": {"open", "FileIO"},
    "np": {"memmap", "load", "fromfile", "save", "savez", "loadtxt"},
    "numpy": {"memmap", "load", "fromfile", "save", "savez", "loadtxt"},
    "torch": {"load", "save"},
    "pickle": {"load", "loads"},
}
# methods of pathlib.Path (and file-like objects) that touch files; none is a str method
BANNED_METHODS = {"open", "read_text", "write_text", "read_bytes", "write_bytes", "unlink", "rmdir", "mkdir", "touch",
                  "iterdir", "glob", "rglob", "rename", "symlink_to", "hardlink_to", "link_to"}
BANNED_BUILTINS = {"open"}


def _modules() -> list[Path]:
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py")
                  if str(p.relative_to(ROOT)) not in LAYER)


def violations(source: str, where: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in BANNED_FUNCTIONS:
            for alias in node.names:
                if alias.name in BANNED_FUNCTIONS[node.module]:
                    found.append(f"{where}:{node.lineno}: from {node.module} import {alias.name}")
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in BANNED_BUILTINS:
            found.append(f"{where}:{node.lineno}: {f.id}(...)")
        elif isinstance(f, ast.Attribute):
            if isinstance(f.value, ast.Name) and f.value.id in BANNED_FUNCTIONS:
                if f.attr in BANNED_FUNCTIONS[f.value.id]:
                    found.append(f"{where}:{node.lineno}: {f.value.id}.{f.attr}(...)")
            elif f.attr in BANNED_METHODS:
                found.append(f"{where}:{node.lineno}: .{f.attr}(...)")
    return found


def test_no_file_access_outside_the_layer():
    found = []
    for path in _modules():
        found += violations(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, "file access outside kt_runtime/format's file layer:\n" + "\n".join(found)


@pytest.mark.parametrize("line", [
    "open('x')", "Path('x').read_text()", "p.write_bytes(b'')", "os.remove(p)", "os.unlink(p)", "p.unlink()",
    "Path(p).open('rb')", "json.loads(s)", "json.load(f)", "shutil.rmtree(p)", "p.iterdir()", "p.glob('*')",
    "os.listdir(p)", "np.memmap(p)", "from os import remove", "tempfile.mkdtemp()", "os.replace(a, b)",
])
def test_the_scan_sees_every_kind_of_access(line):
    assert violations(line, "x.py"), line


@pytest.mark.parametrize("line", ["s.replace('a', 'b')", "os.path.exists(p)", "os.stat(p)", "json.dumps(d)",
                                  "shutil.which('hf')", "os.pread(fd, 1, 0)", "fsio.remove(p)"])
def test_the_scan_leaves_other_calls_alone(line):
    assert not violations(line, "x.py"), line


def test_the_layer_declares_its_roles():
    from kt_convert.kt_runtime.format import files

    roles = {r.name for r in (files.INPUT, files.OUTPUT, files.SHARED, files.RECORD, files.USER)}
    assert roles == {"input checkpoint", "output", "shared output", "record", "user file"}
    assert not files.RECORD.keeps_bad and files.USER.keeps_bad and files.SHARED.one_link
    assert not files.OUTPUT.follow and not files.SHARED.follow and files.INPUT.follow


def retyped(source: str, where: str) -> list[str]:
    """`except ... as e: raise Other(str(e))` (or f"{e}"): an error raised again under another type with the
    same message, which the one error root makes needless."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ExceptHandler) or node.name is None:
            continue
        for inner in ast.walk(node):
            if not (isinstance(inner, ast.Raise) and isinstance(inner.exc, ast.Call) and len(inner.exc.args) == 1):
                continue
            arg = inner.exc.args[0]
            same = (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Name) and arg.func.id == "str"
                    and len(arg.args) == 1 and isinstance(arg.args[0], ast.Name) and arg.args[0].id == node.name)
            same |= (isinstance(arg, ast.JoinedStr) and len(arg.values) == 1
                     and isinstance(arg.values[0], ast.FormattedValue)
                     and isinstance(arg.values[0].value, ast.Name) and arg.values[0].value.id == node.name)
            if same:
                found.append(f"{where}:{inner.lineno}")
    return found


def test_the_converter_never_raises_an_error_again_only_to_change_its_type():
    found = []
    for path in sorted((ROOT / "convert").rglob("*.py")):
        found += retyped(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, "an error raised again with the same message under another type:\n" + "\n".join(found)
    assert retyped("try:\n    f()\nexcept ValueError as e:\n    raise UserError(str(e)) from None\n", "x.py")
    assert retyped("try:\n    f()\nexcept ValueError as e:\n    raise UserError(f'{e}')\n", "x.py")
    assert not retyped("try:\n    f()\nexcept ValueError as e:\n    raise UserError(f'{e}; re-run')\n", "x.py")
