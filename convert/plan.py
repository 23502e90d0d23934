"""The conversion plan: what will be read and written, checked from config.json and the
safetensors headers before any weight is read."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kt_runtime.format import layer_tensor_entries, shard_file_name
from quant import QuantMethod
from quant.cpu import SourceMatrix
from quant.numa import PROJECTIONS, full_shape

from .errors import UserError
from .families import Family, describe_unknown, detect_family
from .source import Checkpoint

# --input-type values and the source kinds (decoders) they cover.
INPUT_TYPES = {"fp4": "mxfp4", "fp8": "fp8_block", "bf16": "bf16", "fp16": "f16", "int4": "int4_group"}
FP4_WEIGHT_DTYPES = ("I8", "U8", "F4")
FP4_SCALE_DTYPES = ("F8_E8M0", "U8")
FLOAT_KINDS = {"BF16": "bf16", "F16": "f16"}
SUPPORTED = "MXFP4 (I8/U8/F4 + E8M0), FP8 block (F8_E4M3 + F32 scales), BF16, FP16, compressed-tensors INT4"


@dataclass(frozen=True)
class ProjectionSource:
    """Where one expert's projection lives and how to decode it.

    kind: decoder (mxfp4 | fp8_block | bf16 | f16 | int4_group). For fused tensors, expert indexes
    dim 0; rows = (start, count, step) picks this projection's N rows out of the fused N axis; and
    transposed means the tensor stores [K, N] per expert (rows are its columns). block: FP8 scale
    block (bn, bk), or (1, group) for INT4.
    """

    kind: str
    weight_key: str
    scale_key: str | None = None
    expert: int | None = None
    rows: tuple[int, int, int] | None = None
    transposed: bool = False
    block: tuple[int, int] | None = None


def read_source_matrix(ckpt: Checkpoint, src: ProjectionSource) -> SourceMatrix:
    """The projection as a SourceMatrix over the mapped file: views where the layout allows, one
    expert matrix copied where it is stored transposed."""
    w = ckpt.array(src.weight_key)
    s = ckpt.array(src.scale_key) if src.scale_key is not None else None
    if src.expert is not None:
        w = w[src.expert]
        s = s[src.expert] if s is not None else None
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
    layout: str  # merged | kt-folders
    layers: list[LayerPlan] = field(default_factory=list)
    skipped_mtp_keys: int = 0
    skipped_mtp_layers: list[str] = field(default_factory=list)
    routed_keys: set[str] = field(default_factory=set)  # every routed-expert tensor, MTP ones included
    extra_shards: int = 0  # merged: a last shard of non-expert tensors
    # facts the runtime needs that are not packed (manifest `source`): expert layout, activation
    # parameters, expert tensors left unpacked (gpt-oss biases), config dtype
    source_info: dict = field(default_factory=dict)

    @property
    def num_shards(self) -> int:
        return len(self.layers) + self.extra_shards if self.layout == "merged" else 0

    @property
    def input_bytes(self) -> int:
        return sum(lp.input_bytes for lp in self.layers)

    @property
    def output_bytes(self) -> int:
        return sum(lp.output_bytes for lp in self.layers)


def text_config(config: dict) -> dict:
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def _config_int(cfg: dict, keys: tuple[str, ...], what: str, where: str) -> int:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise UserError(f"{where}: no {what} (looked for {', '.join(keys)}); add it to config.json")


def alignment_problem(method: QuantMethod, hidden: int, inter: int, numa: int) -> str | None:
    """Why (H, I, T) cannot be packed with `method`, or None (research kt_format.md §2, §8)."""
    a = method.k_align
    if inter % numa:
        return f"moe_intermediate_size {inter} is not divisible by --threadpool-count {numa}"
    if hidden % a:
        return f"hidden_size {hidden} is not a multiple of {a}, which --quant-method {method.name} needs"
    if (inter // numa) % a:
        return (f"moe_intermediate_size / threadpool_count = {inter} / {numa} = {inter // numa} is not a multiple of "
                f"{a}, which --quant-method {method.name} needs")
    return None


def working_threadpool_counts(method: QuantMethod, hidden: int, inter: int, limit: int = 16) -> list[int]:
    return [t for t in range(1, limit + 1) if alignment_problem(method, hidden, inter, t) is None]


def check_alignment(method: QuantMethod, hidden: int, inter: int, numa: int) -> None:
    problem = alignment_problem(method, hidden, inter, numa)
    if problem is None:
        return
    ok = working_threadpool_counts(method, hidden, inter)
    hint = f"threadpool counts that work with {method.name}: {', '.join(map(str, ok))}" if ok else \
        f"no threadpool count works with {method.name}"
    from quant import METHODS
    others = [m.name for m in METHODS.values() if m is not method and alignment_problem(m, hidden, inter, numa) is None]
    if others:
        hint += f"; --quant-method {others[0]} works with --threadpool-count {numa}"
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
    """Block sizes from config.json's quantization_config, read once and only when needed."""

    def __init__(self, cfg: dict, where: str):
        qc = cfg.get("quantization_config")
        self.qc = qc if isinstance(qc, dict) else {}
        self.where = where

    def fp8_block(self) -> tuple[int, int]:
        b = self.qc.get("weight_block_size")
        if not (isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) and x > 0 for x in b)):
            raise UserError(f"{self.where}: FP8 expert weights need quantization_config.weight_block_size "
                            f"(e.g. [128, 128]); found {b!r}")
        return b[0], b[1]

    def int4_group(self) -> int:
        if self.qc.get("quant_method") != "compressed-tensors" or self.qc.get("format") != "pack-quantized":
            raise UserError(f"{self.where}: weight_packed experts need quantization_config quant_method "
                            f"compressed-tensors with format pack-quantized; found {self.qc.get('quant_method')!r} / "
                            f"{self.qc.get('format')!r}")
        groups = self.qc.get("config_groups") or {}
        for name, group in (groups.items() if isinstance(groups, dict) else ()):
            w = (group or {}).get("weights") or {}
            if w.get("num_bits") != 4:
                continue
            if w.get("type", "int") != "int" or w.get("symmetric") is False or w.get("strategy") != "group":
                raise UserError(f"{self.where}: config_groups.{name}: only symmetric int4 with strategy group is "
                                f"supported (found type {w.get('type')!r}, symmetric {w.get('symmetric')!r}, "
                                f"strategy {w.get('strategy')!r})")
            g = w.get("group_size")
            if not isinstance(g, int) or g <= 0:
                raise UserError(f"{self.where}: config_groups.{name}.weights.group_size must be a positive int, got {g!r}")
            return g
        raise UserError(f"{self.where}: quantization_config.config_groups has no 4-bit weight group")


def _classify(ckpt: Checkpoint, parts: dict[str, str], shape: tuple[int, int], quant: _Quant) -> ProjectionSource:
    """One per-expert projection: its decoder, checked against dtypes and the config dims."""
    n, k = shape
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
            stored = [int(x) for x in ckpt.array(parts["shape"]).reshape(-1)]
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
                 f"packed MXFP4 of a {n}x{k} matrix")
        if scale_key is None:
            raise UserError(f"{ckpt.root}: MXFP4 tensor {weight_key} has no scale tensor; the checkpoint is incomplete")
        _require(ckpt, scale_key, FP4_SCALE_DTYPES, (n, k // 32), "MXFP4 scales (one E8M0 scale per 32 weights)")
        return ProjectionSource("mxfp4", weight_key, scale_key)
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
    interleaved = family.layout == "gpt-oss-interleaved"
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
    if family.layout == "fused":
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


def build_plan(ckpt: Checkpoint, method: QuantMethod, threadpool_count: int, layout: str,
               input_type: str = "auto", extra_shards: int = 0) -> ConversionPlan:
    where = str(ckpt.root / "config.json")
    cfg = text_config(ckpt.config)
    family = detect_family(cfg.get("model_type"), ckpt.key_file)
    if family is None:
        raise UserError(f"{where}: {describe_unknown(cfg.get('model_type'), ckpt.key_file)}")
    hidden = _config_int(cfg, ("hidden_size",), "hidden_size", where)
    inter = _config_int(cfg, family.intermediate_keys, "routed-expert intermediate size", where)
    num_experts = _config_int(cfg, family.expert_count_keys, "routed expert count", where)
    top_k = _config_int(cfg, ("num_experts_per_tok", "num_experts_per_token", "experts_per_token"),
                        "num_experts_per_tok", where)
    if threadpool_count < 1:
        raise UserError(f"--threadpool-count must be at least 1, got {threadpool_count}")
    check_alignment(method, hidden, inter, threadpool_count)

    # layer -> expert (None: fused over experts) -> gate|up|down|gate_up -> part -> key
    found: dict[int, dict[int | None, dict[str, dict[str, str]]]] = {}
    skipped_mtp = 0
    routed = set()
    biases = []
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
            biases.append(key)
            continue
        routed.add(key)
        found.setdefault(layer, {}).setdefault(expert, {}).setdefault(proj, {})[part] = key
    if not found:
        raise UserError(f"{ckpt.root}: config.json names family {family.name}, but none of its routed-expert keys "
                        f"were found (e.g. {family.expert_keys[0].pattern}); {describe_unknown(None, ckpt.key_file)}")
    num_layers = cfg.get("num_hidden_layers")
    mtp_layers = [layer for layer in found if isinstance(num_layers, int) and layer >= num_layers]
    for layer in mtp_layers:  # V3/GLM put MTP at index num_hidden_layers
        skipped_mtp += sum(len(parts) for e in found.pop(layer).values() for parts in e.values())
    mtp_biases = [k for k in biases if family.match_expert(k)[0] in mtp_layers]
    biases = sorted(set(biases) - set(mtp_biases))

    swiglu = _swiglu_limit(cfg)
    plan = ConversionPlan(family.name, "auto", method, threadpool_count, hidden, inter, num_experts, top_k,
                          family.activation, swiglu if swiglu is not None else family.default_swiglu_limit, layout,
                          skipped_mtp_keys=skipped_mtp, skipped_mtp_layers=[str(x) for x in sorted(mtp_layers)],
                          routed_keys=routed, extra_shards=extra_shards if layout == "merged" else 0)
    quant = _Quant(cfg, where)
    kinds = set()
    for layer in sorted(found):
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
                                    f"(config says {num_experts} experts); the checkpoint is incomplete")
                per_proj = {}
                for proj in PROJECTIONS:
                    parts = projs.get(proj)
                    if not parts:
                        raise UserError(f"{ckpt.root}: layer {layer} expert {expert} has no {proj} weight; "
                                        "the checkpoint is incomplete")
                    per_proj[proj] = _classify(ckpt, parts, full_shape(proj, hidden, inter), quant)
                experts.append(per_proj)
            extra = sorted(e for e in by_expert if e >= num_experts)
            if extra:
                raise UserError(f"{ckpt.root}: layer {layer} has expert {extra[0]} but config.json says "
                                f"{num_experts} experts")
        kinds.update(src.kind for e in experts for src in e.values())
        layer_keys = {k for e in by_expert.values() for parts in e.values() for k in parts.values()}
        in_bytes = sum(ckpt.info(k).nbytes for k in layer_keys)
        out_bytes = sum(_nbytes(dtype, shape) for _, dtype, shape in
                        layer_tensor_entries(layer, method.name, num_experts, hidden, inter, threadpool_count))
        plan.layers.append(LayerPlan(layer, experts, in_bytes, out_bytes))
    by_kind = {v: k for k, v in INPUT_TYPES.items()}
    detected = by_kind[next(iter(kinds))] if len(kinds) == 1 else "mixed (" + ", ".join(sorted(by_kind[k] for k in kinds)) + ")"
    if input_type not in ("auto", detected):
        hint = f"drop --input-type or pass --input-type {detected}" if len(kinds) == 1 else "drop --input-type"
        raise UserError(f"--input-type {input_type} does not match the checkpoint: its routed experts are "
                        f"{detected} ({family.name}); {hint}")
    declared = cfg.get("expert_dtype")  # DeepSeek-V4: "fp4" (Flash) or "fp8" (Flash-Base)
    if declared in ("fp4", "fp8") and detected in ("fp4", "fp8") and declared != detected:
        raise UserError(f"{where}: expert_dtype is {declared!r} but the routed experts are stored as {detected} "
                        "(MXFP4: I8/U8/F4 + E8M0; FP8: F8_E4M3 + F32): the config and the weights come from "
                        "different checkpoints; fix config.json")
    plan.input_type = detected
    plan.source_info = {"expert_layout": family.layout}
    if family.activation_params:
        plan.source_info["activation_params"] = dict(family.activation_params)
    if biases:
        plan.source_info["unpacked_expert_tensors"] = biases
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    if dtype:
        plan.source_info["config_dtype"] = dtype
    for i, lp in enumerate(plan.layers, 1):
        lp.shard_name = shard_file_name(i, plan.num_shards) if layout == "merged" else f"_layer_{lp.layer}"
    return plan


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return shape[0] * (4 if dtype == "F32" else 1)


def _swiglu_limit(cfg: dict) -> float | None:
    value = cfg.get("swiglu_limit")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None
