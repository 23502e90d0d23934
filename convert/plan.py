"""The conversion plan: what will be read and written, checked from config.json and the
safetensors headers before any weight is read."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from kt_convert.kt_runtime.format.errors import FieldError
from kt_convert.kt_runtime.format.names import PROJECTIONS, layer_dir_name, shard_file_name
from kt_convert.kt_runtime.format.spec import PackedSpec, full_shape
from kt_convert.kt_runtime.format.json_fields import (REQUIRED, describe, get_dict, get_int, get_int_list, get_number,
                                                      get_str)
from kt_convert.kt_runtime.format.methods import METHODS, QuantMethod, alignment_problem, working_threadpool_counts
from kt_convert.quant.cpu import SourceMatrix
from kt_convert.quant.source_formats import FLOAT_KINDS, SUPPORTED, input_type_of

from .errors import UserError
from .families import Family, describe_unknown, detect_family, detection_note, family_for
from .source import HF_QUANT_CONFIG, Checkpoint
from .source_reader import Slab

FP4_WEIGHT_DTYPES = ("I8", "U8", "F4")
FP4_SCALE_DTYPES = ("F8_E8M0", "U8")  # one-byte E8M0 scales (MXFP4, MXFP8)
NVFP4_GROUP = 16


@dataclass(frozen=True)
class ProjectionSource:
    """Where one expert's projection lives and how to decode it.

    kind: decoder (a quant.source_formats kind). For fused tensors, expert indexes
    dim 0; rows = (start, count, step) picks this projection's N rows out of the fused N axis; and
    transposed means the tensor stores [K, N] per expert (rows are its columns). block: FP8 scale
    block (bn, bk), or (1, group) for INT4. global_key: nvfp4's per-tensor F32 scale, which divides
    the group scales when global_divides (compressed-tensors) and multiplies them otherwise (ModelOpt).
    """

    kind: str
    weight_key: str
    scale_key: str | None = None
    expert: int | None = None
    rows: tuple[int, int, int] | None = None
    transposed: bool = False
    block: tuple[int, int] | None = None
    global_key: str | None = None
    global_divides: bool = False


def source_slabs(src: ProjectionSource) -> list[Slab]:
    """The byte ranges read_source_matrix needs: one expert's part of a fused tensor, or the tensor."""
    return [Slab(k, src.expert) for k in (src.weight_key, src.scale_key, src.global_key) if k is not None]


def _global_scale(src: ProjectionSource, batch) -> float:
    """nvfp4's per-tensor scale, as read: a positive finite float32, else exit 2 naming the tensor."""
    g = np.asarray(batch[Slab(src.global_key, src.expert)], dtype=np.float32).reshape(-1)
    value = float(g[0])
    if not (np.isfinite(value) and value > 0):
        raise UserError(f"tensor {src.global_key} holds {value}, not a positive finite per-tensor scale: the "
                        "checkpoint is damaged; re-download it")
    return value


def read_source_matrix(src: ProjectionSource, batch) -> SourceMatrix:
    """The projection as a SourceMatrix over the slabs a SourceStream read (batch[Slab] -> array):
    views where the arrangement allows, one expert matrix copied where it is stored transposed."""
    w = batch[Slab(src.weight_key, src.expert)]
    s = batch[Slab(src.scale_key, src.expert)] if src.scale_key is not None else None
    if src.kind == "mxfp4":
        w = w.view(np.uint8)
        if w.ndim == 3:  # gpt-oss [N, K/32, 16]: contiguous blocks of one row = [N, K/2]
            w = w.reshape(w.shape[0], -1)
        s = s.view(np.uint8)
    if src.transposed:
        if src.rows is not None:
            start, count, step = src.rows
            w = w[:, start : start + count * step : step]
        w = np.ascontiguousarray(w.T)
    elif src.rows is not None:
        start, count, step = src.rows
        w = w[start : start + count * step : step]
        s = s[start : start + count * step : step] if s is not None else None
    if src.kind == "f16":
        w = w.view(np.uint16)
    if src.kind in ("nvfp4", "mxfp8"):
        w, s = w.view(np.uint8), s.view(np.uint8)
    if src.kind == "nvfp4":
        return SourceMatrix(src.kind, w, s, src.block, global_scale=_global_scale(src, batch),
                            global_divides=src.global_divides)
    return SourceMatrix(src.kind, w, s, src.block)


@dataclass
class LayerPlan:
    layer: int
    experts: list[dict[str, ProjectionSource]]  # [expert][gate|up|down]
    input_bytes: int
    output_bytes: int
    shard_name: str = ""


@dataclass
class ConversionPlan:
    family: str
    input_type: str
    method: QuantMethod
    threadpool_count: int
    hidden_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    activation: str
    swiglu_limit: float | None
    layout: str  # the output's form on disk: merged | kt-folders (kt_runtime.format.names)
    layers: list[LayerPlan] = field(default_factory=list)
    model_layers: list[int] = field(default_factory=list)  # every MoE layer of the model
    skipped_mtp_keys: int = 0
    skipped_mtp_layers: list[str] = field(default_factory=list)
    routed_keys: set[str] = field(default_factory=set)  # every routed-expert tensor, MTP ones included
    extra_shards: int = 0  # merged: a last shard of non-expert tensors
    # facts the runtime needs that are not packed (manifest `source`): expert arrangement, activation
    # parameters, expert tensors left unpacked (gpt-oss biases), config dtype
    source_info: dict = field(default_factory=dict)
    family_note: str | None = None  # the family came from the tensor names (convert.families.detection_note)
    serve_threadpool_count: int = 0  # the --kt-threadpool-count to serve with (0: threadpool_count)

    @property
    def partial(self) -> bool:
        """--layers left out some MoE layers of the model."""
        return [lp.layer for lp in self.layers] != self.model_layers

    @property
    def spec(self) -> PackedSpec:
        """What the output holds (the manifest's first fields)."""
        return PackedSpec(self.method.name, self.threadpool_count, self.hidden_size, self.moe_intermediate_size,
                          self.num_experts, self.num_experts_per_tok, tuple(lp.layer for lp in self.layers),
                          self.activation, self.swiglu_limit)

    @property
    def num_shards(self) -> int:
        return len(self.layers) + self.extra_shards if self.layout == "merged" else 0

    @property
    def input_bytes(self) -> int:
        return sum(lp.input_bytes for lp in self.layers)

    @property
    def output_bytes(self) -> int:
        return sum(lp.output_bytes for lp in self.layers)


MAX_DIM = 1 << 20  # hidden / intermediate sizes (the largest real ones are ~2**14)
MAX_EXPERTS = 1 << 16
MAX_LAYERS = 1 << 16
MAX_BLOCK = 1 << 16  # FP8 block and INT4 group sizes


class ConfigFields:
    """Typed reads of config.json (kt_runtime.format.json_fields): a missing field, a wrong type or a
    value out of range is exit 2 naming the file and the field."""

    def __init__(self, cfg: dict, where: str, path: str = ""):
        self.cfg, self.where, self.path = cfg, where, path  # path: "quantization_config." for nested objects

    def _call(self, fn, key, **kw):
        try:
            return fn(self.cfg, key, self.where, path=self.path, **kw)
        except FieldError as e:
            fix = "add it to config.json" if self.cfg.get(key) is None else "fix config.json (or re-download it)"
            raise UserError(f"{e}; {fix}") from None

    def int(self, key: str, lo: int | None = 1, hi: int | None = None, default=REQUIRED):
        return self._call(get_int, key, lo=lo, hi=hi, default=default)

    def first_int(self, keys: tuple[str, ...], what: str, lo: int = 1, hi: int | None = None) -> int:
        """The first of `keys` that is present (not null), checked; exit 2 if none is."""
        for key in keys:
            if self.cfg.get(key) is not None:
                return self.int(key, lo=lo, hi=hi)
        raise UserError(f"{self.where}: no {what} (looked for {', '.join(keys)}); add it to config.json")

    def number(self, key: str, positive: bool = False, default=REQUIRED):
        return self._call(get_number, key, positive=positive, default=default)

    def str(self, key: str, default=REQUIRED, choices=None):
        return self._call(get_str, key, default=default, choices=choices)

    def int_list(self, key: str, lo=None, hi=None, length=None, default=REQUIRED):
        return self._call(get_int_list, key, lo=lo, hi=hi, length=length, default=default)

    def object(self, key: str) -> "ConfigFields | None":
        """A nested object as ConfigFields, or None when absent."""
        value = self._call(get_dict, key, default=None)
        return None if value is None else ConfigFields(value, self.where, f"{self.path}{key}.")


def text_config(config: dict, where: str = "config.json") -> dict:
    """The language model's config: text_config (VL wrappers, Qwen3.5) merged over the top level."""
    inner = ConfigFields(config, where).object("text_config")
    return {**config, **inner.cfg} if inner is not None else config


def config_moe_layers(family: Family, cfg: ConfigFields, num_layers: int) -> tuple[list[int], str]:
    """The decoder layers config.json makes MoE, by the family's rule, and the rule in words."""
    if family.moe_layer_rule == "first_k_dense":
        k = cfg.int("first_k_dense_replace", lo=0, hi=num_layers, default=0)
        freq = cfg.int("moe_layer_freq", lo=1, hi=MAX_LAYERS, default=1)
        rule = f"first_k_dense_replace {k}" + (f", moe_layer_freq {freq}" if freq != 1 else "")
        return [L for L in range(num_layers) if L >= k and L % freq == 0], rule
    if family.moe_layer_rule == "sparse_step":
        step = cfg.int("decoder_sparse_step", lo=1, hi=MAX_LAYERS, default=1)
        dense = set(cfg.int_list("mlp_only_layers", lo=0, hi=MAX_LAYERS, default=[]))
        rule = f"decoder_sparse_step {step}" + (f", mlp_only_layers {layer_spec(sorted(dense))}" if dense else "")
        return [L for L in range(num_layers) if L not in dense and (L + 1) % step == 0], rule
    return list(range(num_layers)), f"every layer of {family.name} is MoE"


def layer_spec(layers) -> str:
    """[0, 1, 2, 3, 7] -> "0-3,7" (the --layers syntax)."""
    out, layers = [], sorted(layers)
    i = 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        out.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ",".join(out)


def parse_layer_spec(spec: str) -> list[int]:
    """ "0-3,7" -> [0, 1, 2, 3, 7]; ValueError with the reason."""
    layers: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()) or len(lo) > 6 or len(hi) > 6:
            raise ValueError(f"{part!r} is not a layer number or a range like 0-3")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            raise ValueError(f"range {part!r} runs backwards")
        layers.update(range(a, b + 1))
    return sorted(layers)


def check_alignment(method: QuantMethod, hidden: int, inter: int, threadpool_count: int,
                    inter_key: str = "moe_intermediate_size") -> None:
    """Exit 2 when the method cannot hold these dims for this threadpool count, with the counts and
    methods that would work (the rule: kt_runtime.format.methods.alignment_problem); inter_key: the
    config.json key the intermediate size came from."""
    problem = alignment_problem(method, hidden, inter, threadpool_count, flags=True, intermediate_key=inter_key)
    if problem is None:
        return
    ok = working_threadpool_counts(method, hidden, inter)
    hint = f"threadpool counts that work with {method.name}: {', '.join(map(str, ok))}" if ok else \
        f"no threadpool count works with {method.name}"
    others = [m.name for m in METHODS.values()
              if m is not method and alignment_problem(m, hidden, inter, threadpool_count) is None]
    if others:
        hint += f"; --quant-method {others[0]} works with --threadpool-count {threadpool_count}"
    raise UserError(f"cannot pack this model: {problem} ({hint})")


def _shape_error(ckpt: Checkpoint, key: str, want, what: str) -> UserError:
    info = ckpt.info(key)
    return UserError(f"{ckpt.where(key)}: tensor {key} has shape {list(info.shape)}, expected {list(want)} "
                     f"for {what} (config.json dims do not match the weights)")


def _require(ckpt: Checkpoint, key: str, dtypes: tuple[str, ...], shape, what: str) -> None:
    info = ckpt.info(key)
    if info.dtype not in dtypes:
        raise UserError(f"{ckpt.where(key)}: tensor {key} is {info.dtype}, expected {'/'.join(dtypes)} for {what}")
    if shape is not None and tuple(info.shape) != tuple(shape):
        raise _shape_error(ckpt, key, shape, what)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _Quant:
    """What config.json's quantization_config (and a ModelOpt hf_quant_config.json) declare: block sizes,
    and the routed experts' format, which must agree with the tensors (docs/FORMAT.md §6)."""

    def __init__(self, cfg: ConfigFields, hf_quant_config: dict | None = None, hf_where: str = ""):
        self.qc = cfg.object("quantization_config") or ConfigFields({}, cfg.where, "quantization_config.")
        self.where = cfg.where
        self.hf = None
        if hf_quant_config is not None:
            self.hf = ConfigFields(hf_quant_config, hf_where).object("quantization") or \
                ConfigFields({}, hf_where, "quantization.")

    def declared(self) -> tuple[str | None, str]:
        """(format, how it is declared): nvfp4-modelopt | nvfp4-ct | mxfp4-ct | mxfp8 | int4 | mxfp4 | fp8 |
        another method's name | None (nothing declared)."""
        method = self.qc.str("quant_method", default=None)
        algo = self.qc.str("quant_algo", default=None)
        fmt = self.qc.str("format", default=None)
        hf_algo = self.hf.str("quant_algo", default=None) if self.hf is not None else None
        if method == "modelopt" or (method is None and hf_algo is not None):
            algo = algo or hf_algo
            if hf_algo is not None and algo != hf_algo:
                raise UserError(f"{self.where}: quantization_config.quant_algo {algo!r} and hf_quant_config.json's "
                                f"quantization.quant_algo {hf_algo!r} disagree: the files come from different "
                                "checkpoints; re-download them")
            how = f"ModelOpt quant_algo {algo!r}"
            return ("nvfp4-modelopt" if algo == "NVFP4" else f"modelopt {algo}"), how
        if method == "compressed-tensors":
            kinds = {"nvfp4-pack-quantized": "nvfp4-ct", "mxfp4-pack-quantized": "mxfp4-ct",
                     "mxfp8-quantized": "mxfp8", "pack-quantized": "int4"}
            return kinds.get(fmt, f"compressed-tensors {fmt}"), f"compressed-tensors format {fmt!r}"
        if method is None:
            return None, "no quantization_config"
        return method, f"quant_method {method!r}"

    def expect(self, kind: str, allowed: tuple, key: str, ckpt: Checkpoint) -> None:
        """Exit 2 unless the declared format is one of `allowed` (None: nothing declared is allowed)."""
        declared, how = self.declared()
        if declared in allowed:
            return
        want = " or ".join(DECLARATIONS[a] for a in allowed if a is not None)
        raise UserError(f"{ckpt.where(key)}: tensor {key} is stored as {kind}, but {self.where} declares {how}: "
                        f"the config and the weights disagree (a {kind} checkpoint declares {want}); fix "
                        "config.json or use the matching files")

    def nvfp4_group(self) -> None:
        """The declared NVFP4 group size, where declared, must be 16."""
        sizes = []
        if self.hf is not None and self.hf.cfg.get("group_size") is not None:
            sizes.append(("hf_quant_config.json quantization.group_size", self.hf.int("group_size", hi=MAX_BLOCK)))
        groups = self.qc.object("config_groups")
        for name in (groups.cfg if groups is not None else {}):
            w = groups.object(name).object("weights") if groups.object(name) is not None else None
            if w is not None and w.cfg.get("group_size") is not None:
                sizes.append((f"config_groups.{name}.weights.group_size", w.int("group_size", hi=MAX_BLOCK)))
        for where, g in sizes:
            if g != NVFP4_GROUP:
                raise UserError(f"{self.where}: {where} is {g}; NVFP4 has one scale per {NVFP4_GROUP} weights")

    def fp8_block(self) -> tuple[int, int]:
        if self.qc.cfg.get("weight_block_size") is None:
            raise UserError(f"{self.where}: FP8 expert weights need quantization_config.weight_block_size "
                            "(e.g. [128, 128]); add it to config.json")
        bn, bk = self.qc.int_list("weight_block_size", lo=1, hi=MAX_BLOCK, length=2)
        return bn, bk

    def int4_group(self) -> int:
        method = self.qc.str("quant_method", default=None)
        fmt = self.qc.str("format", default=None)
        if method != "compressed-tensors" or fmt != "pack-quantized":
            raise UserError(f"{self.where}: weight_packed experts need quantization_config quant_method "
                            f"compressed-tensors with format pack-quantized; found {method!r} / {fmt!r}")
        groups = self.qc.object("config_groups")
        for name in (groups.cfg if groups is not None else {}):
            group = groups.object(name)
            w = group.object("weights") if group is not None else None
            if w is None or w.cfg.get("num_bits") != 4:
                continue
            kind, symmetric = w.str("type", default="int"), w.cfg.get("symmetric", True)
            strategy = w.str("strategy", default=None)
            if kind != "int" or symmetric is not True or strategy != "group":
                raise UserError(f"{self.where}: config_groups.{name}: only symmetric int4 with strategy group is "
                                f"supported (found type {describe(kind)}, symmetric {describe(symmetric)}, "
                                f"strategy {describe(strategy)})")
            return w.int("group_size", lo=1, hi=MAX_BLOCK)
        raise UserError(f"{self.where}: quantization_config.config_groups has no 4-bit weight group")


# How each format is declared in config.json (for the messages of _Quant.expect).
DECLARATIONS = {
    "nvfp4-modelopt": "quantization_config quant_method 'modelopt' with quant_algo 'NVFP4' (or hf_quant_config.json)",
    "nvfp4-ct": "quant_method 'compressed-tensors' with format 'nvfp4-pack-quantized'",
    "mxfp4-ct": "quant_method 'compressed-tensors' with format 'mxfp4-pack-quantized'",
    "mxfp4": "quant_method 'mxfp4'", "mxfp8": "quant_method 'mxfp8' or compressed-tensors 'mxfp8-quantized'",
    "fp8": "quant_method 'fp8'", "int4": "compressed-tensors 'pack-quantized'",
}


def _scalar_f32(ckpt: Checkpoint, key: str, what: str) -> None:
    info = ckpt.info(key)
    if info.dtype != "F32" or tuple(info.shape) not in ((), (1,)):
        raise UserError(f"{ckpt.where(key)}: tensor {key} is {info.dtype} {list(info.shape)}, expected one F32 value "
                        f"({what})")


def _classify_fp4_packed(ckpt: Checkpoint, parts: dict[str, str], n: int, k: int, quant: _Quant) -> ProjectionSource:
    """compressed-tensors FP4 (U8 weight_packed): NVFP4 (F8_E4M3 per 16 + weight_global_scale, a divisor) or
    MXFP4 (E8M0 per 32), told apart by the scale dtype and the config's format, which must agree."""
    key, scale = parts["packed"], parts.get("scale")
    _require(ckpt, key, ("U8", "I8"), (n, k // 2), f"packed FP4 of a {n}x{k} matrix")
    if scale is None:
        raise UserError(f"{ckpt.root}: FP4 tensor {key} has no weight_scale; the checkpoint is incomplete")
    if ckpt.info(scale).dtype == "F8_E4M3":
        quant.expect("NVFP4", ("nvfp4-ct",), key, ckpt)
        quant.nvfp4_group()
        _require(ckpt, scale, ("F8_E4M3",), (n, k // NVFP4_GROUP), "NVFP4 scales (one F8_E4M3 per 16 weights)")
        g = parts.get("global")
        if g is None or not g.endswith("weight_global_scale"):
            raise UserError(f"{ckpt.root}: NVFP4 tensor {key} has no weight_global_scale; the checkpoint is incomplete")
        _scalar_f32(ckpt, g, "the NVFP4 per-tensor scale")
        return ProjectionSource("nvfp4", key, scale, block=(1, NVFP4_GROUP), global_key=g, global_divides=True)
    quant.expect("MXFP4", ("mxfp4-ct",), key, ckpt)
    _require(ckpt, scale, FP4_SCALE_DTYPES, (n, k // 32), "MXFP4 scales (one E8M0 scale per 32 weights)")
    if "global" in parts:
        raise UserError(f"{ckpt.where(parts['global'])}: MXFP4 tensor {key} has a per-tensor scale "
                        f"{parts['global']}; MXFP4 has none (is the checkpoint NVFP4 with E8M0 scales?)")
    return ProjectionSource("mxfp4", key, scale)


def _classify(ckpt: Checkpoint, parts: dict[str, str], shape: tuple[int, int], quant: _Quant) -> ProjectionSource:
    """One per-expert projection: its decoder, checked against dtypes and the config dims."""
    n, k = shape
    if "packed" in parts and ckpt.info(parts["packed"]).dtype in ("U8", "I8"):
        return _classify_fp4_packed(ckpt, parts, n, k, quant)
    if "packed" in parts:
        key, group = parts["packed"], quant.int4_group()
        _require(ckpt, key, ("I32",), (n, _cdiv(k, 8)), f"compressed-tensors INT4 of a {n}x{k} matrix")
        if k % group:
            raise UserError(f"{ckpt.where(key)}: {key}: {k} columns are not a multiple of the group size {group}")
        scale = parts.get("scale")
        if scale is None:
            raise UserError(f"{ckpt.root}: INT4 tensor {key} has no weight_scale; the checkpoint is incomplete")
        _require(ckpt, scale, ("BF16", "F32"), (n, k // group), f"INT4 group scales (group {group})")
        if key.replace("weight_packed", "weight_zero_point") in ckpt.key_file:
            raise UserError(f"{ckpt.where(key)}: {key} has a weight_zero_point: asymmetric INT4 is not supported")
        if "shape" in parts:
            stored = [int(x) for x in ckpt.read_tensor(parts["shape"]).reshape(-1)]
            if stored != [n, k]:
                raise UserError(f"{ckpt.where(parts['shape'])}: {parts['shape']} says {stored}, expected {[n, k]} "
                                "(config.json dims do not match the weights)")
        return ProjectionSource("int4_group", key, scale, block=(1, group))
    weight_key = parts.get("weight")
    if weight_key is None:
        raise UserError(f"{ckpt.root}: expert tensors {sorted(parts.values())} have no weight; the checkpoint is incomplete")
    scale_key = parts.get("scale")
    w = ckpt.info(weight_key)
    if w.dtype in FP4_WEIGHT_DTYPES:
        _require(ckpt, weight_key, FP4_WEIGHT_DTYPES, (n, k) if w.dtype == "F4" else (n, k // 2),
                 f"packed FP4 of a {n}x{k} matrix")
        if scale_key is None:
            raise UserError(f"{ckpt.root}: FP4 tensor {weight_key} has no scale tensor; the checkpoint is incomplete")
        if ckpt.info(scale_key).dtype == "F8_E4M3":  # ModelOpt NVFP4: weight_scale per 16, weight_scale_2 multiplies
            quant.expect("NVFP4", ("nvfp4-modelopt",), weight_key, ckpt)
            quant.nvfp4_group()
            _require(ckpt, weight_key, ("U8", "I8"), (n, k // 2), f"packed NVFP4 of a {n}x{k} matrix")
            _require(ckpt, scale_key, ("F8_E4M3",), (n, k // NVFP4_GROUP), "NVFP4 scales (one F8_E4M3 per 16 weights)")
            g = parts.get("global")
            if g is None or not g.endswith("weight_scale_2"):
                raise UserError(f"{ckpt.root}: NVFP4 tensor {weight_key} has no weight_scale_2; the checkpoint is "
                                "incomplete")
            _scalar_f32(ckpt, g, "the NVFP4 per-tensor scale")
            return ProjectionSource("nvfp4", weight_key, scale_key, block=(1, NVFP4_GROUP), global_key=g)
        quant.expect("MXFP4", (None, "mxfp4", "fp8", "mxfp4-ct"), weight_key, ckpt)
        _require(ckpt, scale_key, FP4_SCALE_DTYPES, (n, k // 32), "MXFP4 scales (one E8M0 scale per 32 weights)")
        if "global" in parts:
            raise UserError(f"{ckpt.where(parts['global'])}: MXFP4 tensor {weight_key} has a per-tensor scale "
                            f"{parts['global']}; MXFP4 has none (is the checkpoint NVFP4 with E8M0 scales?)")
        return ProjectionSource("mxfp4", weight_key, scale_key)
    if w.dtype == "F8_E4M3" and scale_key is not None and ckpt.info(scale_key).dtype in FP4_SCALE_DTYPES:
        quant.expect("MXFP8", (None, "mxfp8"), weight_key, ckpt)
        _require(ckpt, weight_key, ("F8_E4M3",), (n, k), f"MXFP8 weights of a {n}x{k} matrix")
        _require(ckpt, scale_key, FP4_SCALE_DTYPES, (n, k // 32), "MXFP8 scales (one E8M0 scale per 32 weights)")
        return ProjectionSource("mxfp8", weight_key, scale_key)
    if w.dtype == "F8_E4M3":
        bn, bk = quant.fp8_block()
        _require(ckpt, weight_key, ("F8_E4M3",), (n, k), f"FP8 weights of a {n}x{k} matrix")
        if scale_key is None:
            raise UserError(f"{ckpt.root}: FP8 tensor {weight_key} has no weight_scale_inv/scale; the checkpoint is incomplete")
        _require(ckpt, scale_key, ("F32",), (_cdiv(n, bn), _cdiv(k, bk)), f"FP8 block scales (blocks {bn}x{bk})")
        return ProjectionSource("fp8_block", weight_key, scale_key, block=(bn, bk))
    if w.dtype in FLOAT_KINDS:
        if tuple(w.shape) != (n, k):
            raise UserError(f"{ckpt.where(weight_key)}: tensor {weight_key} is {w.dtype} with shape {list(w.shape)}, "
                            f"expected {[n, k]} for a {n}x{k} expert matrix: config.json dims do not match the "
                            f"weights, or the dtype is wrong (supported: {SUPPORTED})")
        return ProjectionSource(FLOAT_KINDS[w.dtype], weight_key, None)
    raise UserError(f"{ckpt.where(weight_key)}: tensor {weight_key} has dtype {w.dtype}, which this converter "
                    f"does not decode for routed experts (supported: {SUPPORTED})")


def _fused_sources(ckpt: Checkpoint, family: Family, projs: dict[str, dict[str, str]], layer: int,
                   hidden: int, inter: int, num_experts: int) -> list[dict[str, ProjectionSource]]:
    """Per-expert sources of one layer's fused expert tensors; orientation from the family."""
    E, H, I = num_experts, hidden, inter
    for proj in ("gate_up", "down"):
        if "weight" not in projs.get(proj, {}):
            raise UserError(f"{ckpt.root}: layer {layer} has no fused {proj}_proj expert tensor; the checkpoint is incomplete")
    gu, down = projs["gate_up"]["weight"], projs["down"]["weight"]
    dtype = ckpt.info(gu).dtype
    interleaved = family.arrangement == "gpt-oss-interleaved"
    if interleaved and dtype in ("U8", "I8"):  # gpt-oss MXFP4 _blocks/_scales
        gs, ds = projs["gate_up"].get("scale"), projs["down"].get("scale")
        if gs is None or ds is None:
            raise UserError(f"{ckpt.root}: layer {layer}: gpt-oss MXFP4 blocks without _scales; the checkpoint is incomplete")
        _require(ckpt, gu, ("U8", "I8"), (E, 2 * I, H // 32, 16), "gpt-oss gate_up_proj_blocks [E, 2I, H/32, 16]")
        _require(ckpt, gs, ("U8", "F8_E8M0"), (E, 2 * I, H // 32), "gpt-oss gate_up_proj_scales [E, 2I, H/32]")
        _require(ckpt, down, ("U8", "I8"), (E, H, I // 32, 16), "gpt-oss down_proj_blocks [E, H, I/32, 16]")
        _require(ckpt, ds, ("U8", "F8_E8M0"), (E, H, I // 32), "gpt-oss down_proj_scales [E, H, I/32]")
        return [{"gate": ProjectionSource("mxfp4", gu, gs, expert=e, rows=(0, I, 2)),
                 "up": ProjectionSource("mxfp4", gu, gs, expert=e, rows=(1, I, 2)),
                 "down": ProjectionSource("mxfp4", down, ds, expert=e)} for e in range(E)]
    if dtype not in FLOAT_KINDS:
        raise UserError(f"{ckpt.where(gu)}: fused expert tensor {gu} is {dtype}; fused {family.name} experts are "
                        "read as BF16/FP16 (gpt-oss also as MXFP4 _blocks/_scales)")
    kind = FLOAT_KINDS[dtype]
    if family.arrangement == "fused":
        _require(ckpt, gu, (dtype,), (E, 2 * I, H), f"{family.name} gate_up_proj [E, 2I, H]")
        _require(ckpt, down, (dtype,), (E, H, I), f"{family.name} down_proj [E, H, I]")
        return [{"gate": ProjectionSource(kind, gu, expert=e, rows=(0, I, 1)),
                 "up": ProjectionSource(kind, gu, expert=e, rows=(I, I, 1)),
                 "down": ProjectionSource(kind, down, expert=e)} for e in range(E)]
    # fused-transposed, and gpt-oss BF16 (interleaved along the last dim)
    _require(ckpt, gu, (dtype,), (E, H, 2 * I), f"{family.name} gate_up_proj [E, H, 2I]")
    _require(ckpt, down, (dtype,), (E, I, H), f"{family.name} down_proj [E, I, H]")
    gate_rows, up_rows = ((0, I, 2), (1, I, 2)) if interleaved else ((0, I, 1), (I, I, 1))
    return [{"gate": ProjectionSource(kind, gu, expert=e, rows=gate_rows, transposed=True),
             "up": ProjectionSource(kind, gu, expert=e, rows=up_rows, transposed=True),
             "down": ProjectionSource(kind, down, expert=e, transposed=True)} for e in range(E)]


def _marker_layers(family: Family, keys) -> set[int]:
    """Layers that hold the family's MTP marker tensor (layers.L.eh_proj.weight for V3/GLM)."""
    if family.mtp_count_key is None:
        return set()
    marker = re.compile(r"(?:^|\.)layers\.(\d{1,9})\." + re.escape(family.mtp_marker) + "$")
    return {int(m[1]) for m in map(marker.search, keys) if m}


def _incomplete_hint(ckpt: Checkpoint) -> str:
    if not ckpt.unindexed:
        return ""
    names = ", ".join(ckpt.unindexed[:3]) + (" ..." if len(ckpt.unindexed) > 3 else "")
    return (f" ({names} in the folder {'is' if len(ckpt.unindexed) == 1 else 'are'} not named by "
            f"model.safetensors.index.json: is the index incomplete?)")


def select_layers(ckpt: Checkpoint, family: Family, cfg: ConfigFields, found: set[int],
                  requested: list[int] | None) -> tuple[list[int], list[int], list[int]]:
    """(layers to convert, every MoE layer of the model, MTP layers skipped), from config.json AND
    the tensors: any disagreement stops the run unless --layers narrows it (then only the listed
    layers are checked)."""
    where = cfg.where
    num_layers = cfg.int("num_hidden_layers", hi=MAX_LAYERS)
    expected, rule = config_moe_layers(family, cfg, num_layers)
    mtp_count = cfg.int(family.mtp_count_key, lo=0, hi=MAX_LAYERS, default=0) if family.mtp_count_key else 0
    markers = _marker_layers(family, ckpt.key_file)
    beyond = sorted(L for L in found if L >= num_layers)
    mtp = [L for L in beyond if L < num_layers + mtp_count and L in markers]
    stray = [L for L in beyond if L not in mtp]
    narrow = " or pass --layers to convert only some layers"
    if requested is not None:
        not_moe = sorted(set(requested) - set(expected))
        if not_moe:
            which = f"layer {not_moe[0]} is not a MoE layer" if len(not_moe) == 1 else \
                f"layers {layer_spec(not_moe)} are not MoE layers"
            raise UserError(f"--layers: {which} of this model: config.json makes layers "
                            f"{layer_spec(expected) or 'none'} MoE (num_hidden_layers {num_layers}, {rule})")
        todo = list(requested)
    else:
        if stray:
            mtp_rule = (f" and {family.mtp_count_key} {mtp_count} (MTP layers are {num_layers}.."
                        f"{num_layers + mtp_count - 1}, each with a {family.mtp_marker})" if mtp_count else
                        f" and {family.name} keeps no MTP layers there" if family.mtp_count_key is None else
                        f" and {family.mtp_count_key} 0")
            raise UserError(f"{ckpt.root}: layers {layer_spec(stray)} hold routed-expert tensors, but {where} says "
                            f"num_hidden_layers {num_layers}{mtp_rule}: config.json does not describe these weights "
                            f"(is num_hidden_layers too small?); fix config.json,{narrow}")
        dense_with_experts = sorted(L for L in found if L < num_layers and L not in set(expected))
        if dense_with_experts:
            raise UserError(f"{ckpt.root}: layers {layer_spec(dense_with_experts)} hold routed-expert tensors, but "
                            f"{where} makes them dense ({rule}): config.json does not describe these weights; "
                            f"fix config.json,{narrow}")
        todo = expected
    missing = sorted(set(todo) - found)
    if missing:
        raise UserError(f"{ckpt.root}: layers {layer_spec(missing)} have no routed-expert tensors, but {where} makes "
                        f"them MoE (num_hidden_layers {num_layers}, {rule}){_incomplete_hint(ckpt)}: the checkpoint "
                        f"is incomplete; fetch the missing files"
                        + (f",{narrow}" if requested is None else " or drop them from --layers"))
    return todo, expected, mtp


def build_plan(ckpt: Checkpoint, method: QuantMethod, threadpool_count: int, layout: str,
               input_type: str = "auto", extra_shards: int = 0, layers: list[int] | None = None) -> ConversionPlan:
    """layers: --layers (None: every MoE layer; the plan then covers the whole model or stops)."""
    where = str(ckpt.root / "config.json")
    fields = ConfigFields(text_config(ckpt.config, where), where)
    model_type = fields.str("model_type", default=None)
    outer = ConfigFields(ckpt.config, where).str("model_type", default=None)
    if family_for(outer) is not None:  # Kimi K3: kimi_k3 outside, its text_config says kimi_linear
        model_type = outer
    family = detect_family(model_type, ckpt.key_file)
    if family is None:
        raise UserError(f"{where}: {describe_unknown(model_type, ckpt.key_file)}")
    hidden = fields.first_int(family.hidden_keys, "routed-expert hidden size", hi=MAX_DIM)
    inter = fields.first_int(family.intermediate_keys, "routed-expert intermediate size", hi=MAX_DIM)
    num_experts = fields.first_int(family.expert_count_keys, "routed expert count", hi=MAX_EXPERTS)
    top_k_keys = ("num_experts_per_tok", "num_experts_per_token", "experts_per_token")
    top_k = fields.first_int(top_k_keys, "num_experts_per_tok", hi=MAX_EXPERTS)
    if top_k > num_experts:
        raise UserError(f"{where}: num_experts_per_tok {top_k} exceeds the {num_experts} routed experts; "
                        "fix config.json")
    swiglu = fields.number("swiglu_limit", positive=True, default=None)
    if threadpool_count < 1:
        raise UserError(f"--threadpool-count must be at least 1, got {threadpool_count}")
    check_alignment(method, hidden, inter, threadpool_count,
                    next(k for k in family.intermediate_keys if fields.cfg.get(k) is not None))
    serve = threadpool_count  # a whole-matrix output is served with the count it was checked for
    # the byte order's refusals (a SwiGLU clamp, kt's .kt folders), then the pools it holds on disk: a
    # whole-matrix order holds one, after the alignment check for the count it will be served with
    problem = method.byte_order.output_problem(method, layout, swiglu if swiglu is not None else
                                               family.default_swiglu_limit, f"{where} ({family.name})")
    if problem is not None:
        raise UserError(problem)
    threadpool_count = method.byte_order.stored_pools(threadpool_count)

    # layer -> expert (None: fused over experts) -> gate|up|down|gate_up -> part -> key
    found: dict[int, dict[int | None, dict[str, dict[str, str]]]] = {}
    skipped_mtp = 0
    routed = set()
    biases: dict[str, int] = {}
    for key in ckpt.key_file:
        if family.is_mtp(key):
            skipped_mtp += 1
            routed.add(key)
            continue
        hit = family.match_expert(key)
        if hit is None:
            continue
        layer, expert, proj, part = hit
        if part == "bias":  # not packed: left for the runtime (kt does not copy it either: convert/non_expert.py)
            biases[key] = layer
            continue
        routed.add(key)
        found.setdefault(layer, {}).setdefault(expert, {}).setdefault(proj, {})[part] = key
    if not found:
        raise UserError(f"{ckpt.root}: config.json names family {family.name}, but none of its routed-expert keys "
                        f"were found (e.g. {family.expert_keys[0].pattern}); {describe_unknown(None, ckpt.key_file)}")
    todo, model_layers, mtp_layers = select_layers(ckpt, family, fields, set(found), layers)
    for layer in mtp_layers:  # V3/GLM put MTP at index num_hidden_layers
        skipped_mtp += sum(len(parts) for e in found[layer].values() for parts in e.values())

    plan = ConversionPlan(family.name, "auto", method, threadpool_count, hidden, inter, num_experts, top_k,
                          family.activation, swiglu if swiglu is not None else family.default_swiglu_limit, layout,
                          model_layers=model_layers, skipped_mtp_keys=skipped_mtp,
                          skipped_mtp_layers=[str(x) for x in mtp_layers],
                          routed_keys=routed, extra_shards=extra_shards if layout == "merged" else 0,
                          family_note=detection_note(model_type, family), serve_threadpool_count=serve)
    quant = _Quant(fields, ckpt.hf_quant_config, str(ckpt.root / HF_QUANT_CONFIG))
    out_bytes = plan.spec.layer_data_bytes()  # the same for every layer
    kinds = set()
    for layer in todo:
        by_expert = found[layer]
        if family.fused:
            if set(by_expert) != {None}:
                raise UserError(f"{ckpt.root}: layer {layer} mixes fused and per-expert tensors")
            experts = _fused_sources(ckpt, family, by_expert[None], layer, hidden, inter, num_experts)
        else:
            experts = []
            for expert in range(num_experts):
                projs = by_expert.get(expert)
                if projs is None:
                    raise UserError(f"{ckpt.root}: layer {layer} has no tensors for expert {expert} "
                                    f"(config says {num_experts} experts){_incomplete_hint(ckpt)}; the checkpoint "
                                    "is incomplete")
                per_proj = {}
                for proj in PROJECTIONS:
                    parts = projs.get(proj)
                    if not parts:
                        raise UserError(f"{ckpt.root}: layer {layer} expert {expert} has no {proj} weight"
                                        f"{_incomplete_hint(ckpt)}; the checkpoint is incomplete")
                    per_proj[proj] = _classify(ckpt, parts, full_shape(proj, hidden, inter), quant)
                experts.append(per_proj)
            extra = sorted(e for e in by_expert if e >= num_experts)
            if extra:
                raise UserError(f"{ckpt.root}: layer {layer} has expert {extra[0]} but config.json says "
                                f"{num_experts} experts")
        kinds.update(src.kind for e in experts for src in e.values())
        layer_keys = {k for e in by_expert.values() for parts in e.values() for k in parts.values()}
        in_bytes = sum(ckpt.info(k).nbytes for k in layer_keys)
        plan.layers.append(LayerPlan(layer, experts, in_bytes, out_bytes))
    detected = input_type_of(next(iter(kinds))) if len(kinds) == 1 else \
        "mixed (" + ", ".join(sorted(input_type_of(k) for k in kinds)) + ")"
    if input_type not in ("auto", detected):
        hint = f"drop --input-type or pass --input-type {detected}" if len(kinds) == 1 else "drop --input-type"
        raise UserError(f"--input-type {input_type} does not match the checkpoint: its routed experts are "
                        f"{detected} ({family.name}); {hint}")
    declared = fields.str("expert_dtype", default=None)  # DeepSeek-V4: "fp4" (Flash) or "fp8" (Flash-Base)
    if declared in ("fp4", "fp8") and detected in ("fp4", "fp8") and declared != detected:
        raise UserError(f"{where}: expert_dtype is {declared!r} but the routed experts are stored as {detected} "
                        "(MXFP4: I8/U8/F4 + E8M0; FP8: F8_E4M3 + F32): the config and the weights come from "
                        "different checkpoints; fix config.json")
    plan.input_type = detected
    plan.source_info = {"expert_layout": family.arrangement}  # the manifest's name for it
    if family.activation_params:
        params = dict(family.activation_params)
        for name, key in family.activation_param_keys.items():
            params[name] = fields.number(key, positive=True, default=params[name])
        plan.source_info["activation_params"] = params
    model_hidden = fields.int("hidden_size", hi=MAX_DIM, default=hidden)
    if model_hidden != hidden:  # the experts run on a latent width (Kimi K3); the runtime takes `hidden_size`
        plan.source_info["model_hidden_size"] = model_hidden
    kept_biases = sorted(k for k, layer in biases.items() if layer in set(todo))
    if kept_biases:
        plan.source_info["unpacked_expert_tensors"] = kept_biases
    dtype = fields.str("dtype", default=None) or fields.str("torch_dtype", default=None)
    if dtype:
        plan.source_info["config_dtype"] = dtype
    for i, lp in enumerate(plan.layers, 1):
        lp.shard_name = shard_file_name(i, plan.num_shards) if layout == "merged" else layer_dir_name(lp.layer)
    return plan
