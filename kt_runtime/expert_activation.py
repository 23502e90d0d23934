"""The experts' activation and biases: what the packed tensors do not hold but the MoE computes.

    act = Activation.of(weights)                       # from the manifest ("silu" or "gpt_oss" + parameters)
    biases = read_expert_biases(source_dir, weights, layer)   # gpt-oss: from the source checkpoint
    moe = CPUMoE(weights, layer, biases=biases)

gpt-oss (transformers GptOssExperts, openai gpt_oss swiglu): gate_up = x W + b with gate/up interleaved
(even = gate, odd = up); gate = min(gate, L), up = clamp(up, -L, L); a = (up + 1) * gate * sigmoid(1.702 gate);
out = a W_down + b_down, weighted by the routing weight. The converter packs W only and records the
activation, its parameters (manifest source.activation_params) and the bias keys
(source.unpacked_expert_tensors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gpt_oss", "situ")
GPT_OSS_PARAMS = {"alpha": 1.702, "up_offset": 1.0}  # gpt-oss's constants (convert/families.py records them)
SITU_PARAMS = {"beta": 4.0, "linear_beta": 25.0}  # Kimi K3's activation_situ_beta / _linear_beta


@dataclass(frozen=True)
class Activation:
    """silu: a = silu(g) * u.  gpt_oss: a = g * sigmoid(alpha g) * (u + up_offset).
    situ (Kimi K3): a = beta tanh(g / beta) sigmoid(g) * linear_beta tanh(u / linear_beta)."""

    kind: str = "silu"
    alpha: float = 1.0
    up_offset: float = 0.0
    beta: float = 4.0
    linear_beta: float = 25.0

    def __post_init__(self):
        if self.kind not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.kind!r} (expected one of {', '.join(ACTIVATIONS)})")
        for name in ("alpha", "up_offset", "beta", "linear_beta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"activation {name} must be a finite number, got {v!r}")
        if self.beta <= 0 or self.linear_beta <= 0:
            raise ValueError(f"situ beta and linear_beta must be positive, got {self.beta}, {self.linear_beta}")

    @classmethod
    def named(cls, kind: str, params: dict | None = None) -> "Activation":
        if kind == "gpt_oss":
            p = {**GPT_OSS_PARAMS, **(params or {})}
            return cls("gpt_oss", float(p["alpha"]), float(p["up_offset"]))
        if kind == "situ":
            p = {**SITU_PARAMS, **(params or {})}
            return cls("situ", beta=float(p["beta"]), linear_beta=float(p["linear_beta"]))
        return cls(kind)

    @classmethod
    def of(cls, weights, override: str | None = None) -> "Activation":
        """The activation of packed `weights` (manifest activation and source.activation_params), or `override`."""
        kind = override if override is not None else (getattr(weights, "activation", None) or "silu")
        manifest = getattr(weights, "manifest", None)
        params = None
        if manifest is not None and isinstance(getattr(manifest, "source", None), dict):
            params = manifest.source.get("activation_params")
            if params is not None and not isinstance(params, dict):
                raise ValueError(f"manifest source.activation_params must be an object, got {params!r}")
        return cls.named(kind, params)

    def engine_kwargs(self) -> dict:
        """The CPU engine's arguments (kt_kernels.MoELayer)."""
        if self.kind == "situ":
            return {"activation": "situ", "beta": self.beta, "linear_beta": self.linear_beta}
        return {"activation": self.kind, "alpha": self.alpha, "up_offset": self.up_offset}

    def apply(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The activation of clamped gate / up (any float dtype, any device)."""
        if self.kind == "silu":
            return F.silu(gate) * up
        if self.kind == "situ":
            return (self.beta * torch.tanh(gate / self.beta) * torch.sigmoid(gate)
                    * (self.linear_beta * torch.tanh(up / self.linear_beta)))
        return gate * torch.sigmoid(gate * self.alpha) * (up + self.up_offset)


@dataclass
class ExpertBiases:
    """Per-expert biases of one layer, float32 on the CPU (each may be None): gate / up [E, I], down [E, H].
    The gate/up bias is added before the clamp and activation, the down bias to each expert's output
    before its routing weight."""

    gate: torch.Tensor | None = None
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None

    @classmethod
    def from_gpt_oss(cls, gate_up_bias, down_bias) -> "ExpertBiases":
        """From gpt-oss's gate_up_proj_bias [E, 2I] (interleaved: even = gate, odd = up) and down_proj_bias [E, H]."""
        gu = torch.as_tensor(gate_up_bias).detach().float().cpu()
        if gu.dim() != 2 or gu.shape[1] % 2:
            raise ValueError(f"gate_up_proj_bias must be [experts, 2 * intermediate], got {tuple(gu.shape)}")
        down = torch.as_tensor(down_bias).detach().float().cpu().contiguous()
        return cls(gu[:, 0::2].contiguous(), gu[:, 1::2].contiguous(), down)

    def check(self, num_experts: int, hidden_size: int, intermediate_size: int) -> "ExpertBiases":
        """ValueError naming the bias whose shape or values do not fit; returns self."""
        for name, t, n in (("gate", self.gate, intermediate_size), ("up", self.up, intermediate_size),
                           ("down", self.down, hidden_size)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (num_experts, n):
                shape = tuple(t.shape) if hasattr(t, "shape") else type(t).__name__
                raise ValueError(f"{name} bias must be [{num_experts}, {n}], got {shape}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} bias has a non-finite value")
        return self

    def engine_kwargs(self) -> dict:
        """float32 C-contiguous numpy arrays for kt_kernels.MoELayer."""
        def arr(t):
            return None if t is None else np.ascontiguousarray(t.detach().float().cpu().numpy())
        return {"gate_bias": arr(self.gate), "up_bias": arr(self.up), "down_bias": arr(self.down)}

    def any(self) -> bool:
        return any(t is not None for t in (self.gate, self.up, self.down))


def _bias_array(sf, key: str) -> np.ndarray:
    dtype = sf.tensors[key].dtype
    a = sf.read(key)
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    if dtype in ("F16", "F32"):
        return a.astype(np.float32)
    raise ValueError(f"{sf.path}: {key} has dtype {dtype}; expected BF16, F16 or F32")


def read_expert_biases(source_dir, weights, layer: int) -> ExpertBiases:
    """gpt-oss expert biases of `layer` from the source checkpoint the packed `weights` were converted from
    (the keys ending in `layers.{layer}.mlp.experts.{gate_up,down}_proj_bias`; the manifest's
    source.unpacked_expert_tensors lists them). ValueError naming the file and key on anything missing."""
    from .format.errors import FieldError
    from .format.input_files import INDEX_MAX_BYTES, read_json, resolve_inside
    from .format.safetensors_file import SafetensorsFile

    root = Path(source_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        resolve_inside(root, index.name)
        data = read_json(index, what="safetensors index", max_bytes=INDEX_MAX_BYTES)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise FieldError(f"{index}: weight_map must be an object of file names")
    elif (root / "model.safetensors").is_file():
        with SafetensorsFile(root / "model.safetensors") as sf:
            weight_map = {k: "model.safetensors" for k in sf.keys()}
    else:
        raise ValueError(f"{root}: no model.safetensors.index.json or model.safetensors (the source checkpoint)")
    found = {}
    for part in ("gate_up", "down"):
        suffix = f"layers.{layer}.mlp.experts.{part}_proj_bias"
        keys = [k for k in weight_map if k == suffix or k.endswith("." + suffix)]
        if len(keys) != 1:
            raise ValueError(f"{root}: expected one tensor ending in {suffix}, found {keys or 'none'}")
        name = weight_map[keys[0]]
        if Path(name).name != name:
            raise ValueError(f"{index}: {keys[0]} is in {name!r}, not a file beside the index")
        resolve_inside(root, name, named_by=str(index))
        with SafetensorsFile(root / name) as sf:
            if keys[0] not in sf:
                raise ValueError(f"{root / name}: no tensor {keys[0]} (the index says it is there)")
            found[part] = _bias_array(sf, keys[0])
    b = ExpertBiases.from_gpt_oss(torch.from_numpy(found["gate_up"]), torch.from_numpy(found["down"]))
    return b.check(int(weights.num_experts), int(weights.hidden_size), int(weights.moe_intermediate_size))
