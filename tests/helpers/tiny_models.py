"""Tiny transformers MoE models with random weights (exactly bf16 values), saved, converted and run: the
families kt_runtime.inject serves (tests/test_inject.py, tests/test_hybrid_stream.py). transformers is
imported when a model is built."""
from __future__ import annotations

import copy

import torch

H, I, E, K, V = 256, 128, 8, 2, 64


def _v4_config(**over):
    import transformers

    cfg = dict(vocab_size=V, hidden_size=H, moe_intermediate_size=I, num_hidden_layers=3, num_attention_heads=2,
               num_key_value_heads=1, head_dim=32, q_lora_rank=32, n_routed_experts=E, num_experts_per_tok=K,
               o_groups=1, o_lora_rank=32, index_n_heads=2, index_head_dim=16, index_topk=4, sliding_window=16,
               hc_mult=2, mlp_layer_types=["hash_moe", "moe", "moe"], num_nextn_predict_layers=0,
               compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8})
    cfg.update(over)
    return transformers.DeepseekV4Config(**cfg)


def _qwen3_config(**over):
    import transformers

    cfg = dict(vocab_size=V, hidden_size=H, intermediate_size=384, moe_intermediate_size=I, num_experts=E,
               num_experts_per_tok=K, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
               head_dim=32, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    cfg.update(over)
    return transformers.Qwen3MoeConfig(**cfg)


def _v3_config(**over):
    import transformers

    cfg = dict(vocab_size=V, hidden_size=H, intermediate_size=384, moe_intermediate_size=I, n_routed_experts=E,
               num_experts_per_tok=K, n_shared_experts=1, num_hidden_layers=3, first_k_dense_replace=1, n_group=1,
               topk_group=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32,
               qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
    cfg.update(over)
    return transformers.DeepseekV3Config(**cfg)


def _mixtral_config(**over):
    import transformers

    cfg = dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    cfg.update(over)
    return transformers.MixtralConfig(**cfg)


BUILDERS = {
    "deepseek_v4": (_v4_config, "DeepseekV4ForCausalLM"),
    "qwen3_moe": (_qwen3_config, "Qwen3MoeForCausalLM"),
    "deepseek_v3": (_v3_config, "DeepseekV3ForCausalLM"),  # layer 0 dense (first_k_dense_replace)
    "mixtral": (_mixtral_config, "MixtralForCausalLM"),
}
MOE_LAYERS = {"deepseek_v4": [0, 1, 2], "qwen3_moe": [0, 1], "deepseek_v3": [1, 2], "mixtral": [0, 1]}


def make_model(family: str, seed: int = 0, **over):
    """float32 model whose weights are exactly bf16 values (so the bf16 checkpoint is lossless)."""
    import transformers

    cfg_fn, cls = BUILDERS[family]
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(cfg_fn(**over))
    return model.to(torch.bfloat16).to(torch.float32).eval()


def save_and_convert(model, root, method):
    from kt_convert.convert.pipeline import ConvertOptions, convert

    src = root / "src"
    if not src.exists():
        model.to(torch.bfloat16).save_pretrained(src)
        model.to(torch.float32)
    out = root / method
    if not out.exists():
        convert(ConvertOptions(input_path=str(src), output=out, quant_method=method, threadpool_count=1,
                               progress=False))
    return out


def zeroed_copy(model):
    """The model without its routed experts' output (their down projections zeroed)."""
    from kt_convert.kt_runtime.integrations import find_expert_modules

    z = copy.deepcopy(model)
    for _, mod in find_expert_modules(z).values():
        with torch.no_grad():
            mod.down_proj.zero_()
    return z


def tokens(seed=1, batch=2, length=12):
    return torch.randint(2, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def err(a, b):
    return float((a - b).norm() / b.norm())
