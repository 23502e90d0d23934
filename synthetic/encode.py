"""Encoders from float weights into the quantized source formats (the inverse of quant.decoders), to make
FP8 and MXFP4 checkpoints of a model with learned weights: decoding the result with the reference decoders
gives the weights a checkpoint in that format would hold.

* FP8 block (DeepSeek-V3 / Qwen3-FP8): per block of bn x bk, scale = amax / 448 (float32), weight =
  round-to-nearest-even E4M3 of w / scale (torch's float8_e4m3fn cast). An all-zero block gets scale 1.
* MXFP4 (OCP MX: E2M1 elements, an E8M0 scale per 32): scale 2^(floor(log2 amax) - 2) (E2M1's largest
  exponent is 2), each element the nearest E2M1 value of w / scale (ties to the even code), clamped to
  +-6; low nibble = even column. An all-zero group gets the scale byte 0x7F (1.0).
"""
from __future__ import annotations

import json
import pathlib
import re

import numpy as np

E4M3_MAX = 448.0
MX_GROUP = 32
_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)


def encode_fp8_block(w, block: tuple[int, int] = (128, 128)) -> dict[str, np.ndarray]:
    """float [N, K] -> {"weight": uint8 E4M3 bits [N, K], "scale": float32 [cdiv(N, bn), cdiv(K, bk)]}."""
    import torch

    x = torch.as_tensor(np.asarray(w, dtype=np.float32))
    n, k = x.shape
    bn, bk = block
    gn, gk = -(-n // bn), -(-k // bk)
    padded = torch.zeros(gn * bn, gk * bk)
    padded[:n, :k] = x
    amax = padded.abs().reshape(gn, bn, gk, bk).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones(()))
    y = x / scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    q = y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return {"weight": q.view(torch.uint8).numpy(), "scale": scale.to(torch.float32).numpy()}


def encode_mxfp4(w) -> dict[str, np.ndarray]:
    """float [N, K] (K a multiple of 32) -> {"weight": uint8 [N, K/2], "scale": uint8 E8M0 [N, K/32]}."""
    x = np.asarray(w, dtype=np.float32)
    n, k = x.shape
    if k % MX_GROUP:
        raise ValueError(f"MXFP4 needs K a multiple of {MX_GROUP}, got {k}")
    groups = x.reshape(n, k // MX_GROUP, MX_GROUP)
    amax = np.abs(groups).max(-1)
    with np.errstate(divide="ignore"):
        exp = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2, 0).astype(np.int32)
    exp = np.clip(exp, -127, 127)
    y = np.abs(groups) / np.ldexp(np.float32(1.0), exp)[..., None]
    # nearest E2M1 magnitude; on a tie the even code (the one with mantissa bit 0)
    dist = np.abs(y[..., None] - _E2M1)
    best = dist.min(-1, keepdims=True)
    ties = dist == best
    even_ties = ties & (np.arange(8) % 2 == 0)
    codes = np.where(even_ties.any(-1), np.argmax(even_ties, -1), np.argmax(ties, -1))
    codes = codes.astype(np.uint8) | np.where(np.signbit(groups) & (codes > 0), 8, 0).astype(np.uint8)
    codes = codes.reshape(n, k)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return {"weight": packed.astype(np.uint8), "scale": (exp + 127).astype(np.uint8)}


ENCODINGS = ("fp8_block", "mxfp4")
# the per-expert projections of a transformers save (Qwen3-MoE, DeepSeek-V3, GLM-4.5: mlp.experts.E.*_proj)
_EXPERT_WEIGHT = re.compile(r"\.experts\.\d+\.(gate|up|down)_proj\.weight$")
_MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
_MODEL_FILE_MAX_BYTES = 256 << 20
FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                           "weight_block_size": [128, 128]}


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def requantize_checkpoint(src, encoded, decoded, encoding: str) -> int:
    """From a BF16 checkpoint in one model.safetensors with per-expert keys (transformers' save of a MoE
    model), write two new folders: `encoded`, the same model with its routed experts in `encoding`
    (fp8_block: F8_E4M3 `.weight` + F32 `.weight_scale_inv`, blocks of 128 x 128 named in config.json's
    quantization_config; mxfp4: U8 `.weight` + E8M0 `.weight_scale`), and `decoded`, a BF16 checkpoint whose
    experts are what the reference decoders make of them: the model a checkpoint in that format is. The other
    tensors, config and tokenizer are copied. Returns the number of expert matrices encoded."""
    import torch

    from kt_convert.kt_runtime.format.fsio import atomic_write_bytes, atomic_write_text
    from kt_convert.kt_runtime.format.input_files import CONFIG_MAX_BYTES, read_capped, read_json
    from kt_convert.kt_runtime.format.safetensors_file import SafetensorsFile, save_file
    from kt_convert.quant.decoders import decode_fp8_block
    from kt_convert.quant.mxfp4 import decode_mxfp4

    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
    src, encoded, decoded = pathlib.Path(src), pathlib.Path(encoded), pathlib.Path(decoded)
    st = SafetensorsFile(src / "model.safetensors")
    enc_tensors, dec_tensors, count = {}, {}, 0
    try:
        for key in st.keys():
            info = st.tensors[key]
            if not (_EXPERT_WEIGHT.search(key) and info.dtype == "BF16"):
                enc_tensors[key] = dec_tensors[key] = (info.dtype, info.shape, st.read(key))
                continue
            w = bf16_to_float32(st.read(key))
            if encoding == "fp8_block":
                e = encode_fp8_block(w)
                enc_tensors[key] = ("F8_E4M3", w.shape, e["weight"])
                enc_tensors[key + "_scale_inv"] = ("F32", e["scale"].shape, e["scale"])
                back = decode_fp8_block(e["weight"], e["scale"], (128, 128))
            else:
                e = encode_mxfp4(w)
                enc_tensors[key] = ("U8", e["weight"].shape, e["weight"])
                enc_tensors[key + "_scale"] = ("U8", e["scale"].shape, e["scale"])
                back = decode_mxfp4(e["weight"], e["scale"])
            dec_tensors[key] = ("BF16", w.shape, back.view(torch.int16).numpy().view(np.uint16))
            count += 1
    finally:
        st.close()
    config = read_json(src / "config.json", what="config.json", max_bytes=CONFIG_MAX_BYTES)
    for folder, tensors, cfg in (
            (encoded, enc_tensors, {**config, **({"quantization_config": FP8_QUANTIZATION_CONFIG}
                                                 if encoding == "fp8_block" else {})}),
            (decoded, dec_tensors, config)):
        folder.mkdir(parents=True)
        save_file(folder / "model.safetensors", tensors)
        atomic_write_text(folder / "config.json", json.dumps(cfg, indent=2) + "\n")
        for name in _MODEL_FILES:
            if (src / name).is_file():
                atomic_write_bytes(folder / name, read_capped(src / name, _MODEL_FILE_MAX_BYTES, what=name))
    return count
