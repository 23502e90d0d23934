"""Synthetic checkpoints of every supported MoE family (docs/FORMAT.md §6), with the real
key names, dtypes, prefixes and config.json fields, small random contents, and the traps:
dense first layers, shared experts, routers with correction biases, MTP layers, ``text_config``
nesting, fused / transposed / interleaved expert tensors, FP8 block grids with partial blocks.

Each routed-expert matrix is drawn in its *source encoding* (a source format of
quant.source_formats: BF16 bits, FP16, FP8 + block scales, compressed-tensors INT4 words + scales,
MXFP4 nibbles + E8M0) and then laid out the way the family
stores it. :meth:`FamilyCheckpoint.reference` decodes the per-expert encoding with the torch
reference decoders, without any of the converter's arrangement code: the test oracle.

DeepSeek-V4-Flash MXFP4 checkpoints come from :mod:`synthetic.v4_flash`.
"""
from __future__ import annotations

import json
import pathlib
import zlib
from dataclasses import dataclass, field

import numpy as np

from kt_convert.kt_runtime.format.safetensors_file import save_file
from kt_convert.quant.source_formats import input_type_of

__all__ = ["VARIANTS", "FamilyCheckpoint", "make_family_checkpoint"]

PROJS = {"gate": 0, "up": 1, "down": 2}


@dataclass(frozen=True)
class Variant:
    family: str  # converter family it must be detected as
    model_type: str
    encoding: str  # a quant.source_formats kind: bf16 | f16 | fp8_block | int4_group | mxfp4
    arrangement: str  # per-expert | fused | fused-transposed | gpt-oss-interleaved (convert.families.ARRANGEMENTS)
    keys: str  # key style: hf (mlp.experts.E.gate_proj) | w123 (block_sparse_moe.experts.E.w1) | v4 | fused | gpt_oss
    prefix: str = "model."
    dense_first: bool = False  # layer 0 dense (first_k_dense_replace = 1)
    shared: str = ""  # shared expert block name: shared_experts | shared_expert | ""
    mtp: str = ""  # "index": MTP layer at num_hidden_layers (V3/GLM) | "qwen": mtp.layers.0 fused | ""
    text_config: bool = False  # dims nested under text_config (VL / Qwen3.5 wrappers)
    per_expert_intermediate: bool = False  # Mixtral-style intermediate_size per expert
    ue8m0: bool = False  # FP8 scale_fmt ue8m0 (V3.1, V4): F32 scales that are powers of two
    quant: str = ""  # nvfp4: "modelopt" (weight_scale_2 multiplies) | "ct" (weight_global_scale divides)
    latent: bool = False  # experts on routed_expert_hidden_size = hidden_size / 2 (Kimi K3)


VARIANTS: dict[str, Variant] = {
    "deepseek_v3_fp8": Variant("deepseek_v3", "deepseek_v3", "fp8_block", "per-expert", "hf", dense_first=True,
                               shared="shared_experts", mtp="index"),
    "deepseek_v31_fp8": Variant("deepseek_v3", "deepseek_v3", "fp8_block", "per-expert", "hf", dense_first=True,
                                shared="shared_experts", ue8m0=True),
    "kimi_k2_fp8": Variant("deepseek_v3", "kimi_k2", "fp8_block", "per-expert", "hf", dense_first=True, shared="shared_experts"),
    "kimi_k2_int4": Variant("deepseek_v3", "kimi_k2", "int4_group", "per-expert", "hf", dense_first=True,
                            shared="shared_experts"),
    "minimax_m2_fp8": Variant("minimax_m2", "minimax_m2", "fp8_block", "per-expert", "w123", per_expert_intermediate=True),
    "deepseek_v4_fp8": Variant("deepseek_v4", "deepseek_v4", "fp8_block", "per-expert", "v4", prefix="", ue8m0=True),
    "deepseek_v3_bf16": Variant("deepseek_v3", "deepseek_v3", "bf16", "per-expert", "hf", dense_first=True,
                                shared="shared_experts", mtp="index"),
    "qwen3_moe_bf16": Variant("qwen3_moe", "qwen3_moe", "bf16", "per-expert", "hf"),
    "qwen3_moe_fp16": Variant("qwen3_moe", "qwen3_moe", "f16", "per-expert", "hf"),
    "qwen3_next_bf16": Variant("qwen3_moe", "qwen3_next", "bf16", "per-expert", "hf", shared="shared_expert"),
    "glm4_moe_bf16": Variant("glm4_moe", "glm4_moe", "bf16", "per-expert", "hf", dense_first=True,
                             shared="shared_experts", mtp="index"),
    "mixtral_bf16": Variant("mixtral", "mixtral", "bf16", "per-expert", "w123", per_expert_intermediate=True),
    "qwen3_5_moe_bf16": Variant("qwen3_5_moe", "qwen3_5_moe", "bf16", "fused", "fused", prefix="model.language_model.",
                                text_config=True, mtp="qwen"),
    "qwen3_vl_moe_bf16": Variant("qwen3_vl_moe", "qwen3_vl_moe", "bf16", "fused-transposed", "fused",
                                 prefix="model.language_model.", text_config=True),
    "gpt_oss_mxfp4": Variant("gpt_oss", "gpt_oss", "mxfp4", "gpt-oss-interleaved", "gpt_oss",
                             per_expert_intermediate=True),
    "gpt_oss_bf16": Variant("gpt_oss", "gpt_oss", "bf16", "gpt-oss-interleaved", "gpt_oss",
                            per_expert_intermediate=True),
    "qwen3_moe_nvfp4_modelopt": Variant("qwen3_moe", "qwen3_moe", "nvfp4", "per-expert", "hf", quant="modelopt"),
    "qwen3_moe_nvfp4_ct": Variant("qwen3_moe", "qwen3_moe", "nvfp4", "per-expert", "hf", quant="ct"),
    "minimax_m2_mxfp8": Variant("minimax_m2", "minimax_m2", "mxfp8", "per-expert", "w123", per_expert_intermediate=True),
    "deepseek_v41_mxfp4": Variant("deepseek_v41", "deepseek_v41", "mxfp4", "per-expert", "v4", prefix=""),
    "glm5_fp8": Variant("glm5", "glm_moe_dsa", "fp8_block", "per-expert", "hf", dense_first=True,
                        shared="shared_experts", mtp="index"),
    "glm5_nvfp4": Variant("glm5", "glm_moe_dsa", "nvfp4", "per-expert", "hf", dense_first=True,
                          shared="shared_experts", quant="modelopt"),
    "qwen4_exp_fp8": Variant("qwen4_exp", "qwen4_exp", "fp8_block", "per-expert", "hf", prefix="model.language_model.",
                             text_config=True, shared="shared_expert"),
    "qwen4_exp_nvfp4": Variant("qwen4_exp", "qwen4_exp", "nvfp4", "per-expert", "hf", prefix="model.language_model.",
                               text_config=True, shared="shared_expert", quant="ct"),
    "kimi_k3_mxfp4": Variant("kimi_k3", "kimi_k3", "mxfp4", "per-expert", "k3", prefix="language_model.model.",
                             dense_first=True, shared="shared_experts", text_config=True, quant="ct", latent=True),
}

_DTYPE = {"bf16": "BF16", "f16": "F16"}
_HF = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_W = {"gate": "w1", "up": "w3", "down": "w2"}


@dataclass
class FamilyCheckpoint:
    path: pathlib.Path
    variant: Variant
    config: dict
    hidden_size: int
    intermediate_size: int
    num_experts: int
    layers: list[int]  # MoE layers (what the converter must produce)
    block: tuple[int, int] | None  # FP8 weight_block_size
    group: int | None  # INT4 group size
    encoded: dict[tuple[int, int, str], dict[str, np.ndarray]] = field(default_factory=dict)
    weight_map: dict[str, str] = field(default_factory=dict)

    @property
    def input_type(self) -> str:
        return input_type_of(self.variant.encoding)

    def reference(self, layer: int, expert: int, proj: str):
        """bf16 [N, K] torch tensor: the per-expert source encoding through the reference decoders."""
        import torch

        from kt_convert.quant.decoders import (decode_f16, decode_fp8_block, decode_int4_group, decode_mxfp8,
                                               decode_nvfp4)
        from kt_convert.quant.mxfp4 import decode_mxfp4

        enc = self.encoded[(layer, expert, proj)]
        kind = self.variant.encoding
        if kind == "bf16":
            return torch.from_numpy(enc["weight"].view(np.int16).copy()).view(torch.bfloat16)
        if kind == "f16":
            return decode_f16(enc["weight"])
        if kind == "fp8_block":
            return decode_fp8_block(enc["weight"], enc["scale"], self.block)
        if kind == "int4_group":
            return decode_int4_group(enc["packed"], enc["scale"], self.group, "BF16")
        if kind == "nvfp4":
            return decode_nvfp4(enc["weight"], enc["scale"], float(enc["global"].reshape(-1)[0]), self.variant.quant == "ct")
        if kind == "mxfp8":
            return decode_mxfp8(enc["weight"], enc["scale"])
        return decode_mxfp4(enc["weight"], enc["scale"])


def _rng(seed: int, *parts) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(repr(parts).encode())])


def _bf16(rng, shape, scale=0.02) -> np.ndarray:
    x = (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))
    return (x.view(np.uint32) >> 16).astype("<u2")


def _encode(rng, encoding: str, n: int, k: int, block, group, ue8m0: bool = False) -> dict[str, np.ndarray]:
    """One expert matrix [n, k] in its source encoding."""
    if encoding == "bf16":
        return {"weight": _bf16(rng, (n, k))}
    if encoding == "f16":
        w = (rng.standard_normal((n, k)) * 0.02).astype("<f2")
        w[0, :3] = np.array([3e-7, -6e-5, 1.0001], dtype="<f2")  # subnormals and a bf16 tie region
        return {"weight": w}
    if encoding == "fp8_block":
        bn, bk = block
        w = rng.integers(0, 256, size=(n, k), dtype=np.uint8)
        w[(w & 0x7F) == 0x7F] = 0x38  # no E4M3 NaN codes
        grid = (-(-n // bn), -(-k // bk))
        # scales that are not powers of two, so the products need rounding to bf16
        scale = (2.0 ** rng.integers(-14, -8, size=grid) * (1.0 if ue8m0 else rng.uniform(1.0, 2.0, size=grid)))
        scale = scale.astype("<f4")
        return {"weight": w, "scale": scale}
    if encoding == "int4_group":
        from kt_convert.quant.decoders import encode_int4_words

        u = rng.integers(0, 16, size=(n, k))
        s = (rng.uniform(0.0005, 0.004, size=(n, k // group)).astype(np.float32).view(np.uint32) >> 16).astype("<u2")
        return {"packed": encode_int4_words(u), "scale": s, "shape": np.array([n, k], dtype="<i8")}
    if encoding == "mxfp4":
        return {"weight": np.frombuffer(rng.bytes(n * k // 2), np.uint8).reshape(n, k // 2),
                "scale": rng.integers(118, 133, size=(n, k // 32), dtype=np.uint8)}
    if encoding == "nvfp4":
        # any byte is two E2M1 codes; E4M3 group scales 0x20..0x57 (2^-4 .. 1.875 * 2^3, no NaN code); the
        # per-tensor scale as ModelOpt writes it, amax / (6 * 448) (its inverse for compressed-tensors: the caller)
        return {"weight": np.frombuffer(rng.bytes(n * k // 2), np.uint8).reshape(n, k // 2),
                "scale": rng.integers(0x20, 0x58, size=(n, k // 16), dtype=np.uint8),
                "global": np.array(rng.uniform(0.5, 2.0) / (6 * 448), dtype="<f4")}
    if encoding == "mxfp8":
        w = rng.integers(0, 256, size=(n, k), dtype=np.uint8)
        w[(w & 0x7F) == 0x7F] = 0x30  # no E4M3 NaN codes
        return {"weight": w, "scale": rng.integers(115, 132, size=(n, k // 32), dtype=np.uint8)}
    raise ValueError(f"unknown encoding {encoding!r}")


def _config(v: Variant, H: int, I: int, E: int, L: int, block, group, mtp: int) -> dict:
    inner = {
        "architectures": [], "model_type": v.model_type, "hidden_size": H, "num_hidden_layers": L,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 64,
        "num_experts_per_tok": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False,
    }
    if v.per_expert_intermediate:
        inner["intermediate_size"] = I
        inner["num_local_experts"] = E
    else:
        inner["moe_intermediate_size"] = I
        inner["intermediate_size"] = 3 * H  # dense MLP size: a different number, so mix-ups fail
        inner["n_routed_experts" if v.family in ("deepseek_v3", "glm4_moe", "deepseek_v4", "deepseek_v41", "glm5")
              else "num_experts"] = E
    if v.dense_first:
        inner["first_k_dense_replace"] = 1
    if v.shared == "shared_experts":
        inner["n_shared_experts"] = 1
    if v.shared == "shared_expert":
        inner["shared_expert_intermediate_size"] = I
    if v.mtp:
        inner["num_nextn_predict_layers" if v.mtp == "index" else "mtp_num_hidden_layers"] = mtp
    if v.model_type == "gpt_oss":
        inner.update(swiglu_limit=7.0, layer_types=["sliding_attention", "full_attention"] * L, sliding_window=128)
    if v.model_type in ("deepseek_v4", "deepseek_v41"):
        inner.update(expert_dtype="fp8" if v.encoding == "fp8_block" else "fp4", swiglu_limit=10.0, num_hash_layers=0)
    if v.family == "glm5":
        inner["swiglu_limit"] = 10.0
    if v.latent:  # Kimi K3: the experts run on routed_expert_hidden_size; top-k is num_experts_per_token
        inner.update(hidden_size=2 * H, routed_expert_hidden_size=H, hidden_act="situ", activation_situ_beta=4.0,
                     activation_situ_linear_beta=25.0, num_shared_experts=1, latent_moe_use_norm=True)
        inner["num_experts_per_token"] = inner.pop("num_experts_per_tok")
    if v.encoding == "nvfp4" and v.quant == "modelopt":
        inner["quantization_config"] = {
            "config_groups": {"group_0": {"input_activations": {"dynamic": False, "num_bits": 4, "type": "float",
                                                                "group_size": 16},
                                          "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
                                          "targets": ["Linear"]}},
            "ignore": ["lm_head"], "quant_algo": "NVFP4", "producer": {"name": "modelopt", "version": "0.37.0"},
            "quant_method": "modelopt"}
    if v.encoding in ("nvfp4", "mxfp4") and v.quant == "ct":
        group = 16 if v.encoding == "nvfp4" else 32
        inner["quantization_config"] = {
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                          "weights": {"num_bits": 4, "type": "float", "symmetric": True,
                                                      "group_size": group, "dynamic": False,
                                                      "strategy": "tensor_group" if group == 16 else "group"}}},
            "format": f"{v.encoding}-pack-quantized", "ignore": ["lm_head"], "quant_method": "compressed-tensors",
            "quantization_status": "compressed"}
    if v.encoding == "mxfp8":  # assumed: MiniMax-M3's config is not published; "mxfp8" as sglang names it
        inner["quantization_config"] = {"quant_method": "mxfp8"}
    if v.encoding == "fp8_block":
        inner["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                        "weight_block_size": list(block)}
        if v.ue8m0:
            inner["quantization_config"]["scale_fmt"] = "ue8m0"
    if v.encoding == "int4_group":
        inner["quantization_config"] = {
            "config_groups": {"group_0": {"input_activations": None, "output_activations": None, "targets": ["Linear"],
                                          "weights": {"actorder": None, "block_structure": None, "dynamic": False,
                                                      "group_size": group, "num_bits": 4, "observer": "minmax",
                                                      "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                                                      "type": "int"}}},
            "format": "pack-quantized", "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                                                   "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
            "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed"}
    if v.model_type == "gpt_oss" and v.encoding == "mxfp4":
        inner["quantization_config"] = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                   "model.embed_tokens", "lm_head"],
                                        "quant_method": "mxfp4"}
    dtype = {"f16": "float16"}.get(v.encoding, "bfloat16")
    if v.text_config:
        inner["model_type"] = "kimi_linear" if v.latent else v.model_type + "_text"
        inner["dtype"] = dtype
        return {"architectures": [], "model_type": v.model_type, "text_config": inner,
                "vision_config": {"hidden_size": 32, "depth": 1}, "tie_word_embeddings": False}
    inner["torch_dtype" if v.family == "deepseek_v3" else "dtype"] = dtype
    return inner


def make_family_checkpoint(out_dir, variant: str, *, hidden_size: int = 384, intermediate_size: int = 256,
                           num_experts: int = 4, num_layers: int = 2, block: tuple[int, int] = (128, 128),
                           group: int = 32, mtp_layers: int = 1, num_shards: int = 2, seed: int = 0,
                           prefix: str | None = None) -> FamilyCheckpoint:
    """Write a synthetic checkpoint of `variant` (a key of VARIANTS) to `out_dir`.

    With dense_first variants layer 0 is a dense MLP (no routed experts) and the MoE layers are
    1..num_layers-1; num_shards > 1 writes model-XXXXX-of-NNNNN files and an index whose
    metadata is ``{}`` (as DeepSeek's own tools write it), 1 writes ``model.safetensors``.
    prefix overrides the variant's key prefix before ``layers.`` (e.g. ``language_model.model.``).
    """
    v = VARIANTS[variant]
    if prefix is not None:  # another key prefix for the same family (e.g. a VL wrapper's language_model.)
        from dataclasses import replace

        v = replace(v, prefix=prefix)
    H, I, E, L = hidden_size, intermediate_size, num_experts, num_layers
    if v.arrangement != "per-expert" and v.encoding not in ("bf16", "f16", "mxfp4"):
        raise ValueError(f"{variant}: fused arrangements are BF16/FP16/MXFP4 here")
    cfg = _config(v, H, I, E, L, block, group, mtp_layers if v.mtp else 0)
    tensors: dict[str, tuple[str, tuple[int, ...], np.ndarray]] = {}
    ckpt = FamilyCheckpoint(pathlib.Path(out_dir), v, cfg, H, I, E, [], tuple(block) if v.encoding == "fp8_block" else None,
                            group if v.encoding == "int4_group" else None)
    p = v.prefix
    dt = _DTYPE.get(v.encoding, "BF16")

    def dense(name, n, k, fp8=False):
        r = _rng(seed, name)
        if fp8 and v.encoding == "fp8_block":  # FP8 checkpoints quantize every linear (with cdiv block scales)
            enc = _encode(r, "fp8_block", n, k, block, group, v.ue8m0)
            tensors[name + ".weight"] = ("F8_E4M3", (n, k), enc["weight"])
            tensors[name + (".scale" if v.keys == "v4" else ".weight_scale_inv")] = ("F32", enc["scale"].shape, enc["scale"])
        else:
            tensors[name + ".weight"] = ("BF16", (n, k), _bf16(r, (n, k)))

    def expert_tensors(base: str, enc: dict[str, np.ndarray]):
        if v.encoding in ("bf16", "f16"):
            tensors[base + ".weight"] = (dt, enc["weight"].shape, enc["weight"])
        elif v.encoding == "fp8_block":
            tensors[base + ".weight"] = ("F8_E4M3", enc["weight"].shape, enc["weight"])
            tensors[base + (".scale" if v.keys == "v4" else ".weight_scale_inv")] = ("F32", enc["scale"].shape, enc["scale"])
        elif v.encoding == "int4_group":
            tensors[base + ".weight_packed"] = ("I32", enc["packed"].shape, enc["packed"])
            tensors[base + ".weight_scale"] = ("BF16", enc["scale"].shape, enc["scale"])
            tensors[base + ".weight_shape"] = ("I64", (2,), enc["shape"])
        elif v.encoding == "nvfp4" and v.quant == "modelopt":  # weight, weight_scale, weight_scale_2 (scalar)
            tensors[base + ".weight"] = ("U8", enc["weight"].shape, enc["weight"])
            tensors[base + ".weight_scale"] = ("F8_E4M3", enc["scale"].shape, enc["scale"])
            tensors[base + ".weight_scale_2"] = ("F32", (), enc["global"].reshape(()))
            tensors[base + ".input_scale"] = ("F32", (), np.array(0.01, "<f4"))
        elif v.encoding == "nvfp4":  # compressed-tensors: the global scale is the divisor 1 / weight_scale_2
            tensors[base + ".weight_packed"] = ("U8", enc["weight"].shape, enc["weight"])
            tensors[base + ".weight_scale"] = ("F8_E4M3", enc["scale"].shape, enc["scale"])
            tensors[base + ".weight_global_scale"] = ("F32", (1,), enc["global"].reshape(1))
            tensors[base + ".input_global_scale"] = ("F32", (1,), np.array([100.0], "<f4"))
        elif v.encoding == "mxfp8":
            tensors[base + ".weight"] = ("F8_E4M3", enc["weight"].shape, enc["weight"])
            tensors[base + ".weight_scale_inv"] = ("U8", enc["scale"].shape, enc["scale"])
        elif v.encoding == "mxfp4" and v.quant == "ct":
            tensors[base + ".weight_packed"] = ("U8", enc["weight"].shape, enc["weight"])
            tensors[base + ".weight_scale"] = ("U8", enc["scale"].shape, enc["scale"])
        elif v.encoding == "mxfp4":  # DeepSeek-V4 style: I8 codes, F8_E8M0 scales
            tensors[base + ".weight"] = ("I8", enc["weight"].shape, enc["weight"])
            tensors[base + ".scale"] = ("F8_E8M0", enc["scale"].shape, enc["scale"])

    def moe_block(lp: str, layer: int, record: bool):
        encs = {}
        for e in range(E):
            for proj in PROJS:
                n, k = (H, I) if proj == "down" else (I, H)
                encs[(e, proj)] = _encode(_rng(seed, layer, e, proj), v.encoding, n, k, block, group, v.ue8m0)
                if v.encoding == "nvfp4" and v.quant == "ct":
                    encs[(e, proj)]["global"] = (1.0 / encs[(e, proj)]["global"]).astype("<f4")
                if record:
                    ckpt.encoded[(layer, e, proj)] = encs[(e, proj)]
        if v.arrangement == "per-expert":
            block_name = "block_sparse_moe" if v.keys in ("w123", "k3") else ("ffn" if v.keys == "v4" else "mlp")
            names = _W if v.keys in ("w123", "v4", "k3") else _HF
            for e in range(E):
                for proj in PROJS:
                    expert_tensors(f"{lp}{block_name}.experts.{e}.{names[proj]}", encs[(e, proj)])
            return
        ex = f"{lp}mlp.experts."
        if v.arrangement == "fused":
            gate_up = np.stack([np.concatenate([encs[(e, "gate")]["weight"], encs[(e, "up")]["weight"]]) for e in range(E)])
            down = np.stack([encs[(e, "down")]["weight"] for e in range(E)])
        elif v.arrangement == "fused-transposed":
            gate_up = np.stack([np.concatenate([encs[(e, "gate")]["weight"], encs[(e, "up")]["weight"]]).T
                                for e in range(E)])
            down = np.stack([encs[(e, "down")]["weight"].T for e in range(E)])
        else:  # gpt-oss: row 2i gate i, row 2i+1 up i
            def interleave(part):
                out = []
                for e in range(E):
                    g, u = encs[(e, "gate")][part], encs[(e, "up")][part]
                    m = np.empty((2 * g.shape[0],) + g.shape[1:], g.dtype)
                    m[0::2], m[1::2] = g, u
                    out.append(m)
                return np.stack(out)
            if v.encoding == "mxfp4":
                gu_w, gu_s = interleave("weight"), interleave("scale")
                tensors[ex + "gate_up_proj_blocks"] = ("U8", (E, 2 * I, H // 32, 16), gu_w.reshape(E, 2 * I, H // 32, 16))
                tensors[ex + "gate_up_proj_scales"] = ("U8", gu_s.shape, gu_s)
                dw = np.stack([encs[(e, "down")]["weight"] for e in range(E)]).reshape(E, H, I // 32, 16)
                ds = np.stack([encs[(e, "down")]["scale"] for e in range(E)])
                tensors[ex + "down_proj_blocks"] = ("U8", dw.shape, dw)
                tensors[ex + "down_proj_scales"] = ("U8", ds.shape, ds)
            else:
                gate_up = np.ascontiguousarray(interleave("weight").transpose(0, 2, 1))  # [E, H, 2I]
                down = np.stack([encs[(e, "down")]["weight"].T for e in range(E)])  # [E, I, H]
                tensors[ex + "gate_up_proj"] = (dt, gate_up.shape, gate_up)
                tensors[ex + "down_proj"] = (dt, down.shape, np.ascontiguousarray(down))
            tensors[ex + "gate_up_proj_bias"] = ("BF16", (E, 2 * I), _bf16(_rng(seed, layer, "gub"), (E, 2 * I)))
            tensors[ex + "down_proj_bias"] = ("BF16", (E, H), _bf16(_rng(seed, layer, "db"), (E, H)))
            return
        tensors[ex + "gate_up_proj"] = (dt, gate_up.shape, np.ascontiguousarray(gate_up))
        tensors[ex + "down_proj"] = (dt, down.shape, np.ascontiguousarray(down))

    def router(lp: str):
        if v.model_type == "gpt_oss":
            tensors[lp + "mlp.router.weight"] = ("BF16", (E, H), _bf16(_rng(seed, lp, "r"), (E, H)))
            tensors[lp + "mlp.router.bias"] = ("BF16", (E,), _bf16(_rng(seed, lp, "rb"), (E,)))
            return
        moe = "block_sparse_moe" if v.keys in ("w123", "k3") else ("ffn" if v.keys == "v4" else "mlp")
        tensors[f"{lp}{moe}.gate.weight"] = ("BF16", (E, H), _bf16(_rng(seed, lp, "g"), (E, H)))
        if v.latent:  # the latent projections around the routed experts (not expert tensors)
            tensors[f"{lp}{moe}.routed_expert_down_proj.weight"] = ("BF16", (H, 2 * H), _bf16(_rng(seed, lp, "ld"), (H, 2 * H)))
            tensors[f"{lp}{moe}.routed_expert_up_proj.weight"] = ("BF16", (2 * H, H), _bf16(_rng(seed, lp, "lu"), (2 * H, H)))
        if v.family in ("deepseek_v3", "glm4_moe", "glm5"):
            tensors[f"{lp}mlp.gate.e_score_correction_bias"] = ("F32", (E,), np.zeros(E, "<f4"))
        if v.model_type == "minimax_m2":
            tensors[f"{lp}block_sparse_moe.e_score_correction_bias"] = ("F32", (E,), np.zeros(E, "<f4"))
        if v.keys == "v4":
            tensors[f"{lp}ffn.gate.bias"] = ("F32", (E,), np.zeros(E, "<f4"))

    def layer_block(layer: int, lp: str, moe: bool, record: bool):
        tensors[lp + ("attn_norm.weight" if v.keys == "v4" else "input_layernorm.weight")] = (
            "BF16", (H,), np.full(H, 0x3F80, "<u2"))
        attn = "attn." if v.keys == "v4" else "self_attn."
        for name, n, k in (("q_proj", 64, H), ("k_proj", 32, H), ("v_proj", 32, H), ("o_proj", H, 64)):
            dense(lp + attn + name, n, k, fp8=True)
        if not moe:
            for name, n, k in (("gate_proj", 3 * H, H), ("up_proj", 3 * H, H), ("down_proj", H, 3 * H)):
                dense(f"{lp}mlp.{name}", n, k, fp8=True)
            return
        router(lp)
        if v.shared:
            for proj in PROJS:
                n, k = (H, I) if proj == "down" else (I, H)
                dense(f"{lp}mlp.{v.shared}.{_HF[proj]}", n, k, fp8=True)
            if v.shared == "shared_expert":
                tensors[lp + "mlp.shared_expert_gate.weight"] = ("BF16", (1, H), _bf16(_rng(seed, lp, "sg"), (1, H)))
        moe_block(lp, layer, record)

    tensors[p + "embed_tokens.weight" if v.keys != "v4" else "embed.weight"] = ("BF16", (64, H), _bf16(_rng(seed, "emb"), (64, H)))
    for layer in range(L):
        moe = not (v.dense_first and layer == 0)
        layer_block(layer, f"{p}layers.{layer}.", moe, record=True)
        if moe:
            ckpt.layers.append(layer)
    if v.mtp == "index":  # V3/GLM: the MTP block is layer num_hidden_layers, with its own experts
        for i in range(mtp_layers):
            layer_block(L + i, f"{p}layers.{L + i}.", True, record=False)
            tensors[f"{p}layers.{L + i}.eh_proj.weight"] = ("BF16", (H, 2 * H), _bf16(_rng(seed, "eh", i), (H, 2 * H)))
    elif v.mtp == "qwen":  # Qwen3.5: mtp.layers.{i}.* with fused experts
        for i in range(mtp_layers):
            moe_block(f"mtp.layers.{i}.", 1000 + i, record=False)
            tensors[f"mtp.layers.{i}.input_layernorm.weight"] = ("BF16", (H,), np.full(H, 0x3F80, "<u2"))
    tensors[(p + "norm.weight") if v.keys != "v4" else "norm.weight"] = ("BF16", (H,), np.full(H, 0x3F80, "<u2"))
    tensors["lm_head.weight" if v.keys != "v4" else "head.weight"] = ("BF16", (64, H), _bf16(_rng(seed, "head"), (64, H)))

    out = ckpt.path
    out.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if num_shards <= 1:
        save_file(out / "model.safetensors", tensors)
        ckpt.weight_map = {k: "model.safetensors" for k in names}
    else:
        cut = [round(i * len(names) / num_shards) for i in range(num_shards + 1)]
        for i in range(num_shards):
            fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
            part = {k: tensors[k] for k in names[cut[i] : cut[i + 1]]}
            save_file(out / fname, part)
            ckpt.weight_map.update({k: fname for k in part})
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": dict(sorted(ckpt.weight_map.items()))}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if v.encoding == "nvfp4" and v.quant == "modelopt":  # ModelOpt's own record beside config.json
        (out / "hf_quant_config.json").write_text(json.dumps({
            "producer": {"name": "modelopt", "version": "0.37.0"},
            "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                             "exclude_modules": ["lm_head"]}}, indent=2) + "\n")
    return ckpt
