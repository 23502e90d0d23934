"""Numerics only: source decoders, kt's per-row quantization, AMX tiling, the CPU and GPU packers.

The methods they implement are rows of kt_runtime.format.methods; the NUMA split is
kt_runtime.format.layout's. No file I/O here.
"""
