"""Checkpoints written by the real transformers library (tiny random models, from_config ->
save_pretrained) convert byte-identically to the reference quantizer applied to the experts
transformers holds in memory (fused gate_up_proj [E, 2I, H] / down_proj [E, H, I]): an oracle
that shares no layout code with the converter."""
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kt_convert import kt_runtime  # noqa: E402
from helpers.outputs import read_json  # noqa: E402
from kt_convert.convert.pipeline import ConvertOptions, convert  # noqa: E402
from kt_convert.kt_runtime.format.methods import get_method  # noqa: E402
from kt_convert.quant.reference import pack_expert_reference  # noqa: E402

H, I, E = 384, 128, 4  # H not in {I, 2I}; int4-aligned with threadpool count 1
COMMON = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=2, vocab_size=64, num_experts_per_tok=2)


def _config(name):
    if name == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**COMMON, moe_intermediate_size=I, intermediate_size=3 * H, num_experts=E,
                                           num_key_value_heads=1, head_dim=32)
    if name == "mixtral":
        return transformers.MixtralConfig(**COMMON, intermediate_size=I, num_local_experts=E, num_key_value_heads=1,
                                          head_dim=32)
    if name == "deepseek_v3":
        return transformers.DeepseekV3Config(**COMMON, intermediate_size=3 * H, moe_intermediate_size=I,
                                             n_routed_experts=E, n_shared_experts=1, first_k_dense_replace=1,
                                             num_key_value_heads=2, q_lora_rank=64, kv_lora_rank=64,
                                             qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, n_group=1,
                                             topk_group=1)
    if name == "deepseek_v4":
        cls = getattr(transformers, "DeepseekV4Config", None)
        if cls is None:
            pytest.skip(f"transformers {transformers.__version__} has no DeepseekV4Config")
        return cls(**COMMON, moe_intermediate_size=I, n_routed_experts=E, num_key_value_heads=1, head_dim=64,
                   qk_rope_head_dim=32, q_lora_rank=64, o_lora_rank=64, o_groups=2, num_hash_layers=1,
                   index_n_heads=2, index_head_dim=32, compress_ratios=[0, 0], num_nextn_predict_layers=0)
    raise ValueError(name)


FUSED = re.compile(r"layers\.(\d+)\.(?:mlp|ffn|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)$")


def _in_memory_experts(model):
    """{(layer, expert, proj): bf16 [N, K]} from transformers' own fused expert parameters."""
    out = {}
    for name, p in model.named_parameters():
        m = FUSED.search(name)
        if not m:
            continue
        layer, which = int(m[1]), m[2]
        for e in range(p.shape[0]):
            if which == "down_proj":
                out[(layer, e, "down")] = p[e].detach()
            else:  # concatenation of [gate; up] along dim 1
                out[(layer, e, "gate")], out[(layer, e, "up")] = p[e, :I].detach(), p[e, I:].detach()
    return out


@pytest.mark.parametrize("name,family,moe_layers", [("qwen3_moe", "qwen3_moe", [0, 1]), ("mixtral", "mixtral", [0, 1]),
                                                     ("deepseek_v3", "deepseek_v3", [1]),
                                                     ("deepseek_v4", "deepseek_v4", [0, 1])])
def test_transformers_saved_checkpoint_converts(tmp_path, name, family, moe_layers):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(name), dtype=torch.bfloat16)
    experts = _in_memory_experts(model)
    assert sorted({k[0] for k in experts}) == moe_layers and all(t.shape[1] in (H, I) for t in experts.values())
    assert all(t.float().abs().max() > 0 for t in experts.values())
    model.save_pretrained(tmp_path / "ck")
    report = convert(ConvertOptions(input_path=str(tmp_path / "ck"), output=tmp_path / "out", threadpool_count=1,
                                    progress=False))
    assert (report.family, report.input_type) == (family, "bf16")
    w = kt_runtime.load_experts(tmp_path / "out")
    assert w.layers == moe_layers and (w.hidden_size, w.moe_intermediate_size, w.num_experts) == (H, I, E)
    method = get_method("int4")
    for (layer, expert, proj), mat in experts.items():
        (ref_w, ref_s), = pack_expert_reference(mat, proj, H, I, 1, method)
        got_w, got_s = w.expert_tensors(layer, expert, proj, 0)
        assert np.array_equal(got_w, ref_w.numpy()), (layer, expert, proj)
        assert np.array_equal(got_s, ref_s.numpy()), (layer, expert, proj)
    manifest = read_json(tmp_path / "out" / "kt_manifest.json")
    assert manifest["swiglu_limit"] == (10.0 if name == "deepseek_v4" else None)
