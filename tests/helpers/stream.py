"""Shared by the stream-ordered hybrid tests (test_hybrid_stream.py on the CPU, test_hybrid_gpu.py on CUDA):
the v4-flash-tiny checkpoint (H=384, I=512, 8 experts, 2 layers) packed as int8 with 2 NUMA shards, random
routings, and the relative error."""
from __future__ import annotations

import pytest
import torch

from kt_convert import kt_runtime

H, E = 384, 8


@pytest.fixture(scope="module")
def packed(tiny_checkpoint, tmp_path_factory):
    from kt_convert.convert.pipeline import ConvertOptions, convert

    out = tmp_path_factory.mktemp("stream_int8") / "out"
    convert(ConvertOptions(input_path=str(tiny_checkpoint.path), output=out, quant_method="int8",
                           threadpool_count=2, progress=False))
    return kt_runtime.load_experts(out)


def routing(T, k=3, seed=0):
    """(x [T, H], ids [T, k] distinct per token, weights [T, k]) from `seed`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    return torch.randn(T, H, generator=g), ids, w


def rel(a, b):
    """Relative L2 error of a against b (either device)."""
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm())
