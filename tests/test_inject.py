"""kt_runtime.inject: hybrid experts inside tiny transformers models (random weights, CPU).

Each model is built with from_config, rounded to bf16 and saved with save_pretrained (per-expert
BF16 keys), converted to int8 / int4 with convert.pipeline.convert, and injected back (float32
model). Judged against the effect of dropping the routed experts' output (`zero_err`):
- vs the original model: int8 < 0.2 × zero_err; int4 < 0.6 × zero_err (per-row int4 of Gaussian
  weights is ≈12 % noise per matrix; measured ≈ 0.37 × zero_err for V4);
- vs the original model with its expert weights replaced by the dequantized packed ones (what the
  runtime is meant to compute): < 0.25 × zero_err for both (only int8 activations, bf16 GPU experts
  and the routing flips they cause remain; measured 0.005-0.11, the top from one flipped top-k).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kt_convert import kt_runtime  # noqa: E402
from helpers.tiny_models import (BUILDERS, MOE_LAYERS, E, H, I, K, err, logits, make_model,  # noqa: E402
                                 save_and_convert, tokens, zeroed_copy)
from kt_convert.kt_runtime.integrations import (HybridExperts, find_expert_modules, hybrid_layers,  # noqa: E402
                                                record_routing)


def _converter_supports(family: str) -> bool:
    from kt_convert.convert.families import detect_family

    key = {"mixtral": "model.layers.0.block_sparse_moe.experts.0.w1.weight"}.get(
        family, "model.layers.0.mlp.experts.0.gate_proj.weight")
    return detect_family(family, [key]) is not None


class Built:
    """Lazily built tiny models and their conversions: built[family] -> (model, {method: packed dir})."""

    def __init__(self, tmp_path_factory):
        self.tmp, self.models, self.roots = tmp_path_factory, {}, {}

    def __getitem__(self, family):
        if not _converter_supports(family):
            pytest.skip(f"the converter does not read {family} checkpoints yet (convert/families.py)")
        if family not in self.models:
            self.models[family] = make_model(family)
            self.roots[family] = self.tmp.mktemp(family)
        model, root = self.models[family], self.roots[family]
        return model, _Packed(model, root)


class _Packed(dict):
    def __init__(self, model, root):
        super().__init__()
        self.model, self.root = model, root

    def __missing__(self, method):
        self[method] = save_and_convert(self.model, self.root, method)
        return self[method]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return Built(tmp_path_factory)


def dequantized_copy(model, packed):
    """The model with its routed-expert weights replaced by the dequantized packed ones."""
    ref = copy.deepcopy(model)
    w = kt_runtime.load_experts(packed)
    for layer, (_, mod) in find_expert_modules(ref).items():
        with torch.no_grad():
            for e in range(w.num_experts):
                mod.gate_up_proj[e].copy_(torch.cat([w.dequantize(layer, e, "gate"), w.dequantize(layer, e, "up")]))
                mod.down_proj[e].copy_(w.dequantize(layer, e, "down"))
    return ref


@pytest.mark.parametrize("family,method", [("deepseek_v4", "int8"), ("deepseek_v4", "int4"), ("qwen3_moe", "int8"),
                                           ("qwen3_moe", "int4"), ("deepseek_v3", "int8"), ("mixtral", "int4")])
def test_injected_logits_close(built, family, method):
    model, packed = built[family]
    ids = tokens()
    ref = logits(model, ids)
    zero_err = err(logits(zeroed_copy(model), ids), ref)
    deq = logits(dequantized_copy(model, packed[method]), ids)
    assert zero_err > 0.05, "the routed experts must matter for this test to mean anything"
    for n in (0, 3, E):  # all on the CPU, a mix, all on the (cpu) "GPU" device
        m = copy.deepcopy(model)
        kt_runtime.inject(m, packed[method], num_gpu_experts=n, device="cpu")
        got = logits(m, ids)
        assert err(got, ref) < (0.2 if method == "int8" else 0.6) * zero_err, (n, err(got, ref), zero_err)
        assert err(got, deq) < 0.25 * zero_err, (n, err(got, deq), zero_err)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_generate_and_structure(built, family):
    model, packed = built[family]
    m = copy.deepcopy(model)
    before = {name: mod for name, mod in m.named_modules()}
    n_params = sum(p.numel() for p in m.parameters())
    replaced = kt_runtime.inject(m, packed["int8"], num_gpu_experts=2, device="cpu")
    mods = find_expert_modules(m)
    assert sorted(mods) == MOE_LAYERS[family]
    assert sorted(replaced) == sorted(mods) and all(isinstance(x, HybridExperts) for _, x in mods.values())
    assert all(h.gpu_experts == [0, 1] for h in hybrid_layers(m).values())
    # routers, shared experts, hash-routing tables untouched (same objects)
    for name, mod in m.named_modules():
        if name.endswith(".gate") or "shared_expert" in name:
            assert mod is before[name], name
    if family == "deepseek_v4":
        assert m.model.layers[0].mlp.is_hash and m.model.layers[0].mlp.gate is before["model.layers.0.mlp.gate"]
    # original expert weights released, none left in the model's parameters / state dict
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in m.state_dict())
    assert sum(p.numel() for p in m.parameters()) == n_params - len(mods) * E * 3 * H * I
    assert before[mods[next(iter(mods))][0]].gate_up_proj.device.type == "meta"
    out = m.generate(tokens(batch=1, length=5), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)
    # teacher-forced agreement with the dequantized reference on the generated text
    deq = dequantized_copy(model, packed["int8"])
    agree = (logits(m, out).argmax(-1) == logits(deq, out).argmax(-1)).float().mean()
    assert agree >= 0.8


def test_record_routing_and_frequency_placement(built, tmp_path):
    model, packed = built["deepseek_v4"]
    m = copy.deepcopy(model)
    with record_routing(m) as stats:
        logits(m, tokens(seed=3, batch=4, length=16))
    assert stats.layers == [0, 1, 2]
    assert all(int(stats.counts(layer).sum()) == 4 * 16 * K for layer in stats.layers)
    stats.save(tmp_path / "routing.json")
    kt_runtime.inject(m, packed["int8"], num_gpu_experts=3, device="cpu", placement="frequency",
                      stats=tmp_path / "routing.json")
    for layer, h in hybrid_layers(m).items():
        c = stats.counts(layer).double()
        assert h.gpu_experts == sorted(torch.sort(-c, stable=True).indices[:3].tolist())
    # recording also works on the injected model, and dynamic placement runs inside generate
    with record_routing(m) as again:
        logits(m, tokens(seed=4))
    assert again.layers == [0, 1, 2]
    d = copy.deepcopy(model)
    kt_runtime.inject(d, packed["int8"], num_gpu_experts={0: 1, 1: 2, 2: 0}, device="cpu", dynamic=True,
                      update_interval=2)
    d.generate(tokens(batch=1, length=4), max_new_tokens=6, do_sample=False)
    hs = hybrid_layers(d)
    assert [hs[i].num_gpu_experts for i in (0, 1, 2)] == [1, 2, 0]
    assert hs[1].calls == 6 and int(hs[1].counts.sum()) == (4 + 5) * K  # prefill + 5 decode steps


def test_mismatch_errors(built, tmp_path):
    model, packed = built["deepseek_v4"]
    qmodel, qpacked = built["qwen3_moe"]
    with pytest.raises(ValueError, match=r"model has MoE layers \[0, 1, 2\].*layers \[0, 1\]"):
        kt_runtime.inject(copy.deepcopy(model), qpacked["int8"], device="cpu")
    with pytest.raises(ValueError, match=r"model has MoE layers \[0, 1\].*not in the model: \[2\]"):
        kt_runtime.inject(copy.deepcopy(qmodel), packed["int8"], device="cpu")
    from kt_convert.convert.pipeline import ConvertOptions, convert

    partial = tmp_path / "partial"  # converted with --layers: refused, and said why
    convert(ConvertOptions(input_path=str(packed["int8"].parent / "src"), output=partial, quant_method="int8",
                           threadpool_count=1, progress=False, layers=[1, 2]))
    with pytest.raises(ValueError, match=r"missing: \[0\]\): a partial output, converted with --layers"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load_experts warns that it is partial
        kt_runtime.inject(copy.deepcopy(model), partial, device="cpu")
    other = make_model("deepseek_v4", n_routed_experts=4)
    with pytest.raises(ValueError, match="model has experts 4, the packed weights .* have 8"):
        kt_runtime.inject(other, packed["int8"], device="cpu")
    other = make_model("deepseek_v4", hidden_size=384)
    with pytest.raises(ValueError, match="hidden size 384"):
        kt_runtime.inject(other, packed["int8"], device="cpu")
    other = make_model("deepseek_v4", moe_intermediate_size=256)
    with pytest.raises(ValueError, match="expert intermediate size 256"):
        kt_runtime.inject(other, packed["int8"], device="cpu")
    other = make_model("deepseek_v4", swiglu_limit=7.0)
    with pytest.raises(ValueError, match="swiglu_limit=7.0"):
        kt_runtime.inject(other, packed["int8"], device="cpu")
    other = make_model("deepseek_v4", seed=5)  # same shapes, different weights
    with pytest.raises(ValueError, match="converted from this model"):
        kt_runtime.inject(other, packed["int8"], device="cpu")
    kt_runtime.inject(other, packed["int8"], device="cpu", check_values=False)  # the user's call
    with pytest.raises(ValueError, match="inject was called twice"):
        kt_runtime.inject(other, packed["int8"], device="cpu")
    with pytest.raises(ValueError, match="no routed-experts modules"):
        kt_runtime.inject(torch.nn.Linear(2, 2), packed["int8"], device="cpu")
    with pytest.raises(ValueError, match=r"num_gpu_experts must be in \[0, 8\]"):
        kt_runtime.inject(copy.deepcopy(model), packed["int8"], num_gpu_experts=9, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        k3 = make_model("deepseek_v4", num_experts_per_tok=3)
        kt_runtime.inject(k3, packed["int8"], device="cpu")
    assert any("routes 3 experts per token" in str(c.message) for c in caught)


@pytest.mark.gpu
def test_inject_cuda(built):
    model, packed = built["qwen3_moe"]
    ids = tokens()
    ref = logits(dequantized_copy(model, packed["int8"]), ids)
    m = copy.deepcopy(model).cuda()
    kt_runtime.inject(m, packed["int8"], num_gpu_experts=4, device="cuda")
    got = logits(m, ids.cuda()).cpu()
    assert err(got, ref) < 0.05
    out = m.generate(tokens(batch=1, length=5).cuda(), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_inject_gpu_prefill_threshold_without_cuda(built, monkeypatch):
    """On the CPU the threshold is ignored with one warning for the whole model, and nothing changes."""
    from kt_convert.kt_runtime.hybrid import gpu_prefill

    monkeypatch.setattr(gpu_prefill, "_WARNED", set())
    model, packed = built["qwen3_moe"]
    ids = tokens()
    plain = copy.deepcopy(model)
    kt_runtime.inject(plain, packed["int8"], num_gpu_experts=2, device="cpu")
    m = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kt_runtime.inject(m, packed["int8"], num_gpu_experts=2, device="cpu", gpu_prefill_token_threshold=4)
    assert len([c for c in caught if "gpu_prefill_token_threshold=4 is ignored" in str(c.message)]) == 1
    assert all(h.prefill is None for h in hybrid_layers(m).values())
    assert torch.equal(logits(m, ids), logits(plain, ids))


@pytest.mark.gpu
def test_inject_cuda_gpu_prefill(built):
    """Prompt calls (24 tokens >= 8) take the GPU prefill in every layer, through one shared workspace; decode
    calls (1 token) do not."""
    model, packed = built["qwen3_moe"]
    ids = tokens()
    ref = logits(dequantized_copy(model, packed["int8"]), ids)
    m = copy.deepcopy(model).cuda()
    kt_runtime.inject(m, packed["int8"], num_gpu_experts=2, device="cuda", gpu_prefill_token_threshold=8,
                      gpu_prefill_memory=64 << 20)
    layers = hybrid_layers(m)
    ws = {id(h.prefill.ws) for h in layers.values()}
    assert len(ws) == 1 and next(iter(layers.values())).prefill.ws.memory == 64 << 20
    got = logits(m, ids.cuda()).cpu()
    stats = next(iter(layers.values())).prefill.ws.stats
    assert stats["calls"] == len(layers)
    assert err(got, ref) < 0.05
    out = m.generate(tokens(batch=1, length=9).cuda(), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 13) and stats["calls"] == 2 * len(layers)  # the 9-token prompt, not the 1-token steps
