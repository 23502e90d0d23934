"""--include-non-expert: the last shard holds what kt-kernel's converters copy, under kt's names
(scripts/convert_cpu_weights.py; convert_cpu_weights_ds4.py for DeepSeek-V4), for every family."""
import re

import numpy as np
import pytest

from helpers.outputs import read_json
from kt_convert.convert.cli import main
from kt_convert.convert.errors import UserError
from kt_convert.convert.non_expert import non_expert_tensors
from kt_convert.convert.pipeline import ConvertOptions, convert
from kt_convert.synthetic.v4_flash import make_v4_flash_checkpoint
from kt_convert.synthetic.families import VARIANTS, make_family_checkpoint
from kt_convert.kt_runtime.format.safetensors_file import SafetensorsFile, save_file

ROUTED_OR_MTP_EXPERT = re.compile(r"(?<!shared_)experts\.")  # shared_experts. / shared_expert. are not


def _names(keys, family, routed=()):
    return dict(non_expert_tensors(keys, family, set(routed), "ckpt"))


def test_kt_names_for_transformers_keys():
    keys = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.3.self_attn.q_proj.weight", "model.layers.3.mlp.gate.weight",
            "model.layers.3.mlp.gate.e_score_correction_bias", "model.layers.3.mlp.shared_experts.up_proj.weight",
            "model.layers.3.mlp.experts.0.gate_proj.weight", "model.layers.3.mlp.experts.0.gate_proj.weight_scale_inv",
            "model.layers.61.eh_proj.weight", "model.layers.61.mlp.experts.7.down_proj.weight",
            "model.layers.3.mlp.experts.gate_up_proj_bias", "model.language_model.layers.0.input_layernorm.weight",
            "model.visual.blocks.0.attn.qkv.weight", "mtp.layers.0.input_layernorm.weight",
            "mtp.layers.0.mlp.experts.gate_up_proj", "layers.0.ffn.gate.weight", "layers.0.ffn.experts.0.w1.weight"]
    assert _names(keys, "deepseek_v3") == {
        "model.embed_tokens.weight": "embed_tokens.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight",
        "model.layers.3.self_attn.q_proj.weight": "blk.3.self_attn.q_proj.weight",
        "model.layers.3.mlp.gate.weight": "blk.3.mlp.gate.weight",
        "model.layers.3.mlp.gate.e_score_correction_bias": "blk.3.mlp.gate.e_score_correction_bias",
        "model.layers.3.mlp.shared_experts.up_proj.weight": "blk.3.mlp.shared_experts.up_proj.weight",
        "model.layers.61.eh_proj.weight": "blk.61.eh_proj.weight",
        "model.language_model.layers.0.input_layernorm.weight": "blk.0.input_layernorm.weight",
        "model.visual.blocks.0.attn.qkv.weight": "visual.blocks.0.attn.qkv.weight",
        "mtp.layers.0.input_layernorm.weight": "mtp.layers.0.input_layernorm.weight",
        # convert_cpu_weights.py tests only ".mlp.experts.": V4-style keys keep their names there
        "layers.0.ffn.gate.weight": "layers.0.ffn.gate.weight",
        "layers.0.ffn.experts.0.w1.weight": "layers.0.ffn.experts.0.w1.weight",
    }


def test_kt_names_for_deepseek_v4_keys():
    keys = ["embed.weight", "head.weight", "norm.weight", "hc_head_fn", "layers.0.attn_norm.weight",
            "layers.0.ffn.gate.tid2eid", "layers.1.ffn.gate.bias", "layers.1.ffn.shared_experts.w1.weight",
            "layers.1.ffn.shared_experts.w1.scale", "layers.1.ffn.experts.3.w2.weight", "layers.1.ffn.experts.3.w2.scale",
            "mtp.0.enorm.weight", "mtp.0.ffn.shared_experts.w3.weight", "mtp.0.ffn.experts.0.w1.weight",
            "model.layers.4.attn.wq_a.weight", "model.layers.4.mlp.experts.0.gate_proj.weight"]
    assert _names(keys, "deepseek_v4") == {
        "embed.weight": "embed.weight", "head.weight": "head.weight", "norm.weight": "norm.weight",
        "hc_head_fn": "hc_head_fn",
        "layers.0.attn_norm.weight": "blk.0.attn_norm.weight",
        "layers.0.ffn.gate.tid2eid": "blk.0.ffn.gate.tid2eid",
        "layers.1.ffn.gate.bias": "blk.1.ffn.gate.bias",
        "layers.1.ffn.shared_experts.w1.weight": "blk.1.ffn.shared_experts.w1.weight",
        "layers.1.ffn.shared_experts.w1.scale": "blk.1.ffn.shared_experts.w1.scale",
        "mtp.0.enorm.weight": "mtp.0.enorm.weight",
        "mtp.0.ffn.shared_experts.w3.weight": "mtp.0.ffn.shared_experts.w3.weight",
        "model.layers.4.attn.wq_a.weight": "blk.4.attn.wq_a.weight",
    }


def test_routed_tensors_kt_does_not_recognise_are_not_copied():
    keys = ["model.layers.0.block_sparse_moe.experts.0.w1.weight", "model.layers.0.block_sparse_moe.gate.weight"]
    assert _names(keys, "mixtral", routed=keys[:1]) == {keys[1]: "blk.0.block_sparse_moe.gate.weight"}


@pytest.mark.parametrize("keys", [("model.norm.weight", "norm.weight"),
                                  ("model.language_model.norm.weight", "model.norm.weight"),
                                  ("language_model.model.layers.0.a.weight", "model.layers.0.a.weight"),
                                  ("model.layers.0.a.weight", "blk.0.a.weight")])
def test_two_tensors_under_one_kt_name_are_refused(keys):
    with pytest.raises(UserError) as e:
        non_expert_tensors(keys, "qwen3_moe", set(), "ckpt")
    assert repr(keys[0]) in str(e.value) and repr(keys[1]) in str(e.value)


def test_a_copy_under_a_packed_expert_name_is_refused():
    with pytest.raises(UserError, match="packed expert"):
        non_expert_tensors(["model.layers.0.ffn_up_exps.0.numa.0.weight"], "qwen3_moe", set(), "ckpt")


def _convert_with_non_experts(path, out):
    return convert(ConvertOptions(input_path=str(path), output=out, threadpool_count=1, cpuinfer_threads=2,
                                  include_non_expert=True, progress=False))


def _source_tensors(path):
    files = [SafetensorsFile(p) for p in sorted(path.glob("*.safetensors"))]
    return {k: f for f in files for k in f.keys()}


def _check_last_shard(out, source, expected):
    index = read_json(out / "model.safetensors.index.json")["weight_map"]
    shard = sorted(out.glob("model-*.safetensors"))[-1]
    last = SafetensorsFile(shard)
    names = set(last.keys())
    for name in expected:
        assert name in names, (name, sorted(names)[:20])
        assert index[name] == shard.name
    for name in names:
        assert not name.startswith(("model.", "layers.")) and "language_model" not in name, name
        assert not ROUTED_OR_MTP_EXPERT.search(name), name
    # every source tensor that is not a routed/MTP expert tensor, nothing more
    assert len(names) == sum(1 for k in source if not ROUTED_OR_MTP_EXPERT.search(k))
    return last


def _family_expectations(variant, num_layers):
    v = VARIANTS[variant]
    moe_layer = 1 if v.dense_first else 0
    router = {"w123": "block_sparse_moe.gate.weight", "k3": "block_sparse_moe.gate.weight", "v4": "ffn.gate.weight",
              "gpt_oss": "mlp.router.weight"}.get(v.keys, "mlp.gate.weight")
    out = {"embed.weight" if v.keys == "v4" else "embed_tokens.weight": "embed",
           "norm.weight": "norm", "head.weight" if v.keys == "v4" else "lm_head.weight": "head",
           "blk.0.attn_norm.weight" if v.keys == "v4" else "blk.0.input_layernorm.weight": "norm0",
           f"blk.{moe_layer}.{router}": "router"}
    if v.shared:
        out[f"blk.{moe_layer}.mlp.{v.shared}.gate_proj.weight"] = "shared"
    if v.mtp == "index":
        out[f"blk.{num_layers}.eh_proj.weight"] = "mtp"
        out[f"blk.{num_layers}.mlp.gate.weight"] = "mtp router"
    if v.mtp == "qwen":
        out["mtp.layers.0.input_layernorm.weight"] = "mtp"
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_family_gets_kts_non_expert_names(tmp_path, variant):
    ck = make_family_checkpoint(tmp_path / "ck", variant, num_layers=2, num_experts=2)
    _convert_with_non_experts(ck.path, tmp_path / "out")
    source = _source_tensors(ck.path)
    last = _check_last_shard(tmp_path / "out", source, _family_expectations(variant, 2))
    embed_src = [k for k in source if k.endswith(("embed_tokens.weight", "embed.weight"))][0]
    embed = "embed.weight" if VARIANTS[variant].keys == "v4" else "embed_tokens.weight"
    assert bytes(last.raw(embed)) == bytes(source[embed_src].raw(embed_src))
    if VARIANTS[variant].family == "gpt_oss":  # expert biases stay out, as kt does
        assert not any("bias" in k and "experts" in k for k in last.keys())
        assert "blk.0.mlp.router.bias" in last.keys()


def test_vl_wrapper_prefix_is_stripped(tmp_path):
    ck = make_family_checkpoint(tmp_path / "ck", "qwen3_moe_bf16", num_layers=1, num_experts=2,
                                prefix="language_model.model.")
    _convert_with_non_experts(ck.path, tmp_path / "out")
    _check_last_shard(tmp_path / "out", _source_tensors(ck.path),
                      ["blk.0.input_layernorm.weight", "blk.0.mlp.gate.weight", "embed_tokens.weight", "norm.weight"])


@pytest.mark.parametrize("key_style,expected", [
    ("official", ["embed.weight", "head.weight", "norm.weight", "hc_head_fn", "blk.0.attn_norm.weight",
                  "blk.0.ffn.gate.tid2eid", "blk.1.ffn.gate.bias", "blk.1.ffn.shared_experts.w1.weight",
                  "blk.1.ffn.shared_experts.w1.scale", "mtp.0.enorm.weight", "mtp.0.ffn.shared_experts.w2.weight",
                  "mtp.0.ffn.gate.bias"]),
    ("model", ["embed.weight", "lm_head.weight", "norm.weight", "hc_head_fn", "blk.0.attn_norm.weight",
               "blk.1.ffn.shared_experts.w1.weight", "blk.2.enorm.weight", "blk.2.ffn.gate.bias"]),
    ("hf_alias", ["embed_tokens.weight", "lm_head.weight", "norm.weight", "blk.0.input_layernorm.weight",
                  "blk.1.mlp.shared_experts.gate_proj.weight", "blk.1.mlp.shared_experts.gate_proj.weight_scale_inv",
                  "blk.1.mlp.gate.e_score_correction_bias", "blk.2.enorm.weight"]),
])
def test_deepseek_v4_gets_kts_ds4_names(tmp_path, key_style, expected):
    ck = make_v4_flash_checkpoint(tmp_path / "ck", "v4-flash-tiny", key_style=key_style, mtp_layers=1,
                                  num_experts=2, num_shards=2)
    _convert_with_non_experts(ck.path, tmp_path / "out")
    _check_last_shard(tmp_path / "out", _source_tensors(ck.path), expected)


def test_a_name_collision_stops_before_anything_is_written(tmp_path, capsys):
    ck = make_family_checkpoint(tmp_path / "ck", "qwen3_moe_bf16", num_layers=1, num_experts=2, num_shards=1)
    save_file(ck.path / "extra.safetensors", {"norm.weight": ("BF16", (4,), np.zeros(4, np.uint16))})
    out = tmp_path / "out"
    assert main(["-i", str(ck.path), "-o", str(out), "--include-non-expert", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "'model.norm.weight'" in err and "'norm.weight'" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["-i", str(ck.path), "-o", str(out), "--no-progress", "--threadpool-count", "1"]) == 0
