"""The conversion plan: what will be read and written, checked from config.json and the
safetensors headers before any weight is read."""
from __future__ import annotations

from dataclasses import dataclass, field

from kt_runtime.format import layer_tensor_entries, shard_file_name
from quant import QuantMethod
from quant.numa import PROJECTIONS, full_shape

from .errors import UserError
from .families import Family, detect_family
from .source import Checkpoint

# --input-type values and the source kinds they cover.
INPUT_TYPES = {"fp4": "mxfp4", "bf16": "bf16"}
FP4_WEIGHT_DTYPES = ("I8", "U8", "F4")
FP4_SCALE_DTYPES = ("F8_E8M0", "U8")


@dataclass(frozen=True)
class ProjectionSource:
    kind: str  # decoder: "mxfp4"
    weight_key: str
    scale_key: str | None


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


def _classify(ckpt: Checkpoint, weight_key: str, scale_key: str | None, shape: tuple[int, int]) -> ProjectionSource:
    n, k = shape
    w = ckpt.info(weight_key)
    if w.dtype in FP4_WEIGHT_DTYPES:
        want = (n, k) if w.dtype == "F4" else (n, k // 2)
        if tuple(w.shape) != want:
            raise UserError(f"{ckpt.where(weight_key)}: tensor {weight_key} has shape {list(w.shape)}, expected "
                            f"{list(want)} for packed MXFP4 of a {n}x{k} matrix (config.json dims do not match the weights)")
        if scale_key is None:
            raise UserError(f"{ckpt.root}: MXFP4 tensor {weight_key} has no scale tensor; the checkpoint is incomplete")
        s = ckpt.info(scale_key)
        if s.dtype not in FP4_SCALE_DTYPES:
            raise UserError(f"{ckpt.where(scale_key)}: tensor {scale_key} is {s.dtype}, expected F8_E8M0 "
                            "scales for MXFP4 weights")
        if tuple(s.shape) != (n, k // 32):
            raise UserError(f"{ckpt.where(scale_key)}: tensor {scale_key} has shape {list(s.shape)}, expected "
                            f"{[n, k // 32]} (one E8M0 scale per 32 weights)")
        return ProjectionSource("mxfp4", weight_key, scale_key)
    if w.dtype == "BF16":
        if tuple(w.shape) != (n, k):
            raise UserError(f"{ckpt.where(weight_key)}: tensor {weight_key} has shape {list(w.shape)}, expected "
                            f"{[n, k]} (config.json dims do not match the weights)")
        return ProjectionSource("bf16", weight_key, None)
    raise UserError(f"{ckpt.where(weight_key)}: tensor {weight_key} has dtype {w.dtype}, which this converter "
                    f"does not decode for routed experts (supported: MXFP4 stored as {'/'.join(FP4_WEIGHT_DTYPES)}, BF16)")


def build_plan(ckpt: Checkpoint, method: QuantMethod, threadpool_count: int, layout: str,
               input_type: str = "auto", extra_shards: int = 0) -> ConversionPlan:
    where = str(ckpt.root / "config.json")
    cfg = text_config(ckpt.config)
    family = detect_family(cfg.get("model_type"), ckpt.key_file)
    if family is None:
        raise UserError(f"{where}: model_type {cfg.get('model_type')!r} is not a supported MoE family and no "
                        f"routed-expert keys were recognised (supported: deepseek_v4)")
    hidden = _config_int(cfg, ("hidden_size",), "hidden_size", where)
    inter = _config_int(cfg, family.intermediate_keys, "routed-expert intermediate size", where)
    num_experts = _config_int(cfg, family.expert_count_keys, "routed expert count", where)
    top_k = _config_int(cfg, ("num_experts_per_tok",), "num_experts_per_tok", where)
    if threadpool_count < 1:
        raise UserError(f"--threadpool-count must be at least 1, got {threadpool_count}")
    check_alignment(method, hidden, inter, threadpool_count)

    found: dict[int, dict[int, dict[str, dict[str, str]]]] = {}
    skipped_mtp = 0
    routed = set()
    for key in ckpt.key_file:
        if family.is_mtp(key):
            skipped_mtp += 1
            routed.add(key)
            continue
        hit = family.match_expert(key)
        if hit is None:
            continue
        routed.add(key)
        layer, expert, proj, part = hit
        found.setdefault(layer, {}).setdefault(expert, {}).setdefault(proj, {})[part] = key
    if not found:
        raise UserError(f"{ckpt.root}: no routed-expert tensors of family {family.name} found")
    num_layers = cfg.get("num_hidden_layers")
    mtp_layers = [layer for layer in found if isinstance(num_layers, int) and layer >= num_layers]
    for layer in mtp_layers:  # V3/GLM put MTP at index num_hidden_layers
        skipped_mtp += sum(len(parts) for e in found.pop(layer).values() for parts in e.values())

    plan = ConversionPlan(family.name, "auto", method, threadpool_count, hidden, inter, num_experts, top_k,
                          family.activation, _swiglu_limit(cfg), layout, skipped_mtp_keys=skipped_mtp,
                          skipped_mtp_layers=[str(x) for x in sorted(mtp_layers)], routed_keys=routed,
                          extra_shards=extra_shards if layout == "merged" else 0)
    kinds = set()
    for layer in sorted(found):
        experts = []
        in_bytes = 0
        for expert in range(num_experts):
            projs = found[layer].get(expert)
            if projs is None:
                raise UserError(f"{ckpt.root}: layer {layer} has no tensors for expert {expert} "
                                f"(config says {num_experts} experts); the checkpoint is incomplete")
            per_proj = {}
            for proj in PROJECTIONS:
                parts = projs.get(proj)
                if not parts or "weight" not in parts:
                    raise UserError(f"{ckpt.root}: layer {layer} expert {expert} has no {proj} weight; "
                                    "the checkpoint is incomplete")
                src = _classify(ckpt, parts["weight"], parts.get("scale"), full_shape(proj, hidden, inter))
                per_proj[proj] = src
                kinds.add(src.kind)
                in_bytes += sum(ckpt.info(k).nbytes for k in parts.values())
            experts.append(per_proj)
        extra = sorted(e for e in found[layer] if e >= num_experts)
        if extra:
            raise UserError(f"{ckpt.root}: layer {layer} has expert {extra[0]} but config.json says {num_experts} experts")
        out_bytes = sum(_nbytes(dtype, shape) for _, dtype, shape in
                        layer_tensor_entries(layer, method.name, num_experts, hidden, inter, threadpool_count))
        plan.layers.append(LayerPlan(layer, experts, in_bytes, out_bytes))
    detected = {v: k for k, v in INPUT_TYPES.items()}[kinds.pop()] if len(kinds) == 1 else "mixed"
    if input_type not in ("auto", detected):
        raise UserError(f"--input-type {input_type} does not match the checkpoint: its routed experts are "
                        f"{detected} ({family.name}); drop --input-type or pass --input-type {detected}")
    plan.input_type = detected
    for i, lp in enumerate(plan.layers, 1):
        lp.shard_name = shard_file_name(i, plan.num_shards) if layout == "merged" else f"_layer_{lp.layer}"
    return plan


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return shape[0] * (4 if dtype == "F32" else 1)


def _swiglu_limit(cfg: dict) -> float | None:
    value = cfg.get("swiglu_limit")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None
