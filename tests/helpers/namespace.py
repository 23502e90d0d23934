"""The package's folders, and the modules of them loaded under another name than kt_convert.* (the suite's
session-end check in conftest.py, and tests/test_namespace.py)."""
import os
import sys

from . import ROOT

PACKAGE_FOLDERS = ("convert", "quant", "synthetic", "kt_runtime")  # each is the package kt_convert.<folder>


def stray_modules() -> list[str]:
    """Modules loaded from the package's folders under another name than their one name kt_convert.*, or a second
    copy of one: a package folder reached by its own name on sys.path."""
    folders = tuple(os.path.realpath(ROOT / f) + os.sep for f in (*PACKAGE_FOLDERS, "package"))
    stray = []
    for key, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not path or not os.path.realpath(path).startswith(folders):
            continue
        name = getattr(module, "__name__", key)
        if not (name == "kt_convert" or name.startswith("kt_convert.")) or sys.modules.get(name) is not module:
            stray.append(f"{key} ({path})")
    return sorted(stray)
