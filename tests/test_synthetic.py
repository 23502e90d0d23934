"""synthetic.v4_flash: DeepSeek-V4-Flash-shaped checkpoints with the real keys, dtypes and shapes."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kt_convert.synthetic.v4_flash import PRESETS, make_v4_flash_checkpoint
from kt_convert.kt_runtime.format.safetensors_file import SafetensorsFile

REPO = Path(__file__).resolve().parent.parent

# Expert key pattern per style: (layer prefix, experts infix, proj names, scale suffix)
STYLE_KEYS = {
    "official": ("layers.{L}.ffn.experts.{e}.{p}.weight", "layers.{L}.ffn.experts.{e}.{p}.scale", ("w1", "w3", "w2")),
    "model": ("model.layers.{L}.ffn.experts.{e}.{p}.weight", "model.layers.{L}.ffn.experts.{e}.{p}.scale", ("w1", "w3", "w2")),
    "hf_alias": ("model.layers.{L}.mlp.experts.{e}.{p}.weight", "model.layers.{L}.mlp.experts.{e}.{p}.weight_scale_inv",
                 ("gate_proj", "up_proj", "down_proj")),
}
LAYER_RE = re.compile(r"(?:^|\.)(layers|mtp)\.(\d+)\.")


def _open_all(ckpt) -> dict[str, tuple[SafetensorsFile, str]]:
    out = {}
    for path in ckpt.files:
        f = SafetensorsFile(path)
        for k in f.keys():
            assert k not in out, f"{k} in two files"
            out[k] = (f, path.name)
    return out


def _file_digest(ckpt) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpt.files}


def _expected_expert_keys(style: str, layers, E: int) -> list[str]:
    wfmt, sfmt, projs = STYLE_KEYS[style]
    keys = []
    for L in layers:
        for e in range(E):
            for p in projs:
                keys += [wfmt.format(L=L, e=e, p=p), sfmt.format(L=L, e=e, p=p)]
    return keys


@pytest.mark.parametrize("storage", ["I8", "U8", "F4"])
@pytest.mark.parametrize("key_style", ["official", "model", "hf_alias"])
def test_expert_keys_dtypes_shapes(tmp_path, key_style, storage):
    ckpt = make_v4_flash_checkpoint(tmp_path, key_style=key_style, storage=storage,
                                    include_non_expert=(storage == "I8"))
    H, I, E = 384, 512, 8
    assert ckpt.config["hidden_size"] == H and ckpt.config["moe_intermediate_size"] == I
    assert ckpt.expert_keys == _expected_expert_keys(key_style, range(2), E)
    assert ckpt.mtp_expert_keys == []
    tensors = _open_all(ckpt)
    for key in ckpt.expert_keys:
        f, _ = tensors[key]
        info = f.tensors[key]
        proj = key.split(".")[-2]
        n, k = (H, I) if proj in ("w2", "down_proj") else (I, H)
        if key.endswith(".weight"):
            assert info.dtype == storage
            assert info.shape == ((n, k) if storage == "F4" else (n, k // 2))
            assert f.array(key).shape == (n, k // 2)
        else:
            assert info.dtype == "F8_E8M0" and info.shape == (n, k // 32)
            scales = f.array(key)
            assert scales.min() >= 118 and scales.max() <= 132
    non_expert = [k for k in tensors if k not in set(ckpt.expert_keys)]
    assert bool(non_expert) == (storage == "I8")


def test_non_expert_tensors_follow_the_recipe(tmp_path):
    ckpt = make_v4_flash_checkpoint(tmp_path)
    t = {k: f.tensors[k] for k, (f, _) in _open_all(ckpt).items()}
    H, E, V, k = 384, 8, 64, 2
    expect = {
        "embed.weight": ("BF16", (V, H)), "head.weight": ("BF16", (V, H)), "norm.weight": ("BF16", (H,)),
        "hc_head_fn": ("F32", (4, 4 * H)), "hc_head_base": ("F32", (4,)), "hc_head_scale": ("F32", (1,)),
        "layers.0.attn_norm.weight": ("BF16", (H,)), "layers.1.ffn_norm.weight": ("BF16", (H,)),
        "layers.0.hc_attn_fn": ("F32", (24, 4 * H)), "layers.0.hc_ffn_base": ("F32", (24,)),
        "layers.0.hc_attn_scale": ("F32", (3,)),
        "layers.0.attn.wq_a.weight": ("F8_E4M3", (128, H)), "layers.0.attn.wq_a.scale": ("F8_E8M0", (1, 3)),
        "layers.0.attn.wq_b.weight": ("F8_E4M3", (256, 128)), "layers.0.attn.wq_b.scale": ("F8_E8M0", (2, 1)),
        "layers.0.attn.wkv.weight": ("F8_E4M3", (128, H)), "layers.0.attn.wo_a.weight": ("F8_E4M3", (256, 128)),
        "layers.0.attn.wo_b.weight": ("F8_E4M3", (H, 256)), "layers.0.attn.wo_b.scale": ("F8_E8M0", (3, 2)),
        "layers.0.attn.attn_sink": ("F32", (2,)), "layers.0.ffn.gate.weight": ("BF16", (E, H)),
        "layers.0.ffn.gate.tid2eid": ("I64", (V, k)), "layers.1.ffn.gate.bias": ("F32", (E,)),
        "layers.0.ffn.shared_experts.w1.weight": ("F8_E4M3", (512, H)),
        "layers.0.ffn.shared_experts.w1.scale": ("F8_E8M0", (4, 3)),
        "layers.1.ffn.shared_experts.w2.weight": ("F8_E4M3", (H, 512)),
        "layers.1.ffn.shared_experts.w2.scale": ("F8_E8M0", (3, 4)),
    }
    for key, (dtype, shape) in expect.items():
        assert (t[key].dtype, t[key].shape) == (dtype, shape), key
    assert "layers.1.ffn.gate.tid2eid" not in t and "layers.0.ffn.gate.bias" not in t  # layer 0 is a hash layer
    files = _open_all(ckpt)
    ids = files["layers.0.ffn.gate.tid2eid"][0].array("layers.0.ffn.gate.tid2eid")
    assert ids.min() >= 0 and ids.max() < E and all(len(set(row)) == k for row in ids.tolist())
    for key in ("layers.0.attn.wq_a.weight", "layers.1.ffn.shared_experts.w2.weight"):
        fp8 = files[key][0].array(key)
        assert not np.isin(fp8, [0x7F, 0xFF]).any()  # no E4M3FN NaN
    for key in ("layers.0.attn.wq_a.scale", "layers.1.ffn.shared_experts.w2.scale"):
        scales = files[key][0].array(key)
        assert scales.min() >= 118 and scales.max() <= 132


def test_config_and_side_files(tmp_path):
    ckpt = make_v4_flash_checkpoint(tmp_path, mtp_layers=1, num_experts=4, num_layers=3)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg == ckpt.config
    assert cfg["model_type"] == "deepseek_v4" and cfg["architectures"] == ["DeepseekV4ForCausalLM"]
    assert cfg["expert_dtype"] == "fp4" and cfg["swiglu_limit"] == 10.0 and cfg["hidden_act"] == "silu"
    assert cfg["n_routed_experts"] == 4 and cfg["num_hidden_layers"] == 3 and cfg["num_experts_per_tok"] == 2
    assert cfg["num_nextn_predict_layers"] == 1 and len(cfg["compress_ratios"]) == 4
    assert cfg["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
    assert cfg["torch_dtype"] == "bfloat16"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert isinstance(json.loads((tmp_path / name).read_text()), dict)
    tok = json.loads((tmp_path / "tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) == cfg["vocab_size"]


@pytest.mark.parametrize("key_style,prefix", [("official", "mtp.0.ffn.experts."),
                                              ("model", "model.layers.2.ffn.experts."),
                                              ("hf_alias", "model.layers.2.mlp.experts.")])
def test_mtp_experts(tmp_path, key_style, prefix):
    ckpt = make_v4_flash_checkpoint(tmp_path, key_style=key_style, mtp_layers=1, num_experts=2,
                                    include_non_expert=(key_style == "official"))
    assert len(ckpt.mtp_expert_keys) == 2 * 6
    assert all(k.startswith(prefix) for k in ckpt.mtp_expert_keys)
    assert not set(ckpt.mtp_expert_keys) & set(ckpt.expert_keys)
    tensors = _open_all(ckpt)
    for key in ckpt.mtp_expert_keys:
        f, _ = tensors[key]
        assert f.tensors[key].dtype == ("I8" if key.endswith(".weight") else "F8_E8M0")
    if key_style == "official":
        assert "mtp.0.e_proj.weight" in tensors and "mtp.0.ffn.gate.bias" in tensors


@pytest.mark.parametrize("num_shards,non_expert", [(2, False), (2, True), (3, True), (5, False)])
def test_shards_are_not_layer_aligned_and_index_is_complete(tmp_path, num_shards, non_expert):
    ckpt = make_v4_flash_checkpoint(tmp_path, num_shards=num_shards, include_non_expert=non_expert,
                                    mtp_layers=1, num_experts=4)
    names = [f"model-{i:05d}-of-{num_shards:05d}.safetensors" for i in range(1, num_shards + 1)]
    assert [p.name for p in ckpt.files] == names
    tensors = _open_all(ckpt)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {k: name for k, (_, name) in tensors.items()} == ckpt.weight_map
    assert index["metadata"]["total_size"] == sum(f.tensors[k].nbytes for k, (f, _) in tensors.items())
    assert set(ckpt.expert_keys + ckpt.mtp_expert_keys) <= set(index["weight_map"])
    layers_of_shard: dict[str, set] = {}
    shards_of_layer: dict[tuple, set] = {}
    for key, (_, name) in tensors.items():
        m = LAYER_RE.search(key)
        if m:
            layer = (m.group(1), int(m.group(2)))
            layers_of_shard.setdefault(name, set()).add(layer)
            shards_of_layer.setdefault(layer, set()).add(name)
    assert any(len(v) >= 2 for v in layers_of_shard.values()), layers_of_shard
    assert any(len(v) >= 2 for v in shards_of_layer.values()), shards_of_layer
    for f, _ in tensors.values():
        assert f.metadata == {"format": "pt"}


def test_single_file_and_no_index(tmp_path):
    one = make_v4_flash_checkpoint(tmp_path / "one", single_file=True, num_experts=2)
    assert [p.name for p in one.files] == ["model.safetensors"]
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    assert set(one.weight_map.values()) == {"model.safetensors"}
    two = make_v4_flash_checkpoint(tmp_path / "two", num_shards=2, write_index=False, num_experts=2)
    assert len(two.files) == 2 and not (tmp_path / "two" / "model.safetensors.index.json").exists()
    default = make_v4_flash_checkpoint(tmp_path / "default", num_experts=2)
    assert [p.name for p in default.files] == ["model-00001-of-00001.safetensors"]
    with pytest.raises(ValueError, match="single_file"):
        make_v4_flash_checkpoint(tmp_path / "x", single_file=True, num_shards=2)


def test_deterministic_and_independent_of_layout(tmp_path):
    a = make_v4_flash_checkpoint(tmp_path / "a", seed=7, num_shards=2, num_experts=2)
    b = make_v4_flash_checkpoint(tmp_path / "b", seed=7, num_shards=2, num_experts=2)
    c = make_v4_flash_checkpoint(tmp_path / "c", seed=8, num_shards=2, num_experts=2)
    assert _file_digest(a) == _file_digest(b)
    assert _file_digest(a) != _file_digest(c)
    # Same seed, other key style / storage / sharding: same bytes under the corresponding key.
    d = make_v4_flash_checkpoint(tmp_path / "d", seed=7, key_style="hf_alias", storage="F4",
                                 single_file=True, num_experts=2)
    ta, td = _open_all(a), _open_all(d)
    for ka, kd in zip(a.expert_keys, d.expert_keys):
        assert np.array_equal(ta[ka][0].raw(ka), td[kd][0].raw(kd)), (ka, kd)
    assert np.array_equal(ta["embed.weight"][0].raw("embed.weight"),
                          td["model.embed_tokens.weight"][0].raw("model.embed_tokens.weight"))


def test_nibbles_cover_all_codes_and_load_in_safetensors(tmp_path):
    ckpt = make_v4_flash_checkpoint(tmp_path, storage="F4", num_experts=1, num_layers=1, include_non_expert=False)
    key = ckpt.expert_keys[0]
    f, _ = _open_all(ckpt)[key]
    packed = f.array(key)
    assert set(np.unique(packed & 0xF)) == set(range(16)) and set(np.unique(packed >> 4)) == set(range(16))
    with safe_open(str(ckpt.files[0]), framework="pt") as g:
        w = g.get_tensor(key)
        assert w.dtype == torch.float4_e2m1fn_x2 and tuple(w.shape) == packed.shape
        assert np.array_equal(w.view(torch.uint8).numpy(), packed)
        s = g.get_tensor(ckpt.expert_keys[1])
        assert s.dtype == torch.float8_e8m0fnu
        assert np.array_equal(s.view(torch.uint8).numpy(), f.array(ckpt.expert_keys[1]))
        vals = s.float()
        assert torch.all((vals >= 2.0**-9) & (vals <= 2.0**5))


def test_real_flash_dims(tmp_path):
    """The v4-flash-layer preset at the real H=4096, I=2048 (a small slice of it, to stay fast)."""
    assert PRESETS["v4-flash-layer"]["hidden_size"] == 4096
    ckpt = make_v4_flash_checkpoint(tmp_path, "v4-flash-layer", num_experts=1, num_layers=1,
                                    include_non_expert=False)
    f = SafetensorsFile(ckpt.files[0])
    shapes = {k: (i.dtype, i.shape) for k, i in f.tensors.items()}
    assert shapes["layers.0.ffn.experts.0.w1.weight"] == ("I8", (2048, 2048))
    assert shapes["layers.0.ffn.experts.0.w1.scale"] == ("F8_E8M0", (2048, 128))
    assert shapes["layers.0.ffn.experts.0.w2.weight"] == ("I8", (4096, 1024))
    assert shapes["layers.0.ffn.experts.0.w2.scale"] == ("F8_E8M0", (4096, 64))
    assert ckpt.config["num_experts_per_tok"] == 1  # clamped to the expert count


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        make_v4_flash_checkpoint(tmp_path, "v5")
    with pytest.raises(ValueError, match="storage"):
        make_v4_flash_checkpoint(tmp_path, storage="F8")
    with pytest.raises(ValueError, match="key_style"):
        make_v4_flash_checkpoint(tmp_path, key_style="gguf")
    with pytest.raises(ValueError, match="hidden_size=100"):
        make_v4_flash_checkpoint(tmp_path, hidden_size=100)
    (tmp_path / "other.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="other.safetensors"):
        make_v4_flash_checkpoint(tmp_path)


def test_cli(tmp_path):
    out = tmp_path / "ck"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_synthetic_checkpoint.py"), str(out), "--preset",
         "v4-flash-tiny", "--experts", "2", "--layers", "1", "--storage", "U8", "--key-style", "model",
         "--mtp-layers", "1", "--shards", "2", "--seed", "3"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and "MiB" in proc.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "model.layers.0.ffn.experts.1.w2.weight" in index["weight_map"]
    assert "model.layers.1.ffn.experts.1.w2.scale" in index["weight_map"]  # MTP block as layer 1
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "make_synthetic_checkpoint.py"),
                          str(tmp_path / "bad"), "--hidden-size", "100"], capture_output=True, text=True)
    assert bad.returncode == 2 and "multiple of 32" in bad.stderr


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_synthetic_checkpoint",
                                                  REPO / "scripts" / "make_synthetic_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_offers_every_family(tmp_path, capsys):
    """--list names every converter family and variant; --family F writes a checkpoint the converter
    detects as F; options of the other generator are refused (exit 2)."""
    from kt_convert import synthetic
    from kt_convert.convert.families import FAMILIES, detect_family
    from kt_convert.kt_runtime.format.safetensors_file import SafetensorsFile

    script = _script()
    assert script.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(f.name in listed for f in FAMILIES)
    assert all(name in listed for name in [*synthetic.VARIANTS, synthetic.V4_FLASH_VARIANT])
    assert set(synthetic.variants_by_family()) == {f.name for f in FAMILIES}
    for family in synthetic.variants_by_family():
        out = tmp_path / family
        args = [str(out), "--family", family, "--experts", "2", "--layers", "2"]
        if family == "deepseek_v4":
            args += ["--experts-only"]
        assert script.main(args) == 0, family
        cfg = json.loads((out / "config.json").read_text())
        keys = [k for f in out.glob("*.safetensors") for k in SafetensorsFile(f).keys()]
        model_type = cfg.get("model_type") if "text_config" not in cfg else cfg["text_config"]["model_type"]
        assert detect_family(model_type, keys).name == family
    assert script.main([str(tmp_path / "k"), "--family", "deepseek_v3", "--variant", "kimi_k2_int4",
                        "--experts", "2", "--group", "64"]) == 0
    cfg = json.loads((tmp_path / "k" / "config.json").read_text())
    assert cfg["model_type"] == "kimi_k2"
    assert cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] == 64
    capsys.readouterr()
    for bad, why in ((["--family", "deepseek_v3", "--storage", "U8"], "--storage does not apply"),
                     (["--family", "nope"], "unknown family 'nope'"),
                     (["--family", "mixtral", "--variant", "kimi_k2_int4"], "mixtral has no variant"),
                     (["--group", "64"], "--group does not apply")):
        assert script.main([str(tmp_path / "bad"), *bad]) == 2, bad
        assert why in capsys.readouterr().err
