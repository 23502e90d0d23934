#!/usr/bin/env python3
"""Run the real kt-kernel on packed outputs and measure what it computes.

    python scripts/kt_compat.py OUT [OUT ...] --kt-path DIR [--tokens 4] [--json FILE]

For each output (AMXINT4, AMXINT8 or RAWINT4) and each kt-kernel backend this CPU can run, kt's own loader
and MoE forward (`KTMoEWrapper`, as SGLang-KT calls it) compute one layer on random tokens; the result is
compared with a float64 reference of the output's own codes (`kt_runtime.reference.moe_reference`) and with
the project's engine (`kt_runtime.CPUMoE`) on the same inputs. `--source CKPT` also runs kt's own conversion
(AMXINT4/AMXINT8 online quantization of the decoded source) and compares kt's forward on both.

kt-kernel runs in a child process (`kt_compat.py kt-run JOB.json`): importing it turns on flush-to-zero for
its whole process, and a kt kernel that crashes ends only the child (reported as its signal). `--kt-path` is
a folder holding the `kt_kernel` package (e.g. `pip install --no-deps --target DIR kt_kernel-0.7.2-...whl
gguf`); without it, kt_kernel must be importable by this interpreter.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHILD_TIMEOUT_S = 600.0


# -- the kt side (child process) -------------------------------------------------------------------------

def _without_pinned_memory(torch) -> None:
    """kt allocates its staging buffers with pin_memory=True, which needs CUDA; on a CPU-only torch the
    buffers are made unpinned (same contents, same addresses for the C++ side)."""
    if torch.cuda.is_available():
        return
    for name in ("zeros", "empty", "full", "ones"):
        real = getattr(torch, name)

        def unpinned(*args, _real=real, **kwargs):
            kwargs.pop("pin_memory", None)
            return _real(*args, **kwargs)

        setattr(torch, name, unpinned)


def kt_run(job_path: str) -> None:
    """Child: one kt forward as the job describes; writes y (float32) to job['out'] (.npy) and what ran to
    job['out'] + '.json'. The `kt_kernel` package runs through KTMoEWrapper; a build with only the
    `kt_kernel_ext` extension (kt-kernel built from its repository) through the extension's own classes."""
    job = json.loads(Path(job_path).read_text())
    os.environ.update(job.get("env", {}))
    os.environ.setdefault("KT_FORCE_SYNC_SUBMIT", "1")  # no CUDA stream: kt's synchronous submit/sync path
    import importlib.util

    import numpy as np
    import torch

    _without_pinned_memory(torch)
    inputs = np.load(job["inputs"])
    x = torch.from_numpy(inputs["x_bits"].view(np.int16)).view(torch.bfloat16)
    ids = torch.from_numpy(inputs["ids"]).to(torch.long)
    weights = torch.from_numpy(inputs["weights"]).to(torch.float32)
    if importlib.util.find_spec("kt_kernel") is not None and job.get("api", "wrapper") == "wrapper":
        y, ran = _forward_wrapper(job, x, ids, weights)
    else:
        y, ran = _forward_ext(job, x, ids, weights)
    np.save(job["out"], y.to(torch.float32).numpy())
    Path(job["out"] + ".json").write_text(json.dumps(ran))


def _max_len(tokens: int) -> int:
    """kt's buffers are sized by a multiple of its 32-row step."""
    return max(32, -(-tokens // 32) * 32)


def _forward_wrapper(job, x, ids, weights):
    """kt as SGLang-KT runs it: KTMoEWrapper, its loaders, load_weights (or load_weights_from_tensors: kt's
    own quantization of the decoded source, what its converter writes), forward."""
    import numpy as np
    import torch

    import kt_kernel
    from kt_kernel import KTMoEWrapper

    if job.get("keep_loaded_tensors"):  # hold every tensor kt's RAWINT4 loader returns for the whole run
        from kt_kernel.utils import loader as kt_loader

        real_load, kept = kt_loader.CompressedSafeTensorLoader.load_experts, []

        def load_and_keep(self, *args, **kwargs):
            kept.append(real_load(self, *args, **kwargs))
            return kept[-1]

        kt_loader.CompressedSafeTensorLoader.load_experts = load_and_keep
    E = job["num_experts"]
    online = job.get("online")
    wrapper = KTMoEWrapper(layer_idx=job["layer"], num_experts=E, num_experts_per_tok=ids.shape[1],
                           hidden_size=job["hidden_size"], moe_intermediate_size=job["moe_intermediate_size"],
                           gpu_experts_mask=None, cpuinfer_threads=job["threads"],
                           threadpool_count=job["threadpool_count"],
                           weight_path=job["weights"] if online is None else job["online_out"],
                           chunked_prefill_size=_max_len(x.shape[0]), method=job["method"])
    identity = torch.arange(E, dtype=torch.long)
    if online is None:
        wrapper.load_weights(identity)
    else:
        src = np.load(online)
        bf16 = {p: torch.from_numpy(src[p].view(np.int16)).view(torch.bfloat16) for p in ("gate", "up", "down")}
        wrapper.load_weights_from_tensors(bf16["gate"], bf16["up"], bf16["down"], identity)
    y = wrapper.forward(x, ids, weights, 0)
    return y, {"api": "KTMoEWrapper", "backend": type(wrapper.moe).__name__, "variant": kt_kernel.__cpu_variant__,
               "version": kt_kernel.__version__}


# kt's class per --kt-method where kt_kernel's Python selection is absent (KT_RAWINT4_BACKEND names the
# RAWINT4 one as kt's _select_rawint4_backend does)
_EXT_CLASSES = {"AMXINT4": "AMXInt4_MOE", "AMXINT8": "AMXInt8_MOE"}
_EXT_RAWINT4 = {"amx": "AMXInt4_KGroup_MOE", "amx_blocked": "AMXInt4_KGroupBlocked_MOE",
                "avxvnni": "AVXVNNI256RawInt4_MOE", "avx2": "AVX2RawInt4_MOE", "": "AMXInt4_KGroup_MOE"}


def _forward_ext(job, x, ids, weights):
    """kt-kernel's extension driven as kt's wrappers drive it (kt_kernel/utils/amx.py: MOEConfig with per-expert
    pointers, load_weights_task, forward_task on a CPUInfer), the weights read with safetensors."""
    import torch
    from safetensors.torch import load_file

    try:
        import kt_kernel_ext as ext
    except ImportError:  # the wheel: its package registers the extension of the CPU's variant under this name
        import kt_kernel  # noqa: F401
        import kt_kernel_ext as ext

    E, H, I, T = job["num_experts"], job["hidden_size"], job["moe_intermediate_size"], job["threadpool_count"]
    k, method = ids.shape[1], job["method"]
    pool_config = ext.WorkerPoolConfig()
    pool_config.subpool_count = T
    pool_config.subpool_numa_map = list(range(T))
    pool_config.subpool_thread_count = [job["threads"] // T + (i < job["threads"] % T) for i in range(T)]
    cpu_infer = ext.CPUInfer(pool_config)
    mask = torch.zeros(E, dtype=torch.bool)
    config = ext.moe.MOEConfig(E, k, H, I, mask.data_ptr())
    config.layer_idx, config.pool, config.max_len = job["layer"], cpu_infer.backend_, _max_len(x.shape[0])
    tensors = {}
    for f in sorted(Path(job["weights"]).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    L = job["layer"]
    if method == "RAWINT4":
        def ct(e, p, part):
            return tensors[f"model.layers.{L}.mlp.experts.{e}.{p}_proj.{part}"]

        w = {p: [ct(e, p, "weight_packed").contiguous() for e in range(E)] for p in ("gate", "up", "down")}
        sc = {p: [ct(e, p, "weight_scale").contiguous() for e in range(E)] for p in ("gate", "up", "down")}
        config.quant_config.bits, config.quant_config.zero_point = 4, False
        config.quant_config.group_size = H // sc["gate"][0].shape[1]
        name = _EXT_RAWINT4[os.environ.get("KT_RAWINT4_BACKEND", "").strip().lower()]
        ptr = lambda tensors_: [[t.data_ptr() for t in tensors_]]  # noqa: E731
    else:
        def blk(p, e, t, part):
            return tensors[f"blk.{L}.ffn_{p}_exps.{e}.numa.{t}.{part}"]

        w = {p: [[blk(p, e, t, "weight") for e in range(E)] for t in range(T)] for p in ("gate", "up", "down")}
        sc = {p: [[blk(p, e, t, "scale") for e in range(E)] for t in range(T)] for p in ("gate", "up", "down")}
        config.load = True
        name = _EXT_CLASSES[method]
        ptr = lambda numas: [[t.data_ptr() for t in numa] for numa in numas]  # noqa: E731
    config.gate_projs, config.up_projs, config.down_projs = ptr(w["gate"]), ptr(w["up"]), ptr(w["down"])
    config.gate_scales, config.up_scales, config.down_scales = ptr(sc["gate"]), ptr(sc["up"]), ptr(sc["down"])
    moe = getattr(ext.moe, name)(config)
    identity = torch.arange(E, dtype=torch.int64)
    cpu_infer.submit(moe.load_weights_task(identity.data_ptr()))
    cpu_infer.sync()
    T_tokens = x.shape[0]
    bsz = torch.tensor([T_tokens], dtype=torch.int32)
    ids64 = ids.to(torch.int64).contiguous()
    out = torch.zeros(T_tokens, H, dtype=torch.bfloat16)
    cpu_infer.submit(moe.forward_task(bsz.data_ptr(), k, ids64.data_ptr(), weights.contiguous().data_ptr(),
                                      x.contiguous().data_ptr(), out.data_ptr(), False))
    cpu_infer.sync()
    package = sys.modules.get("kt_kernel")
    return out, {"api": "kt_kernel_ext", "backend": name,
                 "variant": getattr(package, "__cpu_variant__", getattr(ext, "__cpu_variant__", "")),
                 "version": getattr(package, "__version__", "built from source")}


if __name__ == "__main__" and sys.argv[1:2] == ["kt-run"]:
    kt_run(sys.argv[2])
