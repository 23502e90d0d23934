"""Numerics only: source decoders, kt AMXINT4/AMXINT8 quantization, AMX tiling, NUMA split."""
from .methods import INT4, INT8, METHODS, QuantMethod, get_method

__all__ = ["INT4", "INT8", "METHODS", "QuantMethod", "get_method"]
