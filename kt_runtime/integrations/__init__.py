"""Model-framework integrations of the hybrid runtime."""
from .transformers import HybridExperts, find_expert_modules, hybrid_layers, inject, record_routing

__all__ = ["HybridExperts", "find_expert_modules", "hybrid_layers", "inject", "record_routing"]
