"""Numerics only: source decoders, kt's per-row quantization, AMX tiling, the CPU and GPU packers.

The methods they implement are rows of kt_runtime.format.methods, their byte orders those of
kt_runtime.format.byte_orders (reference.py and staged_dequant.py hold a table keyed by them); the NUMA
split is kt_runtime.format.spec's. No file I/O here.
"""
if __name__ != "kt_convert.quant":  # this folder reached on sys.path by its own name: a second copy
    raise ImportError(f"{__name__!r} is the folder of kt_convert.quant in a source tree: "
                      "import kt_convert.quant (pip install -e . makes it importable)")
