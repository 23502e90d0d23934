"""Load kt packed experts and run them on the CPU (and GPU) beside a model."""
from .loader import PackedExperts, PackedWeightsError, load_experts

__all__ = ["PackedExperts", "PackedWeightsError", "load_experts"]
