"""Load kt packed experts and run them on the CPU (and GPU) beside a model.

Names are imported on first use, so that `import kt_convert.kt_runtime.format` (the on-disk format, which the
converter uses) does not pull in torch.
"""
if __name__ != "kt_convert.kt_runtime":  # this folder reached on sys.path by its own name: a second copy
    raise ImportError(f"{__name__!r} is the folder of kt_convert.kt_runtime in a source tree: "
                      "import kt_convert.kt_runtime (pip install -e . makes it importable)")

from importlib import import_module as _import_module

_EXPORTS = {
    "load_experts": ".loader",
    "PackedExperts": ".loader",
    "PackedWeightsError": ".format.errors",
    "CPUMoE": ".cpu_moe",
    "HybridMoE": ".hybrid",
    "ExpertStats": ".hybrid.placement",
    "gpu_expert_mask": ".hybrid.placement",
    "inject": ".integrations.transformers",
    "record_routing": ".integrations.transformers",
    "hybrid_layers": ".integrations.transformers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(_import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'kt_convert.kt_runtime' has no attribute {name!r}")


def __dir__():
    """The public names too (they are imported on first use, so they are not in globals() yet)."""
    return sorted(set(globals()) | set(__all__))
