"""Hybrid MoE: one layer's routed experts split between GPU experts and the CPU engine.

    w = kt_runtime.load_experts(out_dir)
    moe = HybridMoE(w, layer, num_gpu_experts=16, device="cuda", placement="frequency", stats=stats)
    y = moe(x, topk_ids, topk_weights)      # x [T,H] on any device -> [T,H], same device and dtype
    moe.gpu_prefill_token_threshold = 2048  # chunks of 2048+ tokens: every routed expert computed on the GPU

    layer          HybridMoE: the call's two paths (decode, launcher) and dynamic placement
    placement      which experts are on the GPU: strategies, routing statistics, the slot table, the counts
    routing        the split of one call's routing into a CPU part and a GPU part
    gpu_experts    the GPU-resident experts and their eager computation
    decode_graphs  the one-token GPU part as per-slot CUDA graphs
    launcher       the thread that queues the GPU part while the calling thread runs the CPU engine
    gpu_prefill    prefill chunks: the CPU-resident experts streamed to the GPU, dequantized, grouped GEMMs
    prefill_plan   when a call takes the GPU prefill, and its transfer groups within a memory budget
    expert_staging where a layer's packed experts are in the files, and where a transfer group is staged
"""
from .layer import HybridMoE, default_cpu_threads
from .placement import ExpertStats, gpu_expert_mask

__all__ = ["ExpertStats", "HybridMoE", "default_cpu_threads", "gpu_expert_mask"]
