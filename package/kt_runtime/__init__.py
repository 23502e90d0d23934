"""`kt_runtime`, the runtime's former top-level name, kept for code written against it.

`import kt_runtime` and `from kt_runtime.hybrid import HybridMoE` give the modules of kt_convert.kt_runtime
themselves: one module object per file under both names, so classes, errors and isinstance checks agree.
"""
import importlib
import importlib.abc
import importlib.util
import sys

TARGET = "kt_convert.kt_runtime"


class _SameModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds kt_runtime.X as the module kt_convert.kt_runtime.X, importing it under that name if need be."""

    alias_of = TARGET
    prefix = __name__ + "."

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname.startswith(self.prefix) else None

    def create_module(self, spec):
        module = importlib.import_module(TARGET + spec.name[len(__name__):])
        spec.loader_state = module.__spec__  # the import system now sets module.__spec__ = spec
        return module

    def exec_module(self, module):
        if module.__spec__.loader is self:  # give the module its own spec back (reload, relative imports)
            module.__spec__ = module.__spec__.loader_state


if not any(getattr(finder, "alias_of", None) == TARGET for finder in sys.meta_path):
    sys.meta_path.insert(0, _SameModules())
sys.modules[__name__] = importlib.import_module(TARGET)
