"""Checkpoint families: how each names its routed-expert tensors.

A family is a small table: the config model types it covers, regexes that match its expert keys
(named groups: layer, expert, proj, part), the names it uses for the projections and tensor parts,
the MTP keys it carries, and the config keys that hold its dimensions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    expert_keys: tuple[re.Pattern, ...]
    proj_names: dict[str, str]  # source projection name -> gate/up/down
    part_names: dict[str, str]  # source part name -> weight/scale
    mtp_keys: tuple[re.Pattern, ...] = ()
    expert_count_keys: tuple[str, ...] = ("n_routed_experts", "num_experts", "num_local_experts")
    intermediate_keys: tuple[str, ...] = ("moe_intermediate_size",)
    activation: str = "silu"
    extra: dict = field(default_factory=dict)

    def match_expert(self, key: str) -> tuple[int, int, str, str] | None:
        """(layer, expert, gate|up|down, weight|scale) for a routed-expert key of this family."""
        for pattern in self.expert_keys:
            m = pattern.match(key)
            if m:
                return int(m["layer"]), int(m["expert"]), self.proj_names[m["proj"]], self.part_names[m["part"]]
        return None

    def is_mtp(self, key: str) -> bool:
        return any(p.match(key) for p in self.mtp_keys)


DEEPSEEK_V4 = Family(
    name="deepseek_v4",
    model_types=("deepseek_v4",),
    expert_keys=(
        # official (no prefix) and transformers-saved (model.) names
        re.compile(r"^(?:model\.)?layers\.(?P<layer>\d+)\.ffn\.experts\.(?P<expert>\d+)\.(?P<proj>w[123])\.(?P<part>weight|scale)$"),
        # the HF alias that sglang/ktransformers accept
        re.compile(r"^model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)"
                   r"\.(?P<part>weight|weight_scale_inv)$"),
    ),
    proj_names={"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"},
    part_names={"weight": "weight", "scale": "scale", "weight_scale_inv": "scale"},
    mtp_keys=(re.compile(r"^(?:model\.)?mtp\.\d+\.(?:ffn|mlp)\.experts\."),),
)

FAMILIES: tuple[Family, ...] = (DEEPSEEK_V4,)


def family_for(model_type: str | None) -> Family | None:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return None


def detect_family(model_type: str | None, keys) -> Family | None:
    """The family named by config.json, else the one whose expert keys the files contain."""
    family = family_for(model_type)
    if family is not None:
        return family
    for key in keys:
        for family in FAMILIES:
            if family.match_expert(key):
                return family
    return None
