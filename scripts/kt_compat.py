#!/usr/bin/env python3
"""Run the real kt-kernel on packed outputs and measure what it computes.

    python scripts/kt_compat.py OUT [OUT ...] --kt-path DIR [--source CKPT] [--tokens 4] [--json FILE]
    python scripts/kt_compat.py --synthetic NEWDIR --kt-path DIR     # the standard synthetic outputs

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
    if job.get("online"):  # kt's own conversion: the decoded source quantized by kt on load (its converter's path)
        import numpy as np

        src = np.load(job["online"])
        flat = {p: torch.from_numpy(src[p].view(np.int16)).view(torch.bfloat16).contiguous() for p in ("gate", "up", "down")}
        config.save, config.load, config.path = True, False, job["online_out"]
        config.gate_proj, config.up_proj, config.down_proj = (flat[p].data_ptr() for p in ("gate", "up", "down"))
        moe = getattr(ext.moe, _EXT_CLASSES[method])(config)
        name = _EXT_CLASSES[method]
    elif method == "RAWINT4":
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
    if not job.get("online"):
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


# -- the project side: inputs, the child runs, the comparisons ----------------------------------------------

@dataclass(frozen=True)
class Backend:
    """One way to run kt: environment variables kt reads (KT_RAWINT4_BACKEND, KT_KERNEL_CPU_VARIANT), the
    API (KTMoEWrapper or the bare extension), and whether the tensors kt's RAWINT4 loader returns are held
    for the whole run (kt's AVX2 backend reads them after its wrapper has let them go)."""

    label: str
    env: tuple[tuple[str, str], ...] = ()
    api: str = "wrapper"
    keep_loaded_tensors: bool = False

    @property
    def needs_package(self) -> bool:
        """Means something only with the kt_kernel package (its wrapper and wheel variants), not with a bare
        extension built from kt's repository (driven directly, its tensors held anyway)."""
        return self.keep_loaded_tensors or any(k == "KT_KERNEL_CPU_VARIANT" for k, _ in self.env)


RAWINT4_BACKENDS = (
    Backend("kt's choice"),
    Backend("AMXInt4_KGroup", (("KT_RAWINT4_BACKEND", "amx"),)),
    Backend("AMXInt4_KGroupBlocked", (("KT_RAWINT4_BACKEND", "amx_blocked"),)),
    Backend("AVXVNNI256RawInt4", (("KT_RAWINT4_BACKEND", "avxvnni"),)),
    Backend("AVX2RawInt4", (("KT_RAWINT4_BACKEND", "avx2"),)),
    Backend("AVX2RawInt4, loaded tensors held", (("KT_RAWINT4_BACKEND", "avx2"),), keep_loaded_tensors=True),
    Backend("avx2 wheel variant: kt's choice", (("KT_KERNEL_CPU_VARIANT", "avx2"),)),
    # what kt's choice is on an AVX2 CPU without AVX-VNNI (Zen 2/3, Intel before Alder Lake)
    Backend("avx2 wheel variant: AVX2RawInt4", (("KT_KERNEL_CPU_VARIANT", "avx2"), ("KT_RAWINT4_BACKEND", "avx2"))),
)
AMX_BACKENDS = (Backend("kt's choice"),)


@dataclass
class KtResult:
    output: str
    method: str
    backend: str  # Backend.label
    status: str  # ok | nan | crashed (signal N) | refused: <kt's message> | timeout
    ran: dict = field(default_factory=dict)  # what the child ran: api, backend class, variant, version
    rel_error_vs_reference: float | None = None  # ||y_kt - y_ref|| / ||y_ref||, y_ref: float64 of the output's codes
    rel_error_vs_engine: float | None = None  # ||y_kt - y_ours|| / ||y_ours||, y_ours: kt_runtime.CPUMoE
    engine_vs_reference: float | None = None
    same_as_kt_conversion: bool | None = None  # kt's forward on kt's own conversion of the source, bit for bit
    same_bytes_as_kt_conversion: bool | None = None  # every tensor equal to the .kt files kt's conversion wrote


def has_package(kt_entry: str) -> bool:
    """The kt_kernel package (a wheel or an install), not only a built kt_kernel_ext."""
    import importlib.util

    return (Path(kt_entry) / "kt_kernel" / "__init__.py").is_file() if kt_entry else \
        importlib.util.find_spec("kt_kernel") is not None


def find_kt(kt_path: str | None = None) -> str | None:
    """The PYTHONPATH entry under which a child finds kt-kernel ('' where this interpreter has it), else None."""
    import importlib.util

    if kt_path:
        folder = Path(kt_path)
        if (folder / "kt_kernel" / "__init__.py").is_file() or any(folder.glob("kt_kernel_ext*.so")):
            return str(folder)
        return None
    return "" if importlib.util.find_spec("kt_kernel") is not None else None


def make_inputs(weights, tokens: int, seed: int):
    """x [T, H] bf16 with both signs, distinct top-k experts per token, positive weights."""
    import torch

    g = torch.Generator().manual_seed(seed)
    k = weights.num_experts_per_tok
    x = torch.randn(tokens, weights.hidden_size, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(weights.num_experts, generator=g)[:k] for _ in range(tokens)])
    return x, ids, torch.rand(tokens, k, generator=g)


def decoded_layer(source: str, method_name: str, layer: int) -> dict:
    """The bf16 matrices the packers quantize, per projection [E, N, K] as uint16 bits: what kt's own converter
    quantizes (its load_weights_from_tensors)."""
    import numpy as np
    import torch

    from kt_convert.convert.layer_io import LayerReader
    from kt_convert.convert.plan import build_plan, read_source_matrix
    from kt_convert.convert.source import open_checkpoint
    from kt_convert.kt_runtime.format.methods import get_method
    from kt_convert.quant.decoders import decode_source

    ckpt = open_checkpoint(source)
    try:
        plan = build_plan(ckpt, get_method(method_name), 1, "merged", layers=[layer])
        lp = plan.layers[0]
        out = {p: [None] * plan.num_experts for p in ("gate", "up", "down")}
        reader = LayerReader(ckpt, plan, [lp], plan.num_experts, threads=1)
        try:
            for experts, data in reader.batches(lp):
                for e in experts:
                    for p in out:
                        out[p][e] = decode_source(read_source_matrix(lp.experts[e][p], data))
                data.release()
        finally:
            reader.close()
    finally:
        ckpt.close()
    return {p: torch.stack(mats).view(torch.int16).numpy().view(np.uint16) for p, mats in out.items()}


def run_kt(job: dict, kt_entry: str, work: Path, timeout: float = CHILD_TIMEOUT_S):
    """One child run: (y float32 or None, what ran, status)."""
    import numpy as np

    job_path = work / f"job-{len(list(work.glob('job-*.json')))}.json"
    job = {**job, "out": str(job_path.with_suffix(".npy"))}
    job_path.write_text(json.dumps(job))
    env = dict(os.environ)
    if kt_entry:
        env["PYTHONPATH"] = os.pathsep.join(x for x in (kt_entry, env.get("PYTHONPATH", "")) if x)
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "kt-run", str(job_path)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, {}, "timeout"
    if proc.returncode < 0:
        return None, {}, f"crashed (signal {signal.Signals(-proc.returncode).name})"
    if proc.returncode:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return None, {}, "refused: " + (tail[-1][:300] if tail else f"exit {proc.returncode}")
    y = np.load(job["out"])
    ran = json.loads(Path(job["out"] + ".json").read_text())
    return y, ran, "ok" if np.isfinite(y).all() else "nan"


def _rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_output(output: str | Path, kt_entry: str, backends=None, *, tokens: int = 4, seed: int = 0,
                 threads: int = 2, threadpool_count: int | None = None, source: str | None = None,
                 timeout: float = CHILD_TIMEOUT_S) -> list[KtResult]:
    """kt on one output, per backend, against the float64 reference of the output's codes and the engine."""
    import numpy as np
    import torch

    from kt_convert import kt_runtime
    from kt_convert.kt_runtime.reference import moe_reference

    weights = kt_runtime.load_experts(output)
    method = weights.spec.quant_method
    layer = weights.layers[0]
    x, ids, tw = make_inputs(weights, tokens, seed)
    ref = moe_reference(weights, layer, x, ids, tw).double().numpy()
    ours = kt_runtime.CPUMoE(weights, layer).forward(x.float(), ids, tw).double().numpy()
    if backends is None:
        backends = RAWINT4_BACKENDS if method.kt_method == "RAWINT4" else AMX_BACKENDS
    package = has_package(kt_entry)
    backends = [b for b in backends if package or not b.needs_package]
    results = []
    with tempfile.TemporaryDirectory(prefix="kt-compat-") as tmp:
        work = Path(tmp)
        np.savez(work / "inputs.npz", x_bits=x.view(torch.int16).numpy().view(np.uint16), ids=ids.numpy(),
                 weights=tw.numpy())
        base = {"weights": str(output), "method": method.kt_method, "layer": layer,
                "num_experts": weights.num_experts, "hidden_size": weights.hidden_size,
                "moe_intermediate_size": weights.moe_intermediate_size, "threads": threads,
                "threadpool_count": threadpool_count or weights.threadpool_count, "inputs": str(work / "inputs.npz")}
        online = None
        if source is not None and method.byte_order.numa_split:  # kt's own conversion of the same source
            src = decoded_layer(source, method.name, layer)
            np.savez(work / "source.npz", **src)
            (work / "kt-converted").mkdir()
            online, _, status = run_kt({**base, "online": str(work / "source.npz"),
                                        "online_out": str(work / "kt-converted")}, kt_entry, work, timeout)
            same_bytes = _same_bytes_as_kt_files(weights, layer, work / "kt-converted") if online is not None else None
        for b in backends:
            job = {**base, "env": dict(b.env), "api": b.api, "keep_loaded_tensors": b.keep_loaded_tensors}
            y, ran, status = run_kt(job, kt_entry, work, timeout)
            r = KtResult(str(output), method.name, b.label, status, ran, engine_vs_reference=_rel(ours, ref))
            if y is not None:
                r.rel_error_vs_reference, r.rel_error_vs_engine = _rel(y, ref), _rel(y, ours)
                if online is not None:
                    r.same_as_kt_conversion = bool(np.array_equal(y, online))
                    r.same_bytes_as_kt_conversion = same_bytes
            results.append(r)
    return results


def _same_bytes_as_kt_files(weights, layer: int, kt_root: Path) -> bool:
    """Every packed tensor of the layer equal to the .kt file kt's own conversion wrote (kt's folder layout)."""
    from kt_convert.kt_runtime.format.spec import kt_file_paths

    spec = weights.spec
    for expert in range(spec.num_experts):
        for proj in ("gate", "up", "down"):
            for t in range(spec.threadpool_count):
                w, sc = weights.expert_tensors(layer, expert, proj, t)
                quant, scale = kt_file_paths(kt_root, layer, t, spec.quant_method.name, proj, expert, w.nbytes, sc.size)
                if quant.read_bytes() != bytes(w) or scale.read_bytes() != bytes(sc):
                    return False
    return True


# the standard set (--synthetic, tests/test_kt_compat.py): name -> (source, convert options)
SYNTHETIC_OUTPUTS = {
    "raw32": ("bf16", {"quant_method": "rawint4"}),
    "raw128": ("bf16", {"quant_method": "rawint4", "group_size": 128}),
    "k2raw32": ("k2", {"quant_method": "rawint4"}),  # carried: the source's codes, -8 included
    "k2raw64": ("k2", {"quant_method": "rawint4", "group_size": 64}),  # quantized again, -7..7
    "int4_t1": ("bf16", {"quant_method": "int4", "threadpool_count": 1}),
    "int4_t2": ("bf16", {"quant_method": "int4", "threadpool_count": 2}),
    "int8_t2": ("bf16", {"quant_method": "int8", "threadpool_count": 2}),
}


def make_synthetic_outputs(root: Path) -> dict[str, tuple[Path, Path]]:
    """A BF16 model and a Kimi-K2-style INT4 one (H 512, I 256, 8 experts) under root (a new folder), and
    SYNTHETIC_OUTPUTS converted from them: name -> (output, source)."""
    from kt_convert.convert.pipeline import ConvertOptions, convert
    from kt_convert.synthetic.families import make_family_checkpoint

    root.mkdir(parents=True)
    sources = {"bf16": make_family_checkpoint(root / "bf16", "qwen3_moe_bf16", hidden_size=512, intermediate_size=256,
                                              num_experts=8, num_layers=1).path,
               "k2": make_family_checkpoint(root / "k2", "kimi_k2_int4", hidden_size=512, intermediate_size=256,
                                            num_experts=8, num_layers=2).path}
    made = {}
    for name, (source, options) in SYNTHETIC_OUTPUTS.items():
        convert(ConvertOptions(input_path=str(sources[source]), output=root / name, progress=False, **options))
        made[name] = (root / name, sources[source])
    return made


def _table(results: list[KtResult]) -> str:
    head = f"{'output':<28} {'method':<13} {'backend':<34} {'kt class / variant / version':<52} {'vs f64':>9} {'vs ours':>9}  status"
    lines = [head, "-" * len(head)]
    for r in results:
        ran = " / ".join(str(r.ran.get(k, "")) for k in ("backend", "variant", "version")) if r.ran else ""
        pct = lambda v: f"{100 * v:8.3f}%" if v is not None and v == v else f"{'nan' if v is not None else '-':>9}"  # noqa: E731
        same = "" if r.same_as_kt_conversion is None else (
            f", forward {'=' if r.same_as_kt_conversion else '!='} and bytes "
            f"{'=' if r.same_bytes_as_kt_conversion else '!='} kt's conversion")
        lines.append(f"{Path(r.output).name[:28]:<28} {r.method:<13} {r.backend[:34]:<34} {ran[:52]:<52} "
                     f"{pct(r.rel_error_vs_reference)} {pct(r.rel_error_vs_engine)}  {r.status}{same}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outputs", nargs="*", help="packed outputs (convert-cpu-weights -o)")
    ap.add_argument("--synthetic", metavar="DIR", help="make synthetic checkpoints and the standard outputs in DIR "
                                                       "(a new folder) and check those, each with its source")
    ap.add_argument("--kt-path", default=os.environ.get("KT_KERNEL_PATH"),
                    help="folder holding kt_kernel (or a built kt_kernel_ext); default $KT_KERNEL_PATH, else installed")
    ap.add_argument("--source", help="the checkpoint the outputs were converted from (AMXINT4/AMXINT8: also run "
                                     "kt's own conversion of it and compare)")
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--threadpool-count", type=int, default=None, help="kt's --kt-threadpool-count (default: the output's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    entry = find_kt(args.kt_path)
    if entry is None:
        print(f"kt-kernel not found ({'--kt-path ' + args.kt_path if args.kt_path else 'not installed'})", file=sys.stderr)
        return 2
    jobs = [(out, args.source) for out in args.outputs]
    if args.synthetic:
        if Path(args.synthetic).exists():
            print(f"--synthetic {args.synthetic}: exists; name a new folder", file=sys.stderr)
            return 2
        jobs += [(str(out), str(src)) for out, src in make_synthetic_outputs(Path(args.synthetic)).values()]
    if not jobs:
        print("nothing to check: name outputs or --synthetic DIR", file=sys.stderr)
        return 2
    results = []
    for out, source in jobs:
        results += check_output(out, entry, tokens=args.tokens, seed=args.seed, threads=args.threads,
                                threadpool_count=args.threadpool_count, source=source)
    print(_table(results))
    if args.json:
        from kt_convert.kt_runtime.format.fsio import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps([asdict(r) for r in results], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["kt-run"]:
        kt_run(sys.argv[2])
    else:
        sys.exit(main())
