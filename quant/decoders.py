"""Readable torch references for the non-MXFP4 source formats, decoded to bf16 as kt does.

Each decoder returns the bf16 [N, K] matrix the quantizer sees. Values that are not bf16-exact
after the fp32 decode are rounded once, to nearest even (torch's ``.to(torch.bfloat16)``):

* FP8 block (DeepSeek-V3/R1/V3.1, Kimi-K2, MiniMax-M2, V4-Flash-Base): ``bf16(fp32(w) * s)`` with
  the F32 block scale ``s[n // bn, k // bk]`` (``weight_scale_inv`` is the multiplier), the
  scale grid ``[cdiv(N, bn), cdiv(K, bk)]`` cut to the matrix at the tails;
* FP16: ``bf16(fp32(h))`` (the half -> float step is exact);
* compressed-tensors pack-quantized INT4: ``bf16(fp32(u - 8) * fp32(scale[n, k // g]))``. With the
  usual BF16 scales the fp32 product is exact (4-bit times 8-bit mantissas), so this equals the
  bf16 multiply ktransformers' ``(w - 8).to(bf16) * scale`` does; for F32 scales we define the
  single rounding of the fp32 product;
* NVFP4 (E2M1 codes, one F8_E4M3 scale per 16 columns, one F32 per-tensor scale g):
  ``bf16(fl32(v * t))`` with the group's ``t = fl32(s * g)`` (ModelOpt ``weight_scale_2``, a
  multiplier: modelopt NVFP4QTensor.dequantize) or ``t = fl32(s / g)`` (compressed-tensors
  ``weight_global_scale``, a divisor: compressed_tensors forward_helpers._dequantize);
* MXFP8 (F8_E4M3 codes, one E8M0 scale per 32 columns): ``bf16(fp32(w) * 2^(e-127))`` with the
  scale byte placed in the fp32 exponent field as kt-kernel reads it (0 -> 0, 255 -> inf).
"""
from __future__ import annotations

import numpy as np
import torch


def _tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    return torch.from_numpy(np.array(a, copy=True))  # sources are read-only maps


def e4m3_to_float32(w: np.ndarray | torch.Tensor) -> torch.Tensor:
    """F8_E4M3FN bytes (uint8) -> float32, exact (0x7F/0xFF -> NaN)."""
    return _tensor(w).view(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


def decode_fp8_block(w: np.ndarray | torch.Tensor, scale: np.ndarray | torch.Tensor,
                     block: tuple[int, int], row0: int = 0) -> torch.Tensor:
    """uint8 E4M3 [N, K] + float32 [cdiv(N_all, bn), cdiv(K, bk)] -> bf16 [N, K].

    row0: index of the first row in the scale grid (for a row slice of a larger matrix).
    """
    bn, bk = block
    x = e4m3_to_float32(w)
    n, k = x.shape
    s = _tensor(scale).view(torch.float32)
    rows = (torch.arange(n) + row0) // bn
    cols = torch.arange(k) // bk
    if rows.max() >= s.shape[0] or cols.max() >= s.shape[1]:
        raise ValueError(f"FP8 block scales {tuple(s.shape)} do not cover a {n}x{k} matrix with blocks {block}")
    return (x * s[rows][:, cols]).to(torch.bfloat16)


def decode_f16(w: np.ndarray | torch.Tensor) -> torch.Tensor:
    """IEEE half (uint16 bits or float16) [N, K] -> bf16 [N, K]."""
    t = _tensor(w)
    if t.dtype != torch.float16:
        t = t.view(torch.int16).view(torch.float16)
    return t.to(torch.float32).to(torch.bfloat16)


def unpack_int4_words(packed: np.ndarray | torch.Tensor) -> torch.Tensor:
    """int32 [N, K/8] -> stored nibbles u (0..15) int32 [N, K]; element j of a word at bits 4j."""
    words = _tensor(packed).view(torch.int32)
    shifts = torch.arange(8, dtype=torch.int32) * 4
    u = (words[:, :, None] >> shifts) & 0xF
    return u.reshape(words.shape[0], -1)


def decode_int4_group(packed: np.ndarray | torch.Tensor, scale: np.ndarray | torch.Tensor,
                      group: int, scale_dtype: str = "BF16") -> torch.Tensor:
    """compressed-tensors pack-quantized symmetric INT4 -> bf16 [N, K] (the values rounded to bf16, as kt's
    converters see them).

    scale: [N, K/group], BF16 (uint16 bits or bfloat16) or F32.
    """
    return int4_group_values(packed, scale, group, scale_dtype).to(torch.bfloat16)


def int4_group_values(packed: np.ndarray | torch.Tensor, scale: np.ndarray | torch.Tensor,
                      group: int, scale_dtype: str = "BF16") -> torch.Tensor:
    """compressed-tensors pack-quantized symmetric INT4 -> float32 [N, K]: (u - 8) * scale, exact for bf16
    scales (4 bits times 8)."""
    u = unpack_int4_words(packed)
    s = _tensor(scale)
    if scale_dtype == "BF16":
        s = s.view(torch.int16).view(torch.bfloat16) if s.dtype != torch.bfloat16 else s
    elif scale_dtype != "F32":
        raise ValueError(f"int4 group scales must be BF16 or F32, got {scale_dtype}")
    s = s.to(torch.float32)
    if s.shape[1] * group < u.shape[1]:
        raise ValueError(f"INT4 scales {tuple(s.shape)} do not cover {u.shape[1]} columns with group {group}")
    cols = torch.arange(u.shape[1]) // group
    return (u - 8).to(torch.float32) * s[:, cols]


def nvfp4_group_scales(scale: np.ndarray | torch.Tensor, global_scale: float, divides: bool) -> torch.Tensor:
    """F8_E4M3 bytes [N, K/16] and the per-tensor F32 scale -> the fp32 multiplier of each group."""
    s = e4m3_to_float32(scale)
    g = torch.tensor(global_scale, dtype=torch.float32)
    return s / g if divides else s * g


def decode_nvfp4(packed: np.ndarray | torch.Tensor, scale: np.ndarray | torch.Tensor, global_scale: float,
                 divides: bool) -> torch.Tensor:
    """uint8 [N, K/2] E2M1 codes (low nibble = even column) + F8_E4M3 [N, K/16] + per-tensor scale -> bf16."""
    from .mxfp4 import E2M1_VALUES

    b = _tensor(packed).view(torch.uint8)
    n, k = b.shape[0], 2 * b.shape[1]
    t = nvfp4_group_scales(scale, global_scale, divides)
    if tuple(t.shape) != (n, k // 16):
        raise ValueError(f"NVFP4 scales have shape {tuple(t.shape)}, expected {(n, k // 16)}")
    codes = torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(n, k).long()
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32)[codes]
    return (values * t.repeat_interleave(16, dim=1)).to(torch.bfloat16)


def decode_mxfp8(w: np.ndarray | torch.Tensor, scale: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 F8_E4M3 [N, K] + E8M0 bytes [N, K/32] -> bf16 [N, K]."""
    from .mxfp4 import GROUP, e8m0_to_float32

    x = e4m3_to_float32(w)
    s = e8m0_to_float32(_tensor(scale).view(torch.uint8))
    if tuple(s.shape) != (x.shape[0], x.shape[1] // GROUP):
        raise ValueError(f"MXFP8 scales have shape {tuple(s.shape)}, expected {(x.shape[0], x.shape[1] // GROUP)}")
    return (x * s.repeat_interleave(GROUP, dim=1)).to(torch.bfloat16)


# -- encoders for synthetic checkpoints and tests -------------------------------------------------


def encode_int4_words(u: np.ndarray) -> np.ndarray:
    """Stored nibbles u (0..15) [N, K] -> int32 words [N, K/8] (inverse of unpack_int4_words)."""
    u = np.asarray(u, dtype=np.uint32)
    n, k = u.shape
    words = np.zeros((n, k // 8), dtype=np.uint32)
    for j in range(8):
        words |= u[:, j::8] << np.uint32(4 * j)
    return words.view(np.int32)


def source_values(src) -> torch.Tensor:
    """A quant.cpu.SourceMatrix's own values: compressed-tensors INT4 as the exact products (u - 8) * scale
    (what an output that carries its codes holds), every other format as decode_source decodes it."""
    if src.kind == "int4_group":
        dtype = "BF16" if src.scales.dtype.itemsize == 2 else "F32"
        return int4_group_values(np.ascontiguousarray(src.weight), np.ascontiguousarray(src.scales), src.block[1], dtype)
    return decode_source(src)


def decode_source(src) -> torch.Tensor:
    """A quant.cpu.SourceMatrix (any kind) -> bf16 [N, K]: the matrix the packers quantize, through the
    reference decoders above (what `verify` compares a packed output with)."""
    kind = src.kind
    if kind == "bf16":
        return _tensor(np.ascontiguousarray(src.weight)).view(torch.int16).view(torch.bfloat16)
    if kind == "f32":
        return _tensor(np.ascontiguousarray(src.weight)).to(torch.bfloat16)
    if kind == "f16":
        return decode_f16(np.ascontiguousarray(src.weight))
    if kind == "fp8_block":
        return decode_fp8_block(np.ascontiguousarray(src.weight), src.scales, src.block, src.row0)
    if kind == "int4_group":
        dtype = "BF16" if src.scales.dtype.itemsize == 2 else "F32"
        return decode_int4_group(np.ascontiguousarray(src.weight), np.ascontiguousarray(src.scales), src.block[1], dtype)
    if kind == "mxfp4":
        from .mxfp4 import decode_mxfp4

        return decode_mxfp4(src.weight, src.scales)
    if kind == "nvfp4":
        return decode_nvfp4(np.ascontiguousarray(src.weight), np.ascontiguousarray(src.scales), src.global_scale,
                            src.global_divides)
    if kind == "mxfp8":
        return decode_mxfp8(np.ascontiguousarray(src.weight), np.ascontiguousarray(src.scales))
    raise ValueError(f"unknown source kind {kind!r}")
