"""Hybrid experts inside transformers (>= 5) MoE models.

    model = AutoModelForCausalLM.from_pretrained(src)
    kt_runtime.inject(model, packed_dir, num_gpu_experts=8, device="cuda", placement="uniform")
    model.generate(...)

transformers >= 5 holds each MoE layer's routed experts as one module (`...layers.{L}.mlp.experts`,
fused `gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]`), called by its block as
`experts(hidden_states [T,H], top_k_index [T,k], top_k_weights [T,k])` after the router. `inject`
replaces exactly that module with a `HybridExperts` (same call), so routers (top-k, grouped, hash),
shared experts and everything else stay as they are. Covered: DeepseekV4, DeepseekV3, Qwen3Moe,
Mixtral, and any model whose experts module follows that convention (`num_experts`, `hidden_dim`,
`intermediate_dim`, `gate_up_proj`/`down_proj`, SiLU); and GptOss (`GptOssExperts`: `gate_up_proj
[E, H, 2I]` with interleaved gate/up, `down_proj [E, I, H]`, their biases, which are taken from the module
into the hybrid experts, and the activation g * sigmoid(alpha g) * (u + 1)).

Calibration for frequency placement:

    with kt_runtime.record_routing(model) as stats:
        model(**calibration_batch)
    stats.save("routing.json")
"""
from __future__ import annotations

import contextlib
import gc
import re
import warnings

import torch
from torch import nn

from ..expert_activation import Activation, ExpertBiases
from ..hybrid import HybridMoE
from ..hybrid.gpu_prefill import PrefillWorkspace, unavailable_reason
from ..hybrid.prefill_plan import check_threshold
from ..hybrid.placement import ExpertStats, resolve_stats
from ..loader import as_packed_experts

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class HybridExperts(nn.Module):
    """Drop-in for a transformers experts module: forward(hidden_states, top_k_index, top_k_weights)."""

    def __init__(self, hybrid: HybridMoE):
        super().__init__()
        self.hybrid = hybrid  # plain attribute: its tensors are not parameters / buffers of the model
        self.num_experts = hybrid.num_experts
        self.hidden_dim = hybrid.hidden_size
        self.intermediate_dim = hybrid.intermediate_size
        self.layer_idx = hybrid.layer
        self.stream_ordered = False

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                **_) -> torch.Tensor:
        if self.stream_ordered:  # no host sync: a CUDA graph of the model step captures it
            return self.hybrid.forward_stream(hidden_states, top_k_index, top_k_weights)
        return self.hybrid.forward(hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        h = self.hybrid
        return (f"layer={h.layer}, experts={h.num_experts}, gpu_experts={h.num_gpu_experts} on {h.device}, "
                f"method={h.cpu.method}, dynamic={h.dynamic}")


def _is_experts_module(module: nn.Module) -> bool:
    if isinstance(module, HybridExperts):
        return True
    return isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) and \
        isinstance(getattr(module, "down_proj", None), torch.Tensor) and hasattr(module, "num_experts")


def find_expert_modules(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """{decoder layer index: (qualified name, routed-experts module)} of a transformers MoE model."""
    found: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        if not name.endswith("experts") or name.endswith("shared_experts") or not _is_experts_module(module):
            continue
        m = _LAYER.search(name + ".")
        if m is None:
            continue
        layer = int(m.group(1))
        if layer in found:
            raise ValueError(f"two routed-experts modules for layer {layer}: {found[layer][0]} and {name}")
        found[layer] = (name, module)
    return dict(sorted(found.items()))


def _text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def _is_gpt_oss(module: nn.Module) -> bool:
    """transformers' GptOssExperts: [E, H, 2I] interleaved gate/up, [E, I, H] down, biases, alpha and limit."""
    return all(isinstance(getattr(module, p, None), torch.Tensor) for p in ("gate_up_proj_bias", "down_proj_bias")) \
        and hasattr(module, "alpha")


def _module_dims(module: nn.Module) -> tuple[int, int, int]:
    """(num_experts, hidden, intermediate) of a transformers experts module ([E, 2I, H] / [E, H, I]; gpt-oss
    [E, H, 2I] / [E, I, H])."""
    if _is_gpt_oss(module):
        gu, dn = module.gate_up_proj, module.down_proj
        if gu.dim() != 3 or dn.dim() != 3 or gu.shape[2] != 2 * dn.shape[1] or gu.shape[1] != dn.shape[2]:
            raise ValueError(f"{type(module).__name__}: expected gate_up_proj [E, H, 2I] and down_proj [E, I, H], "
                             f"got {tuple(gu.shape)} / {tuple(dn.shape)}")
        return int(gu.shape[0]), int(gu.shape[1]), int(dn.shape[1])
    if getattr(module, "is_transposed", False):
        raise ValueError(f"{type(module).__name__} stores transposed expert weights ([E, H, 2I]); not supported")
    if getattr(module, "is_concatenated", True) is False:
        raise ValueError(f"{type(module).__name__} interleaves gate/up rows; not supported")
    gu, dn = module.gate_up_proj, module.down_proj
    if gu.dim() != 3 or dn.dim() != 3:
        raise ValueError(f"{type(module).__name__}: expected 3-D gate_up_proj / down_proj, got "
                         f"{tuple(gu.shape)} / {tuple(dn.shape)}")
    e, two_i, h = gu.shape
    return int(e), int(h), int(two_i) // 2


def _check_match(model, weights, modules: dict[int, tuple[str, nn.Module]]) -> None:
    src = f"packed weights {weights.path}" if hasattr(weights, "path") else "packed weights"
    model_layers = sorted(modules)
    weight_layers = sorted(weights.layers)
    if not model_layers:
        raise ValueError(f"{type(model).__name__}: no routed-experts modules found (expected "
                         "'...layers.{L}...experts' modules with gate_up_proj/down_proj)")
    missing = [layer for layer in model_layers if layer not in weight_layers]
    extra = [layer for layer in weight_layers if layer not in model_layers]
    if missing or extra:
        raise ValueError(f"model/weights mismatch: the model has MoE layers {model_layers}, the {src} have layers "
                         f"{weight_layers}" + (f" (missing: {missing})" if missing else "")
                         + (f" (not in the model: {extra})" if extra else "")
                         + (": a partial output, converted with --layers; convert every layer"
                            if getattr(weights, "partial", False) else ""))
    cfg = _text_config(model)
    gpt_oss = {_is_gpt_oss(m) for _, m in modules.values() if not isinstance(m, HybridExperts)}
    if gpt_oss == {True}:
        alpha = float(next(iter(modules.values()))[1].alpha)
        wa = Activation.of(weights)
        if wa.kind != "gpt_oss" or abs(wa.alpha - alpha) > 1e-6:
            raise ValueError(f"model/weights mismatch: the model's experts are gpt-oss's (alpha {alpha}, up + 1), the "
                             f"{src} say activation {wa.kind!r} (alpha {wa.alpha})")
    else:
        act = getattr(cfg, "hidden_act", "silu") if cfg is not None else "silu"
        if act not in ("silu", "swish"):
            raise ValueError(f"model/weights mismatch: the model's expert activation is {act!r}; only SiLU is "
                             "supported")
        if getattr(weights, "activation", "silu") not in (None, "silu"):
            raise ValueError(f"model/weights mismatch: the model's experts use SiLU, the {src} say activation "
                             f"{weights.activation!r}")
    for layer, (name, module) in modules.items():
        if isinstance(module, HybridExperts):
            raise ValueError(f"{name} already holds hybrid experts (inject was called twice)")
        e, h, i = _module_dims(module)
        for what, mv, wv in (("experts", e, weights.num_experts), ("hidden size", h, weights.hidden_size),
                             ("expert intermediate size", i, weights.moe_intermediate_size)):
            if mv != wv:
                raise ValueError(f"model/weights mismatch at {name}: the model has {what} {mv}, the {src} have {wv}")
    limit = getattr(next(iter(modules.values()))[1], "limit", None)
    if limit is None and cfg is not None:
        limit = getattr(cfg, "swiglu_limit", None)
    wl = weights.swiglu_limit
    if (limit is None) != (wl is None) or (limit is not None and abs(float(limit) - float(wl)) > 1e-6):
        raise ValueError(f"model/weights mismatch: the model clamps expert activations at swiglu_limit={limit}, "
                         f"the {src} say {wl}")
    k = getattr(cfg, "num_experts_per_tok", None) if cfg is not None else None
    if k is not None and k != weights.num_experts_per_tok:
        warnings.warn(f"the model routes {k} experts per token, the {src} were converted for "
                      f"{weights.num_experts_per_tok}; using the model's router", stacklevel=4)


MAX_EXPERT_REL_DIFF = 0.5  # per-row INT4 of Gaussian weights gives ~0.12; another model's weights ~1.4


def expert_difference(weights, layer: int, module: nn.Module) -> float | None:
    """Relative difference ||packed - model|| / ||model|| of expert 0's gate and up weights in one layer: the
    same dims can still be another model. None when the module's weights are not there (meta) or zero."""
    gu = module.gate_up_proj
    if gu.device.type == "meta":
        return None
    ref = gu.detach()[0].float().cpu()
    if _is_gpt_oss(module):  # [H, 2I] interleaved -> [gate; up] [2I, H]
        ref = torch.cat([ref.T[0::2], ref.T[1::2]], 0)
    got = torch.cat([weights.dequantize(layer, 0, "gate"), weights.dequantize(layer, 0, "up")], 0)
    denom = float(ref.norm())
    if denom == 0.0:
        return None
    return float((got - ref).norm()) / denom


def _check_values(weights, layer: int, module: nn.Module) -> None:
    rel = expert_difference(weights, layer, module)
    if rel is not None and not rel <= MAX_EXPERT_REL_DIFF:
        raise ValueError(f"model/weights mismatch: layer {layer} expert 0 gate/up of the packed weights differ from "
                         f"the model's by {rel:.2f} (relative; quantization alone gives < 0.2) — were they converted "
                         f"from this model? (pass check_values=False to skip this check)")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def hybrid_experts(model: nn.Module, weights, num_gpu_experts=0, device: str | torch.device | None = None,
                   placement="uniform", stats=None, dynamic: bool = False, num_threads: int | None = None,
                   check_values: bool = True, stream_ordered: bool | None = None, defer: int = 0,
                   gpu_prefill_token_threshold: int | None = None, gpu_prefill_memory: int | None = None,
                   gpu_prefill_staging: str | None = None, **hybrid_kwargs) -> dict[int, HybridExperts]:
    """{layer: HybridExperts} for every routed-experts module of `model`, checked against it; the model is left
    as it is (see inject for the arguments; swap_experts puts them in)."""
    weights = as_packed_experts(weights)
    modules = find_expert_modules(model)
    _check_match(model, weights, modules)
    if check_values:
        first = next(iter(modules))
        _check_values(weights, first, modules[first][1])
    device = torch.device(device if device is not None else _default_device())
    stats = resolve_stats(stats, weights.num_experts)
    if stream_ordered is None:
        from ..hybrid import stream_ops
        stream_ordered = device.type == "cuda" and stream_ops.available()
    chain = None
    if defer:
        from ..hybrid.stream_path import DeferralChain
        chain = DeferralChain()
    last_layer = max(modules)
    prefill = {"gpu_prefill_token_threshold": gpu_prefill_token_threshold, "gpu_prefill_memory": gpu_prefill_memory,
               "gpu_prefill_staging": gpu_prefill_staging}
    if check_threshold(gpu_prefill_token_threshold) is not None and unavailable_reason(device) is None:
        prefill["prefill_workspace"] = PrefillWorkspace(device, gpu_prefill_memory, staging=gpu_prefill_staging)
        prefill["gpu_prefill_memory"] = prefill["gpu_prefill_staging"] = None
    built: dict[int, HybridExperts] = {}
    for layer, (name, module) in modules.items():
        n = num_gpu_experts.get(layer, 0) if isinstance(num_gpu_experts, dict) else num_gpu_experts
        biases = None
        if _is_gpt_oss(module):
            if module.gate_up_proj_bias.device.type == "meta":
                raise ValueError(f"{name}: the gpt-oss expert biases are on the meta device; load the model's weights "
                                 "first (the packed output does not hold them)")
            biases = ExpertBiases.from_gpt_oss(module.gate_up_proj_bias, module.down_proj_bias)
        hybrid = HybridMoE(weights, layer, num_gpu_experts=n, device=device, placement=placement, stats=stats,
                           dynamic=dynamic, num_threads=num_threads, biases=biases,
                           defer=defer if layer != last_layer else 0, **prefill, **hybrid_kwargs)
        hybrid.deferral = chain
        hybrid.defer_carry = layer != last_layer
        built[layer] = HybridExperts(hybrid)
        built[layer].stream_ordered = bool(stream_ordered)
    return built


def swap_experts(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put each modules[qualified name] in place of the model's module of that name (a layer's routed experts);
    returns the modules it replaced, by name, so that swapping them back restores the model."""
    replaced = {}
    for name, module in modules.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        replaced[name] = getattr(parent, attr)
        setattr(parent, attr, module)
    return replaced


def inject(model: nn.Module, weights, num_gpu_experts=0, device: str | torch.device | None = None,
           placement="uniform", stats=None, dynamic: bool = False, num_threads: int | None = None,
           check_values: bool = True, stream_ordered: bool | None = None, defer: int = 0,
           gpu_prefill_token_threshold: int | None = None, gpu_prefill_memory: int | None = None,
           gpu_prefill_staging: str | None = None, **hybrid_kwargs) -> dict[int, HybridExperts]:
    """Replace every routed-experts module of `model` with hybrid experts over packed `weights`.

    weights: a packed output directory or a PackedExperts (kt_runtime.load_experts).
    num_gpu_experts: per layer — an int, a bool mask / list of ids, or {layer: int | mask | ids}.
    device: where the GPU experts live and compute ("cuda" when available, else "cpu").
    placement: "uniform" | "frequency" (with stats: ExpertStats, a stats file, {layer: counts}) | mask.
    dynamic, hybrid_kwargs (update_interval, max_swaps, hysteresis, decay, isa, gpu_dtype): see HybridMoE.
    check_values: compare expert 0 of the first layer with the model's weights (if not on meta).
    stream_ordered: decode-sized calls (<= stream_max_tokens tokens) take HybridMoE.forward_stream, which queues
        the CPU experts on the CUDA stream (host functions) with no host sync, so model.generate with a static
        cache and CUDA graphs captures whole steps. None: on CUDA devices where host functions can be queued.
    defer: CPU experts per token whose output is added one MoE layer later (HybridMoE defer; the last MoE
        layer defers none).
    gpu_prefill_token_threshold: calls of at least this many tokens (one forward call, after chunking) run the
        CPU-resident experts on the GPU, streamed from the packed files (kt's --kt-gpu-prefill-token-threshold;
        None or 0: never; ignored with one warning without CUDA or triton). gpu_prefill_memory: its GPU memory
        budget in bytes (None: 2 GiB), one for the whole model: the layers share one PrefillWorkspace.
        gpu_prefill_staging: "registered", "gather" or "auto" (None; see HybridMoE).
    The original expert weights are released. Returns {layer: HybridExperts}.
    Raises ValueError when the model and the weights do not match (layers, experts, dims, activation clamp).
    """
    built = hybrid_experts(model, weights, num_gpu_experts, device, placement, stats, dynamic, num_threads,
                           check_values, stream_ordered, defer, gpu_prefill_token_threshold, gpu_prefill_memory,
                           gpu_prefill_staging, **hybrid_kwargs)
    names = {layer: name for layer, (name, _) in find_expert_modules(model).items()}
    replaced = swap_experts(model, {names[layer]: module for layer, module in built.items()})
    for module in replaced.values():
        # release the original fused weights now, even if something else still holds the module
        for p in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            if isinstance(getattr(module, p, None), nn.Parameter):
                setattr(module, p, nn.Parameter(torch.empty(0, device="meta"), requires_grad=False))
    del replaced
    gc.collect()
    return built


def hybrid_layers(model: nn.Module) -> dict[int, HybridMoE]:
    """{layer: HybridMoE} of an injected model."""
    return {layer: m.hybrid for layer, (_, m) in find_expert_modules(model).items() if isinstance(m, HybridExperts)}


@contextlib.contextmanager
def record_routing(model: nn.Module, stats: ExpertStats | None = None):
    """Count the experts every MoE layer routes to while the block runs (original or injected model).

    Yields an ExpertStats; save it and pass it as `stats=` with placement="frequency"."""
    modules = find_expert_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__}: no routed-experts modules found")
    num_experts = {int(m.num_experts) for _, m in modules.values()}
    if len(num_experts) != 1:
        raise ValueError(f"layers have different expert counts {sorted(num_experts)}")
    stats = stats if stats is not None else ExpertStats(num_experts.pop())
    handles = []

    def hook_for(layer):
        def hook(_module, args, kwargs):
            ids = args[1] if len(args) > 1 else kwargs.get("top_k_index")
            if ids is not None:
                stats.record(layer, ids)
        return hook

    for layer, (_, module) in modules.items():
        handles.append(module.register_forward_pre_hook(hook_for(layer), with_kwargs=True))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
