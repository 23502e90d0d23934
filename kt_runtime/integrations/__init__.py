"""Model-framework integrations of the hybrid runtime."""
from .transformers import (HybridExperts, expert_difference, find_expert_modules, hybrid_experts, hybrid_layers, inject,
                           record_routing, swap_experts)

__all__ = ["HybridExperts", "expert_difference", "find_expert_modules", "hybrid_experts", "hybrid_layers", "inject",
           "record_routing", "swap_experts"]
