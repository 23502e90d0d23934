"""scripts/kt_compat.py, the harness that runs the real kt-kernel in child processes, as a module."""
import importlib.util
import sys

from . import ROOT


def kt_compat():
    """scripts/kt_compat.py as a module (it never imports kt-kernel into this process)."""
    if "kt_compat" not in sys.modules:
        spec = importlib.util.spec_from_file_location("kt_compat", ROOT / "scripts" / "kt_compat.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["kt_compat"] = module
        spec.loader.exec_module(module)
    return sys.modules["kt_compat"]
