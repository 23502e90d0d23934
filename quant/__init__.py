"""Numerics only: source decoders, kt's per-row quantization, AMX tiling, the CPU and GPU packers.

The methods they implement are rows of kt_runtime.format.methods, their byte orders those of
kt_runtime.format.byte_orders (reference.py and staged_dequant.py hold a table keyed by them); the NUMA
split is kt_runtime.format.spec's. No file I/O here.
"""
