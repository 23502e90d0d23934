"""Checkpoint families: how each names and arranges its routed-expert tensors.

A family is a small declarative table entry: the config model types it covers, regexes that match
its expert keys (named groups: layer, expert (per-expert arrangement only), proj, part), the names it
uses for projections and tensor parts, its arrangement, the config keys that hold its dimensions, and
the activation the runtime must apply. Adding a family = one entry in FAMILIES plus one test.

Arrangements of the experts in the source (docs/FORMAT.md §6; orientation always comes from here, never
from shapes):

* ``per-expert``: one tensor per expert and projection, ``[N, K]`` (gate/up ``[I, H]``, down ``[H, I]``);
* ``fused``: ``gate_up_proj [E, 2I, H]`` (rows ``:I`` gate, ``I:`` up) and ``down_proj [E, H, I]``;
* ``fused-transposed``: ``gate_up_proj [E, H, 2I]`` (columns ``:I`` gate, ``I:`` up), ``down_proj [E, I, H]``;
* ``gpt-oss-interleaved``: gpt-oss MXFP4 ``gate_up_proj_blocks [E, 2I, H/32, 16]`` + ``_scales
  [E, 2I, H/32]`` whose even rows are gate and odd rows up, ``down_proj_blocks [E, H, I/32, 16]``;
  its BF16 form is ``gate_up_proj [E, H, 2I]`` interleaved along the last dim, ``down_proj [E, I, H]``.
  ``*_bias`` tensors are not packed: the manifest records that the runtime must add them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from .errors import UserError

ARRANGEMENTS = ("per-expert", "fused", "fused-transposed", "gpt-oss-interleaved")
MOE_LAYER_RULES = ("all", "first_k_dense", "sparse_step")
MAX_INDEX_DIGITS = 9  # layer and expert numbers in keys: more is not a model, and int() of 5,000 digits raises

# Key prefixes: none (V4 official), model. (transformers), VL wrappers (formats.md §7 trap 6).
_PREFIX = r"^(?:model\.language_model\.|language_model\.model\.|language_model\.|model\.)?layers\.(?P<layer>\d+)\."
_PROJ = r"(?P<proj>gate_proj|up_proj|down_proj)"
# MTP blocks that are not numbered as layers: V4 mtp.{i}.*, Qwen3.5 mtp.layers.{i}.*
_MTP = (re.compile(r"^(?:model\.language_model\.|language_model\.|model\.)?mtp\.(?:layers\.)?\d+\..*\.experts\."),)

_HF_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_W_PROJ = {"w1": "gate", "w3": "up", "w2": "down"}
_FUSED_PROJ = {"gate_up_proj": "gate_up", "down_proj": "down"}
# Tensor parts: weight (BF16/FP16/FP8/packed FP4), scale (E8M0, E4M3, FP8 block or INT4 group scales),
# packed/shape (compressed-tensors INT4 and FP4), global (NVFP4's per-tensor F32 scale: ModelOpt
# weight_scale_2, compressed-tensors weight_global_scale), bias (gpt-oss; not packed).
_HF_PARTS = {"weight": "weight", "weight_scale_inv": "scale", "weight_packed": "packed", "weight_scale": "scale",
             "weight_shape": "shape", "weight_scale_2": "global", "weight_global_scale": "global"}


def _per_expert(block: str, parts: tuple[str, ...], projs: str = _PROJ) -> re.Pattern:
    return re.compile(_PREFIX + block + r"\.experts\.(?P<expert>\d+)\." + projs + r"\.(?P<part>" + "|".join(parts) + ")$")


def _fused(block: str, parts: str = r"(?P<part>)") -> re.Pattern:
    return re.compile(_PREFIX + block + r"\.experts\.(?P<proj>gate_up_proj|down_proj)" + parts + "$")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    expert_keys: tuple[re.Pattern, ...]
    proj_names: dict[str, str]  # source projection name -> gate | up | down | gate_up (fused)
    part_names: dict[str, str]  # source part name -> weight | scale | packed | shape | bias
    arrangement: str = "per-expert"  # how its experts lie in the source (ARRANGEMENTS)
    mtp_keys: tuple[re.Pattern, ...] = _MTP
    expert_count_keys: tuple[str, ...] = ("n_routed_experts", "num_experts", "num_local_experts")
    intermediate_keys: tuple[str, ...] = ("moe_intermediate_size",)
    # the routed experts' input width: Kimi K3 runs them on a latent routed_expert_hidden_size, not hidden_size
    hidden_keys: tuple[str, ...] = ("hidden_size",)
    activation: str = "silu"
    activation_params: dict = field(default_factory=dict)  # for the runtime, recorded in the plan
    activation_param_keys: dict = field(default_factory=dict)  # parameter -> config.json key that overrides it
    default_swiglu_limit: float | None = None  # when config.json has no swiglu_limit
    note: str = ""  # what the user sees in the list of supported families
    # Which decoder layers are MoE, by transformers' rule for the family (convert.plan.config_moe_layers):
    # "all"; "first_k_dense" (L >= first_k_dense_replace and L % moe_layer_freq == 0);
    # "sparse_step" (L not in mlp_only_layers and (L + 1) % decoder_sparse_step == 0).
    moe_layer_rule: str = "all"
    # MTP blocks stored as decoder layers num_hidden_layers .. + count - 1 (V3/GLM): the config key
    # of their count; such a layer is MTP only if it also holds `mtp_marker` (layers.L.<marker>).
    mtp_count_key: str | None = None
    mtp_marker: str = "eh_proj.weight"

    def __post_init__(self):
        if self.arrangement not in ARRANGEMENTS:
            raise ValueError(f"family {self.name}: arrangement {self.arrangement!r} is not one of {ARRANGEMENTS}")
        if self.moe_layer_rule not in MOE_LAYER_RULES:
            raise ValueError(f"family {self.name}: moe_layer_rule {self.moe_layer_rule!r} is not one of {MOE_LAYER_RULES}")

    @property
    def fused(self) -> bool:
        return self.arrangement != "per-expert"

    def match_expert(self, key: str) -> tuple[int, int | None, str, str] | None:
        """(layer, expert or None for fused tensors, gate|up|down|gate_up, part) for an expert key."""
        for pattern in self.expert_keys:
            m = pattern.match(key)
            if m:
                groups = m.groupdict()
                numbers = [groups[g] for g in ("layer", "expert") if groups.get(g) is not None]
                if any(len(n) > MAX_INDEX_DIGITS for n in numbers):
                    raise UserError(f"tensor {key[:120]!r}: a layer or expert number of more than {MAX_INDEX_DIGITS} "
                                    "digits; the checkpoint is damaged: re-download it")
                expert = int(groups["expert"]) if groups.get("expert") is not None else None
                return int(m["layer"]), expert, self.proj_names[m["proj"]], self.part_names[m["part"] or ""]
        return None

    def is_mtp(self, key: str) -> bool:
        return any(p.match(key) for p in self.mtp_keys)


DEEPSEEK_V4 = Family(
    name="deepseek_v4",
    model_types=("deepseek_v4",),
    expert_keys=(
        # official (no prefix) and transformers-saved (model.) names; .scale is E8M0 (fp4) or F32 (fp8)
        _per_expert(r"ffn", ("weight", "scale"), r"(?P<proj>w[123])"),
        # the HF alias that sglang/ktransformers accept
        _per_expert(r"mlp", ("weight", "weight_scale_inv")),
    ),
    proj_names={**_W_PROJ, **_HF_PROJ},
    part_names={"weight": "weight", "scale": "scale", "weight_scale_inv": "scale"},
    note="DeepSeek-V4-Flash (MXFP4) / -Flash-Base (FP8): layers.L.ffn.experts.E.w1/w3/w2",
    # official checkpoints keep MTP as mtp.{i}.*; a transformers save numbers it as layer
    # num_hidden_layers + i, whose block has enorm/hnorm/e_proj/h_proj
    mtp_count_key="num_nextn_predict_layers",
    mtp_marker="enorm.weight",
)

DEEPSEEK_V3 = Family(
    name="deepseek_v3",
    model_types=("deepseek_v3", "deepseek_v2", "kimi_k2", "kimi_k25"),
    expert_keys=(_per_expert(r"mlp", tuple(_HF_PARTS)),),
    proj_names=_HF_PROJ,
    part_names=_HF_PARTS,
    note="DeepSeek-V2/V3/R1/V3.1, Kimi-K2 (FP8 block, BF16), Kimi-K2-Thinking (compressed-tensors INT4)",
    moe_layer_rule="first_k_dense",
    mtp_count_key="num_nextn_predict_layers",
)

GLM4_MOE = Family(
    name="glm4_moe",
    model_types=("glm4_moe",),
    expert_keys=(_per_expert(r"mlp", tuple(_HF_PARTS)),),
    proj_names=_HF_PROJ,
    part_names=_HF_PARTS,
    note="GLM-4.5/4.6/4.7: mlp.experts.E.*_proj (dense first layers and shared experts left alone)",
    moe_layer_rule="first_k_dense",
    mtp_count_key="num_nextn_predict_layers",
)

QWEN3_MOE = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe", "qwen2_moe", "qwen3_next"),
    expert_keys=(_per_expert(r"mlp", tuple(_HF_PARTS)),),
    proj_names=_HF_PROJ,
    part_names=_HF_PARTS,
    note="Qwen2-MoE, Qwen3-MoE, Qwen3-Next: mlp.experts.E.*_proj",
    moe_layer_rule="sparse_step",
)

MIXTRAL = Family(
    name="mixtral",
    model_types=("mixtral", "minimax"),
    expert_keys=(_per_expert(r"block_sparse_moe", ("weight",), r"(?P<proj>w[123])"),),
    proj_names=_W_PROJ,
    part_names={"weight": "weight"},
    intermediate_keys=("intermediate_size",),
    note="Mixtral, MiniMax-Text-01/M1: block_sparse_moe.experts.E.w1/w3/w2 (intermediate_size per expert)",
)

MINIMAX_M2 = Family(
    name="minimax_m2",
    model_types=("minimax_m2",),
    expert_keys=(_per_expert(r"block_sparse_moe", ("weight", "weight_scale_inv"), r"(?P<proj>w[123])"),),
    proj_names=_W_PROJ,
    part_names={"weight": "weight", "weight_scale_inv": "scale"},
    intermediate_keys=("intermediate_size",),
    note="MiniMax-M2 (FP8 block): block_sparse_moe.experts.E.w1/w3/w2",
)

QWEN3_5_MOE = Family(
    name="qwen3_5_moe",
    model_types=("qwen3_5_moe", "qwen3_5_moe_text"),
    expert_keys=(_fused(r"mlp"),),
    proj_names=_FUSED_PROJ,
    part_names={"": "weight"},
    arrangement="fused",
    note="Qwen3.5/3.6-MoE: mlp.experts.gate_up_proj [E,2I,H] + down_proj [E,H,I]",
)

QWEN3_VL_MOE = Family(
    name="qwen3_vl_moe",
    model_types=("qwen3_vl_moe", "qwen3_vl_moe_text"),
    expert_keys=(_fused(r"mlp"),),
    proj_names=_FUSED_PROJ,
    part_names={"": "weight"},
    arrangement="fused-transposed",
    note="Qwen3-VL-MoE: mlp.experts.gate_up_proj [E,H,2I] + down_proj [E,I,H]",
    moe_layer_rule="sparse_step",
)

GPT_OSS = Family(
    name="gpt_oss",
    model_types=("gpt_oss",),
    expert_keys=(_fused(r"mlp", r"(?P<part>_blocks|_scales|_bias|)"),),
    proj_names=_FUSED_PROJ,
    part_names={"": "weight", "_blocks": "weight", "_scales": "scale", "_bias": "bias"},
    arrangement="gpt-oss-interleaved",
    intermediate_keys=("intermediate_size",),
    activation="gpt_oss",
    # out = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit); biases
    # (interleaved like gate_up) are added before the activation.
    activation_params={"alpha": 1.702, "up_offset": 1.0},
    default_swiglu_limit=7.0,
    note="gpt-oss (MXFP4 _blocks/_scales, interleaved gate/up; biases not packed)",
)

# DeepSeek-V4.1-Flash: routed experts FP4 in groups of 32 like V4-Flash; its own key names are not
# published, so the V4 table is followed (docs/FORMAT.md §6 says so) and every key is checked against it.
DEEPSEEK_V41 = replace(DEEPSEEK_V4, name="deepseek_v41", model_types=("deepseek_v41",),
                       note="DeepSeek-V4.1-Flash (MXFP4, V4's keys): layers.L.ffn.experts.E.w1/w3/w2")

# GLM-5.x (GlmMoeDsa): GLM-4.5's expert keys; GLM-5.3-Flash's FP8 experts clamp their SwiGLU (swiglu_limit)
GLM5 = replace(GLM4_MOE, name="glm5", model_types=("glm_moe_dsa",),
               note="GLM-5/5.1/5.2/5.3-Flash (FP8 block, NVFP4, BF16; swiglu_limit recorded): mlp.experts.E.*_proj")

# Qwen3.8-Flash-Next (Qwen4-Exp preview): per-expert keys as Qwen3-Next, under model.language_model.
QWEN4_EXP = replace(QWEN3_MOE, name="qwen4_exp", model_types=("qwen4_exp", "qwen4_exp_text"),
                    note="Qwen3.8-Flash-Next (FP8 block, NVFP4): mlp.experts.E.*_proj")

# Kimi K3: compressed-tensors MXFP4 experts on the latent width routed_expert_hidden_size, SiTU activation
KIMI_K3 = Family(
    name="kimi_k3",
    model_types=("kimi_k3",),
    expert_keys=(_per_expert(r"block_sparse_moe", ("weight_packed", "weight_scale"), r"(?P<proj>w[123])"),),
    proj_names=_W_PROJ,
    part_names={"weight_packed": "packed", "weight_scale": "scale"},
    hidden_keys=("routed_expert_hidden_size",),
    activation="situ",
    # a = beta*tanh(g/beta)*sigmoid(g) * linear_beta*tanh(u/linear_beta)
    activation_params={"beta": 4.0, "linear_beta": 25.0},
    activation_param_keys={"beta": "activation_situ_beta", "linear_beta": "activation_situ_linear_beta"},
    note="Kimi K3 (MXFP4 at routed_expert_hidden_size, SiTU): block_sparse_moe.experts.E.w1/w3/w2",
    moe_layer_rule="first_k_dense",
)

FAMILIES: tuple[Family, ...] = (DEEPSEEK_V4, DEEPSEEK_V41, DEEPSEEK_V3, GLM4_MOE, GLM5, QWEN3_MOE, QWEN4_EXP, MIXTRAL,
                                MINIMAX_M2, QWEN3_5_MOE, QWEN3_VL_MOE, GPT_OSS, KIMI_K3)


def family_for(model_type: str | None) -> Family | None:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return None


def supported_model_types() -> list[str]:
    return [t for f in FAMILIES for t in f.model_types]


def detect_family(model_type: str | None, keys) -> Family | None:
    """The family named by config.json, else a per-expert family whose expert keys the files contain.

    Fused arrangements are never picked from keys alone: [E, 2I, H] and [E, H, 2I] cannot be told
    apart by names, and guessing from shapes fails when H == 2I.
    """
    family = family_for(model_type)
    if family is not None:
        return family
    for key in keys:
        for family in FAMILIES:
            if not family.fused and family.match_expert(key):
                return family
    return None


_EXPERTISH = re.compile(r"expert")


def detection_note(model_type: str | None, family: Family) -> str | None:
    """Said at the start of a run whose family came from the tensor names, not from config.json."""
    if family_for(model_type) is family:
        return None
    named = f"model_type {model_type!r} is not a known family" if model_type else "config.json names no model_type"
    return (f"{named}; its routed-expert keys match the {family.name} table ({family.note}): converting with "
            "that table")


def families_table() -> str:
    """The supported families, one per line: name, config model types, what they hold."""
    rows = [(f.name, "/".join(f.model_types), f.note) for f in FAMILIES]
    w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
    return "\n".join(f"  {a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)


def describe_unknown(model_type: str | None, keys) -> str:
    """What was found, for the error when no family fits."""
    sample = sorted(k for k in keys if _EXPERTISH.search(k))[:3]
    found = f"expert-like keys such as {', '.join(sample)}" if sample else "no expert-like keys"
    return (f"model_type {model_type!r} is not a supported MoE family and its routed-expert keys were not "
            f"recognised ({found}). Supported families (name, config.json model_type, routed experts):\n"
            f"{families_table()}")
