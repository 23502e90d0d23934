"""Shared by the GPU prefill tests (test_gpu_prefill.py on the CPU, test_gpu_prefill_gpu.py with Triton / CUDA):
one packed output per method and family activation, small routings, the float reference with the biases.

CASES (name -> how it is made):
  v4-int4, v4-int8      v4-flash-tiny (H=384, I=512, 8 experts) with 2 NUMA shards: SiLU and V4's clamp
  gptoss-int4/-int8     gpt-oss MXFP4 (H=384, I=256, 4 experts), 2 NUMA shards: gpt-oss's activation, clamp 7
                        and the gate/up/down biases (scaled up so that they matter)
  raw-g32, raw-g128     Qwen3-MoE BF16 (H=384, I=256, 6 experts) as RAWINT4: SiLU, no clamp (RAWINT4 refuses clamps)
  k2-g32                Kimi-K2 INT4 (H=384, I=256, 6 experts) as RAWINT4 g32: its codes carried over, the level -8
                        (stored nibble 0) among them
"""
from __future__ import annotations

import pytest
import torch

from kt_convert import kt_runtime
from kt_convert.kt_runtime.expert_activation import ExpertBiases, read_expert_biases
from kt_convert.kt_runtime.reference import moe_reference

CASES = ("v4-int4", "v4-int8", "gptoss-int4", "gptoss-int8", "raw-g32", "raw-g128", "k2-g32")
# x scale per family: gate/up land where the clamp is reached by some values (the synthetic weights differ)
X_SCALE = {"v4": 1.0, "gptoss": 0.01, "raw": 1.0, "k2": 1.0}


class Case:
    def __init__(self, name, weights, biases=None):
        self.name, self.weights, self.biases = name, weights, biases
        self.family = name.split("-")[0]
        self.layer = weights.layers[-1]

    def routing(self, T, k=3, seed=0):
        """(x [T, H], ids [T, k] distinct per token, weights [T, k])."""
        E = self.weights.num_experts
        g = torch.Generator().manual_seed(seed)
        k = min(k, E)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        w = torch.softmax(torch.randn(T, k, generator=g), -1)
        return torch.randn(T, self.weights.hidden_size, generator=g) * X_SCALE[self.family], ids, w

    def reference(self, x, ids, w, **kw):
        return moe_reference(self.weights, self.layer, x, ids, w, biases=self.biases, **kw)


def _convert(src, out, **kw):
    from kt_convert.convert.pipeline import ConvertOptions, convert

    convert(ConvertOptions(input_path=str(src), output=out, progress=False, **kw))
    return kt_runtime.load_experts(out)


class Cases:
    """Lazily converted cases: cases[name] -> Case."""

    def __init__(self, tmp_path_factory):
        self.tmp, self.made, self.sources = tmp_path_factory, {}, {}

    def _source(self, family):
        if family not in self.sources:
            root = self.tmp.mktemp(f"prefill_{family}")
            if family == "v4":
                from kt_convert.synthetic.v4_flash import make_v4_flash_checkpoint
                self.sources[family] = make_v4_flash_checkpoint(root / "ck", "v4-flash-tiny", mtp_layers=0,
                                                                num_shards=1).path
            else:
                from kt_convert.synthetic.families import make_family_checkpoint
                variant, I, E = {"gptoss": ("gpt_oss_mxfp4", 256, 4), "k2": ("kimi_k2_int4", 256, 6)}.get(
                    family, ("qwen3_moe_bf16", 256, 6))
                self.sources[family] = make_family_checkpoint(root / "ck", variant, hidden_size=384,
                                                              intermediate_size=I, num_experts=E).path
        return self.sources[family]

    def __getitem__(self, name) -> Case:
        if name not in self.made:
            family, method = name.split("-")
            src = self._source(family)
            out = self.tmp.mktemp(f"prefill_{name}") / "out"
            if family in ("raw", "k2"):
                w = _convert(src, out, quant_method="rawint4", group_size=int(method[1:]))
            else:
                w = _convert(src, out, quant_method=method, threadpool_count=2)
            biases = None
            if family == "gptoss":
                b = read_expert_biases(src, w, w.layers[-1])
                biases = ExpertBiases(b.gate * 40.0, b.up * 40.0, b.down * 40.0)
            self.made[name] = Case(name, w, biases)
        return self.made[name]


@pytest.fixture(scope="session")
def cases(tmp_path_factory):
    return Cases(tmp_path_factory)


def rel(a, b):
    """Relative L2 error of a against b (either device)."""
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm())
