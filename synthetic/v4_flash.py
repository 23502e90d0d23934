"""Synthetic DeepSeek-V4-Flash-shaped checkpoints (docs/FORMAT.md §6: MXFP4 routed experts).

Real key names and dtypes, small or layer-sized dimensions, random but deterministic contents:

* routed experts: MXFP4 — packed E2M1 nibbles (``I8``/``U8`` ``[N, K/2]`` or ``F4`` with the
  logical shape ``[N, K]``) + ``F8_E8M0`` scales ``[N, K/32]`` drawn from 118..132 (never the
  0x00/0xFF edge bytes on which decoders disagree);
* everything else (embed/head/norms/hc/attention/gate/shared experts) as the official release stores
  them, FP8 linears with
  128x128 ``F8_E8M0`` block scales.

Each tensor's bytes depend only on ``seed`` and its *official* key, so the same seed gives the same
numbers whatever the key style, storage dtype or sharding — a converter must produce identical
output from all of them.

Shards are cut by bytes across the whole tensor list and deliberately not at layer boundaries
(the official shards are not layer-aligned either), so readers cannot assume one layer per file.
Files are streamed tensor by tensor: peak memory is one tensor.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from kt_convert.kt_runtime.format import fsio
from kt_convert.kt_runtime.format.safetensors_file import plan_file, tensor_nbytes

__all__ = ["PRESETS", "SyntheticCheckpoint", "make_v4_flash_checkpoint"]

PRESETS: dict[str, dict[str, int]] = {
    "v4-flash-tiny": dict(
        hidden_size=384, moe_intermediate_size=512, n_routed_experts=8, num_experts_per_tok=2,
        num_hidden_layers=2, vocab_size=64,
    ),
    "v4-flash-layer": dict(
        hidden_size=4096, moe_intermediate_size=2048, n_routed_experts=32, num_experts_per_tok=6,
        num_hidden_layers=2, vocab_size=64,
    ),
}

STORAGES = ("I8", "U8", "F4")
KEY_STYLES = ("official", "model", "hf_alias")
SCALE_MIN, SCALE_MAX = 118, 132  # E8M0 bytes: 2^-9 .. 2^5, far from 0x00/0xFF
MXFP4_GROUP = 32
FP8_BLOCK = 128
DEFAULT_SHARD_BYTES = 2_000_000_000

# Small fixed attention geometry; only the expert dims follow the preset.
_ATTN = dict(
    num_attention_heads=2, num_key_value_heads=1, head_dim=128, qk_rope_head_dim=64,
    q_lora_rank=128, o_lora_rank=128, o_groups=2, index_n_heads=2, index_head_dim=128,
    index_topk=16, hc_mult=4, n_shared_experts=1, num_hash_layers=1,
)


@dataclass
class SyntheticCheckpoint:
    path: pathlib.Path
    config: dict
    expert_keys: list[str]  # every routed-expert tensor key written (excluding MTP)
    mtp_expert_keys: list[str]
    files: list[pathlib.Path] = field(default_factory=list)  # safetensors files, in order
    weight_map: dict[str, str] = field(default_factory=dict)  # key -> file name


@dataclass(frozen=True)
class _Tensor:
    key: str  # on-disk key
    dtype: str
    shape: tuple[int, ...]
    fill: str  # generator name, see _FILLS
    seed_key: str  # official key: seeds the contents
    group: str  # "pre", "layer.{L}", "mtp.{i}", "post": used to keep shards off layer boundaries


# -- contents -------------------------------------------------------------------------------------


def _rng(seed: int, seed_key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(seed_key.encode())])


def _fill_fp4(rng: np.random.Generator, nbytes: int, **_: int) -> np.ndarray:
    return np.frombuffer(rng.bytes(nbytes), dtype=np.uint8)  # every byte value: all 16 codes per nibble


def _fill_e8m0(rng: np.random.Generator, nbytes: int, **_: int) -> np.ndarray:
    return rng.integers(SCALE_MIN, SCALE_MAX + 1, size=nbytes, dtype=np.uint8)


def _fill_fp8(rng: np.random.Generator, nbytes: int, **_: int) -> np.ndarray:
    # E4M3FN codes 0x08..0x3F (about 2^-6 .. 1.9) with a random sign; never NaN (0x7F/0xFF).
    mag = rng.integers(0x08, 0x40, size=nbytes, dtype=np.uint8)
    return mag | (rng.integers(0, 2, size=nbytes, dtype=np.uint8) << 7)


def _fill_bf16(rng: np.random.Generator, nbytes: int, **_: int) -> np.ndarray:
    x = rng.standard_normal(nbytes // 2, dtype=np.float32) * np.float32(0.02)
    return (x.view(np.uint32) >> 16).astype("<u2")  # truncate to bf16 bits


def _fill_bf16_ones(rng: np.random.Generator, nbytes: int, **_: int) -> np.ndarray:
    return np.full(nbytes // 2, 0x3F80, dtype="<u2")


def _fill_f32(rng: np.random.Generator, nbytes: int, **_: int) -> np.ndarray:
    return (rng.standard_normal(nbytes // 4, dtype=np.float32) * np.float32(0.02)).astype("<f4")


def _fill_f32_ones(rng: np.random.Generator, nbytes: int, **_: int) -> np.ndarray:
    return np.ones(nbytes // 4, dtype="<f4")


def _fill_tid2eid(rng: np.random.Generator, nbytes: int, *, experts: int, topk: int) -> np.ndarray:
    rows = nbytes // (8 * topk)
    ids = rng.permuted(np.tile(np.arange(experts, dtype="<i8"), (rows, 1)), axis=1)
    return np.ascontiguousarray(ids[:, :topk])  # topk distinct experts per token id


_FILLS: dict[str, Callable[..., np.ndarray]] = {
    "fp4": _fill_fp4, "e8m0": _fill_e8m0, "fp8": _fill_fp8, "bf16": _fill_bf16,
    "bf16_ones": _fill_bf16_ones, "f32": _fill_f32, "f32_ones": _fill_f32_ones,
    "tid2eid": _fill_tid2eid,
}


# -- key styles -----------------------------------------------------------------------------------


def _to_model_prefix(key: str, num_layers: int) -> str:
    """transformers-save naming: `model.` prefix; MTP block i becomes layer num_layers + i."""
    if key == "head.weight":
        return "lm_head.weight"
    if key.startswith("mtp."):
        _, i, rest = key.split(".", 2)
        return f"model.layers.{num_layers + int(i)}.{rest}"
    return "model." + key


_HF_ALIAS_RENAMES = (
    (".attn_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
    (".attn.", ".self_attn."),
    (".ffn.", ".mlp."),
    (".w1.", ".gate_proj."),
    (".w3.", ".up_proj."),
    (".w2.", ".down_proj."),
    (".gate.bias", ".gate.e_score_correction_bias"),
)


def _to_hf_alias(key: str, num_layers: int) -> str:
    """sglang's remap_weight_name_to_dpsk_hf_format naming (the HF alias of FORMAT.md §6)."""
    special = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
               "norm.weight": "model.norm.weight"}
    if key in special:
        return special[key]
    out = _to_model_prefix(key, num_layers)
    for old, new in _HF_ALIAS_RENAMES:
        out = out.replace(old, new)
    if out.endswith(".scale"):  # block/group scale of a linear (hc_*_scale ends in "_scale")
        out = out[: -len(".scale")] + ".weight_scale_inv"
    return out


_KEY_STYLE_MAP: dict[str, Callable[[str, int], str]] = {
    "official": lambda key, _n: key,
    "model": _to_model_prefix,
    "hf_alias": _to_hf_alias,
}


# -- tensor list ----------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _plan_tensors(cfg: dict, *, storage: str, mtp_layers: int, include_non_expert: bool) -> list[_Tensor]:
    """All tensors in write order, with official keys (renamed later)."""
    H, I, E = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["n_routed_experts"]
    V, k, L = cfg["vocab_size"], cfg["num_experts_per_tok"], cfg["num_hidden_layers"]
    nh, hd, q = cfg["num_attention_heads"], cfg["head_dim"], cfg["q_lora_rank"]
    g, r_o, hc = cfg["o_groups"], cfg["o_lora_rank"], cfg["hc_mult"]
    shared_i = I * cfg["n_shared_experts"]
    out: list[_Tensor] = []

    def add(key: str, dtype: str, shape: tuple[int, ...], fill: str, group: str) -> None:
        out.append(_Tensor(key, dtype, tuple(shape), fill, key, group))

    def fp8_linear(prefix: str, n: int, kk: int, group: str) -> None:
        add(f"{prefix}.weight", "F8_E4M3", (n, kk), "fp8", group)
        add(f"{prefix}.scale", "F8_E8M0", (_cdiv(n, FP8_BLOCK), _cdiv(kk, FP8_BLOCK)), "e8m0", group)

    def experts(prefix: str, group: str) -> None:
        for e in range(E):
            for proj, n, kk in (("w1", I, H), ("w3", I, H), ("w2", H, I)):
                base = f"{prefix}.ffn.experts.{e}.{proj}"
                wshape = (n, kk) if storage == "F4" else (n, kk // 2)
                add(f"{base}.weight", storage, wshape, "fp4", group)
                add(f"{base}.scale", "F8_E8M0", (n, kk // MXFP4_GROUP), "e8m0", group)

    def block(prefix: str, layer: int, group: str) -> None:
        if include_non_expert:
            add(f"{prefix}.attn_norm.weight", "BF16", (H,), "bf16_ones", group)
            add(f"{prefix}.ffn_norm.weight", "BF16", (H,), "bf16_ones", group)
            for part in ("attn", "ffn"):
                add(f"{prefix}.hc_{part}_fn", "F32", ((2 + hc) * hc, hc * H), "f32", group)
                add(f"{prefix}.hc_{part}_base", "F32", ((2 + hc) * hc,), "f32", group)
                add(f"{prefix}.hc_{part}_scale", "F32", (3,), "f32_ones", group)
            fp8_linear(f"{prefix}.attn.wq_a", q, H, group)
            add(f"{prefix}.attn.q_norm.weight", "BF16", (q,), "bf16_ones", group)
            fp8_linear(f"{prefix}.attn.wq_b", nh * hd, q, group)
            fp8_linear(f"{prefix}.attn.wkv", hd, H, group)
            add(f"{prefix}.attn.kv_norm.weight", "BF16", (hd,), "bf16_ones", group)
            fp8_linear(f"{prefix}.attn.wo_a", g * r_o, nh * hd // g, group)
            fp8_linear(f"{prefix}.attn.wo_b", H, g * r_o, group)
            add(f"{prefix}.attn.attn_sink", "F32", (nh,), "f32", group)
            add(f"{prefix}.ffn.gate.weight", "BF16", (E, H), "bf16", group)
            if layer < cfg["num_hash_layers"]:
                add(f"{prefix}.ffn.gate.tid2eid", "I64", (V, k), "tid2eid", group)
            else:
                add(f"{prefix}.ffn.gate.bias", "F32", (E,), "f32", group)
            fp8_linear(f"{prefix}.ffn.shared_experts.w1", shared_i, H, group)
            fp8_linear(f"{prefix}.ffn.shared_experts.w3", shared_i, H, group)
            fp8_linear(f"{prefix}.ffn.shared_experts.w2", H, shared_i, group)
        experts(prefix, group)

    if include_non_expert:
        add("embed.weight", "BF16", (V, H), "bf16", "pre")
    for layer in range(L):
        block(f"layers.{layer}", layer, f"layer.{layer}")
    for i in range(mtp_layers):
        prefix, group = f"mtp.{i}", f"mtp.{i}"
        if include_non_expert:
            for norm in ("enorm", "hnorm", "norm"):
                add(f"{prefix}.{norm}.weight", "BF16", (H,), "bf16_ones", group)
            fp8_linear(f"{prefix}.e_proj", H, H, group)
            fp8_linear(f"{prefix}.h_proj", H, H, group)
        block(prefix, L + i, group)  # MTP blocks route through the gate (never hash layers)
    if include_non_expert:
        add("head.weight", "BF16", (V, H), "bf16", "post")
        add("norm.weight", "BF16", (H,), "bf16_ones", "post")
        add("hc_head_fn", "F32", (hc, hc * H), "f32", "post")
        add("hc_head_base", "F32", (hc,), "f32", "post")
        add("hc_head_scale", "F32", (1,), "f32_ones", "post")
    return out


def _shard_starts(tensors: list[_Tensor], sizes: list[int], num_shards: int) -> list[int]:
    """Start index of each shard: cut by bytes, then nudged off group (layer) boundaries."""
    n = len(tensors)
    if num_shards > n:
        raise ValueError(f"num_shards={num_shards} is more than the {n} tensors to write")
    total = sum(sizes)
    cumulative = np.cumsum(sizes)  # cumulative[j] = bytes of tensors 0..j
    starts = [0]
    for i in range(1, num_shards):
        target = total * i / num_shards
        b = int(np.searchsorted(cumulative, target, side="left")) + 1
        b = min(max(b, starts[-1] + 1), n - (num_shards - i))
        if tensors[b - 1].group != tensors[b].group:
            # Exactly on a layer boundary: move 3 tensors later (mid first expert) or earlier.
            for cand in (b + 3, b - 3, b + 1, b - 1):
                if starts[-1] < cand <= n - (num_shards - i) and tensors[cand - 1].group == tensors[cand].group:
                    b = cand
                    break
        starts.append(b)
    return starts


# -- writing --------------------------------------------------------------------------------------


def _config(preset: dict, *, mtp_layers: int) -> dict:
    cfg = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "expert_dtype": "fp4",
        **{k: preset[k] for k in ("hidden_size", "moe_intermediate_size", "n_routed_experts",
                                  "num_experts_per_tok", "num_hidden_layers", "vocab_size")},
        **_ATTN,
        "num_nextn_predict_layers": mtp_layers,
        "sliding_window": 128,
        "compress_ratios": [0] * (preset["num_hidden_layers"] + mtp_layers),
        "compress_rope_theta": 160000,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-06,
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "routed_scaling_factor": 1.5,
        "norm_topk_prob": True,
        "swiglu_limit": 10.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16,
                         "original_max_position_embeddings": 1024, "type": "yarn"},
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.57.1",
        "use_cache": True,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "scale_fmt": "ue8m0", "weight_block_size": [FP8_BLOCK, FP8_BLOCK]},
    }
    return cfg


def _tokenizer_files(vocab_size: int) -> dict[str, dict]:
    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    vocab = {bos: 0, eos: 1}
    for i in range(2, vocab_size):
        vocab[f"t{i}"] = i
    special = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for t, i in ((bos, 0), (eos, 1))]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
        "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": f"t{vocab_size - 1}"},
    }
    tokenizer_config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": bos, "eos_token": eos,
        "pad_token": eos, "clean_up_tokenization_spaces": False, "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast", "legacy": True,
    }
    generation_config = {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1,
                         "do_sample": True, "temperature": 1.0, "top_p": 0.95,
                         "transformers_version": "4.57.1"}
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": tokenizer_config,
            "generation_config.json": generation_config}


def _write_json(path: pathlib.Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_shard(path: pathlib.Path, tensors: list[_Tensor], seed: int, fill_args: dict) -> None:
    header, offsets = plan_file([(t.key, t.dtype, t.shape) for t in tensors], {"format": "pt"})

    def write(fd: int, tmp: pathlib.Path) -> None:  # one tensor in memory at a time
        fsio.write_all(fd, header, tmp)
        pos = len(header)
        for t in tensors:
            offset, nbytes = offsets[t.key]
            data = _FILLS[t.fill](_rng(seed, t.seed_key), nbytes, **fill_args.get(t.fill, {}))
            assert pos == offset and data.nbytes == nbytes, t.key
            fsio.write_all(fd, data, tmp)
            pos += nbytes

    fsio.atomic_write(path, write)


def make_v4_flash_checkpoint(
    out_dir: str | os.PathLike[str],
    preset: str = "v4-flash-tiny",
    *,
    num_experts: int | None = None,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    moe_intermediate_size: int | None = None,
    storage: str = "I8",
    key_style: str = "official",
    mtp_layers: int = 0,
    num_shards: int | None = None,
    single_file: bool = False,
    write_index: bool = True,
    include_non_expert: bool = True,
    seed: int = 0,
) -> SyntheticCheckpoint:
    """Write a DeepSeek-V4-Flash-shaped checkpoint to `out_dir` and describe it.

    storage: packed-FP4 dtype of expert weights, "I8" (official), "U8" or "F4" (logical shape).
    key_style: "official" (``layers.L.ffn.experts.E.w1.weight``), "model" (transformers save:
    ``model.`` prefix, ``lm_head.weight``) or "hf_alias" (``model.layers.L.mlp.experts.E.gate_proj
    .weight`` / ``.weight_scale_inv``).  MTP blocks are ``mtp.{i}.*`` in the official style and
    ``model.layers.{num_hidden_layers + i}.*`` in the other two (the DeepSeek-V3 HF convention).
    num_shards: split all tensors over this many ``model-XXXXX-of-NNNNN.safetensors`` files, cut by
    bytes and never exactly at a layer boundary (default: one per ~2 GB).  single_file writes one
    ``model.safetensors`` and no index.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    if key_style not in KEY_STYLES:
        raise ValueError(f"key_style must be one of {KEY_STYLES}, got {key_style!r}")
    dims = dict(PRESETS[preset])
    for name, value in (("n_routed_experts", num_experts), ("num_hidden_layers", num_layers),
                        ("hidden_size", hidden_size), ("moe_intermediate_size", moe_intermediate_size)):
        if value is not None:
            dims[name] = int(value)
    for name in ("hidden_size", "moe_intermediate_size"):
        if dims[name] <= 0 or dims[name] % MXFP4_GROUP:
            raise ValueError(f"{name}={dims[name]} must be a positive multiple of {MXFP4_GROUP} (MXFP4 groups)")
    if dims["n_routed_experts"] < 1 or dims["num_hidden_layers"] < 1 or mtp_layers < 0:
        raise ValueError("need at least 1 expert and 1 layer, and mtp_layers >= 0")
    dims["num_experts_per_tok"] = min(dims["num_experts_per_tok"], dims["n_routed_experts"])
    if single_file and num_shards not in (None, 1):
        raise ValueError("single_file writes one file; do not combine it with num_shards > 1")

    cfg = _config(dims, mtp_layers=mtp_layers)
    tensors = _plan_tensors(cfg, storage=storage, mtp_layers=mtp_layers, include_non_expert=include_non_expert)
    rename = _KEY_STYLE_MAP[key_style]
    L = cfg["num_hidden_layers"]
    tensors = [_Tensor(rename(t.key, L), t.dtype, t.shape, t.fill, t.seed_key, t.group) for t in tensors]
    sizes = [tensor_nbytes(t.dtype, t.shape) for t in tensors]

    if single_file:
        shards = 1
    elif num_shards is None:
        shards = max(1, math.ceil(sum(sizes) / DEFAULT_SHARD_BYTES))
    else:
        shards = int(num_shards)
        if shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    starts = _shard_starts(tensors, sizes, shards) + [len(tensors)]
    names = (["model.safetensors"] if single_file
             else [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)])

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stray = sorted(p.name for p in out.glob("*.safetensors") if p.name not in names)
    if stray:
        raise ValueError(f"{out} already holds other safetensors files ({', '.join(stray[:3])}); "
                         "choose an empty directory")

    fill_args = {"tid2eid": {"experts": cfg["n_routed_experts"], "topk": cfg["num_experts_per_tok"]}}
    weight_map: dict[str, str] = {}
    files = []
    for name, lo, hi in zip(names, starts[:-1], starts[1:]):
        _write_shard(out / name, tensors[lo:hi], seed, fill_args)
        files.append(out / name)
        weight_map.update({t.key: name for t in tensors[lo:hi]})

    index_path = out / "model.safetensors.index.json"
    if not single_file and write_index:
        _write_json(index_path, {"metadata": {"total_size": sum(sizes)},
                                 "weight_map": dict(sorted(weight_map.items()))})
    elif index_path.exists():
        index_path.unlink()  # a stale index from an earlier run would point at the wrong files
    _write_json(out / "config.json", cfg)
    for fname, obj in _tokenizer_files(cfg["vocab_size"]).items():
        _write_json(out / fname, obj)

    expert_keys = [t.key for t in tensors if ".experts." in t.seed_key and not t.seed_key.startswith("mtp.")]
    mtp_expert_keys = [t.key for t in tensors if ".experts." in t.seed_key and t.seed_key.startswith("mtp.")]
    return SyntheticCheckpoint(out, cfg, expert_keys, mtp_expert_keys, files, weight_map)
