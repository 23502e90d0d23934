"""The README's commands and Python examples are what CI runs and what works, and every command printed in
README.md and docs/ runs as printed (on synthetic data) or is skipped here for a stated reason."""
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from helpers import ROOT

README = (ROOT / "README.md").read_text()


def blocks(lang: str, after: str) -> list[str]:
    section = README[README.index(after):]
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def test_ci_runs_the_readmes_two_commands():
    setup = blocks("bash", "## Set-up and the two commands")[0]
    commands = [line.split("#")[0].strip() for line in setup.splitlines() if line.strip()]
    assert commands == ['pip install -e ".[test]" && python scripts/demo.py', "python -m pytest -q"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in commands:
        assert any(line.endswith(command) for line in ci if not line.startswith("#")), command
    # CI installs the CPU build of torch before the README's commands, as the CPU-only line does
    assert ci.index('python -m pip install -q "torch==2.13.0"') < next(
        i for i, line in enumerate(ci) if line.endswith(commands[0]))


def test_cpu_only_line_installs_the_cpu_build_first():
    cpu = [line for line in blocks("bash", "## Set-up and the two commands")[1].splitlines() if line.strip()]
    assert cpu[0].startswith("pip install torch --index-url https://download.pytorch.org/whl/cpu && "), cpu
    assert cpu[0].split(" && ", 1)[1].split("#")[0].strip() == 'pip install -e ".[test]" && python scripts/demo.py'


def test_python_example_runs_on_a_converted_synthetic_model(tmp_path):
    from kt_convert.convert.pipeline import ConvertOptions, convert
    from kt_convert.kt_runtime.reference import moe_reference
    from kt_convert.synthetic.v4_flash import make_v4_flash_checkpoint

    ckpt = make_v4_flash_checkpoint(tmp_path / "v4", "v4-flash-tiny", num_experts=8)
    out = tmp_path / "out"
    convert(ConvertOptions(input_path=str(ckpt.path), output=out, progress=False))
    cpu_example, hybrid_example = blocks("python", "## Using the packed experts from Python")[:2]
    assert '"/models/DeepSeek-V4-Flash-CPU-NUMA2-AMXINT4"' in cpu_example
    scope = {}
    exec(cpu_example.replace('"/models/DeepSeek-V4-Flash-CPU-NUMA2-AMXINT4"', repr(str(out))), scope)
    w, x, ids, tw, y = (scope[n] for n in ("w", "x", "topk_ids", "topk_weights", "y"))
    assert x.dtype == torch.bfloat16 and x.shape == (4, 384)
    assert ids.dtype == torch.int64 and ids.shape == (4, 2) and all(len(set(r)) == 2 for r in ids.tolist())
    assert tw.dtype == torch.float32 and torch.allclose(tw.sum(-1), torch.ones(4))
    assert scope["gate"].shape == (512, 384) and scope["gate"].dtype == torch.float32
    assert y.shape == (4, 384) and y.dtype == torch.bfloat16
    def error(ids):
        ref = moe_reference(w, scope["layer"], x.float(), ids, tw)
        return ((y.float() - ref).norm() / ref.norm()).item()

    assert error(ids) < 0.1  # int8 activations (as kt's), bf16 output
    assert error((ids + 1) % w.num_experts) > 0.5  # other experts: far off
    compile(hybrid_example, "README hybrid example", "exec")
    assert "num_gpu_experts=32" in hybrid_example
    if torch.cuda.is_available():  # GPU hosts: the same call with as many GPU experts as the tiny model has
        y_cpu = y
        exec(hybrid_example.replace("num_gpu_experts=32", "num_gpu_experts=3"), scope)
        assert scope["y"].shape == (4, 384) and scope["y"].dtype == torch.bfloat16
        y_gpu = scope["y"].float().cpu()
        ref = moe_reference(w, scope["layer"], x.float(), ids, tw)
        assert ((y_gpu - ref).norm() / ref.norm()).item() < 0.1
        assert ((y_gpu - y_cpu.float()).norm() / ref.norm()).item() < 0.1


def test_public_names_are_listed_and_documented():
    from kt_convert import kt_runtime

    import subprocess
    import sys

    fresh = subprocess.run([sys.executable, "-c",
                            "from kt_convert import kt_runtime; print(' '.join(dir(kt_runtime)))"],
                           capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    public = [n for n in fresh if not n.startswith("_")]
    assert public == sorted(kt_runtime.__all__)  # nothing imported yet: exactly the public names
    assert set(kt_runtime.__all__) <= set(dir(kt_runtime))
    assert {"load_experts", "CPUMoE", "HybridMoE", "PackedExperts", "inject"} <= set(public)
    doc = kt_runtime.CPUMoE.forward.__doc__
    assert "[T, H]" in doc and "int64" in doc and "float32" in doc and "bfloat16" in doc


def test_demo_explains_a_generation_that_leaves_the_original_at_once():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.same_prefix(16, 16) == "all 16 tokens as the original model's"
    line = demo.same_prefix(0, 16, 0.0213, 0.31, "int4")
    assert line.startswith("token 1 of 16 differs: there the original model preferred its token by only 0.021 "
                           "logits, and int4 moves the logits by up to 0.310 (a tiny random model's logits are "
                           "nearly flat)"), line
    assert "teacher-forced checks below, which compare every position on the same tokens, are the measure" in line
    assert "first 0" not in line
    cpu = demo.placement_line([0, 1, 2], 8, "cpu", "AMXINT4")
    assert cpu == ("no GPU here, so experts [0, 1, 2] of 8 per layer run where a GPU would run them through torch "
                   "(bf16) on the CPU; the other 5 on the CPU engine (kt_kernels, AMXINT4)")
    assert "on the GPU (bf16, torch)" in demo.placement_line([0], 8, "cuda", "AMXINT8")


# --- every command printed in README.md and docs/: run as printed on synthetic data, or skipped for a reason ---

DOC_FILES = ("README.md", "docs/ARCHITECTURE.md", "docs/BATCH.md", "docs/BENCHMARKS.md", "docs/FORMAT.md")


def _logical_lines(body: str) -> list[str]:
    """A bash block's commands: comments dropped, continuation lines joined, spaces collapsed."""
    lines, current = [], ""
    for raw in body.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            lines.append(" ".join(current.split()))
        current = ""
    return lines


def documented_commands() -> list[tuple[str, str]]:
    """(file, command) of every ```bash block line (a block starting with #! is one script: its commands joined
    with '; ') and every inline `python scripts/...`, `python -m ...` or `convert-cpu-weights ...` of the prose."""
    found = []
    for name in DOC_FILES:
        text = (ROOT / name).read_text()
        for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
            if lang != "bash":
                assert not re.match(r"\s*(convert-cpu-weights|python3? )", body), f"{name}: tag this block bash"
                continue
            lines = _logical_lines(body)
            found += [(name, "; ".join(lines))] if body.startswith("#!") else [(name, line) for line in lines]
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for code in re.findall(r"`([^`]+)`", prose):
            code = " ".join(code.split())
            if re.match(r"(python3? (scripts/|-m )|convert-cpu-weights )", code):
                found.append((name, code))
    return found


BENCHMARK = "a benchmark: minutes of timing on synthetic data of hundreds of MB to GBs"
GPU = "needs a CUDA GPU (the accelerator host runs it)"
# Commands whose arguments are checked (each script's own parser accepts them), not run, and why.
PARSE_ONLY = {
    "python scripts/make_synthetic_checkpoint.py /tmp/v4l --preset v4-flash-layer --experts 32 --layers 2":
        "writes 0.8 GB",
    "python scripts/output_digests.py out.json [--compare old.json]":
        "155 conversions, a minute or more (tests/test_scripts.py checks what it removes)",
    "python scripts/output_digests.py --one": "tests/test_reproducible.py runs it from two folders",
    "python scripts/bench_convert.py --json bench.json": BENCHMARK,
    "python3 scripts/bench_convert.py --device cuda,cpu --experts 256 --layers 3 --cores 2,4 --auto": GPU,
    "python3 scripts/bench_convert.py --device cuda,cpu --experts 256 --layers 3 --cores 2,4 --auto --drop-caches "
    "--repeat 1 --workdir /tmp/ktb --json bench.json": GPU,
    "python scripts/bench_moe.py": "a minute of timing (tests/test_scripts.py checks its --isa handling)",
    "python scripts/bench_moe.py --isa avx512,avx2,portable --skip-prefill": BENCHMARK,
    "python scripts/bench_hybrid.py": BENCHMARK + " (tests/test_scripts.py runs it small)",
    "python scripts/bench_prefill.py": BENCHMARK + " (tests/test_scripts.py runs it small)",
    "python scripts/bench_prefill.py --v4-flash": GPU,
    "python3 scripts/bench_prefill.py --v4-flash --json bench_prefill.json": GPU,
    "python3 scripts/bench_prefill.py --v4-flash --method int8 --tokens 4096 --layers 0": GPU,
    "python3 scripts/bench_prefill.py --v4-flash --tokens 512,4096 --layers 0 --json bench_prefill_staging.json": GPU,
    "python scripts/bench_download.py --bandwidth-mb 100": BENCHMARK,
    "python scripts/bench_moe.py --methods int4,rawint4-g128,rawint4-g32 --skip-prefill --skip-kernel": BENCHMARK,
    "python scripts/bench_moe.py --methods int4,rawint4-g128,rawint4-g32 --skip-decode --skip-kernel --skip-torch":
        BENCHMARK,
    "python scripts/bench_moe.py --threads 2 --skip-decode --skip-torch --skip-kernel --methods "
    "int4,int8,rawint4-g32,rawint4-g128 --prefill-tokens 512,4096 --prefill-reps 3": BENCHMARK,
    "python scripts/bench_prefill_scaling.py --threads 1,2": BENCHMARK + " (tests/test_scripts.py runs it small)",
    "python scripts/bench_verify.py": BENCHMARK + " (tests/test_scripts.py runs it small)",
    "python scripts/bench_convert.py --skip-cold --repeat 3 --workdir W": BENCHMARK,
    "python scripts/bench_convert.py --isa avx512,avx2,portable --skip-cold": BENCHMARK,
    "python scripts/bench_convert.py --isa avx512,avx2,portable --repeat 3 --skip-cold --workdir W --json bench.json":
        BENCHMARK,
    "python scripts/bench_pack.py": BENCHMARK,
    "python scripts/bench_pack.py --json bench_pack.json": BENCHMARK,
    "python scripts/bench_pack.py --sources nvfp4,nvfp4-ct,mxfp8,mxfp4 --reps 5 --json bench_pack.json": BENCHMARK,
    "python3 scripts/bench_convert.py --device cuda --experts 256 --layers 3 --workdir /tmp/ktb --json bench.json": GPU,
    "python scripts/bench_convert.py --experts 96 --layers 2 --repeat 3 --workdir /tmp/gpuconv_bench": BENCHMARK,
    "python3 scripts/bench_convert.py --device cuda,cpu --experts 256 --layers 3 --workdir /tmp/ktb --drop-caches "
    "--repeat 2 --json bench.json": GPU,
    "python scripts/bench_download.py --layers 8 --experts 32 --shards 8 --bandwidth-mb 100": BENCHMARK,
    "python3 scripts/bench_moe.py --full --reps 5 --footprint-gb 2 --json bench_moe.json": BENCHMARK,
    "python3 scripts/bench_moe.py --full --skip-decode --prefill-reps 3 --min-time 0.3 --json bench_moe.json": BENCHMARK,
    "python scripts/bench_moe.py --full --skip-prefill --footprint-gb 1 --reps 3": BENCHMARK,
    "python scripts/bench_moe.py --full --skip-decode --skip-prefill --skip-torch --isa avx512,avxvnni,avx2,portable "
    "--footprint-gb 1.5 --reps 7 --kernel-time 0.25": BENCHMARK,
    "python scripts/bench_moe.py --full --skip-torch --skip-prefill --isa avx512,avxvnni,avx2,portable "
    "--footprint-gb 1.5 --reps 5": BENCHMARK,
    "python scripts/bench_moe.py --full --skip-decode --skip-kernel --skip-torch --isa avx512,avxvnni,avx2": BENCHMARK,
    "python scripts/bench_moe.py --full --threads 2 --skip-decode --skip-torch --prefill-reps 5": BENCHMARK,
    "python3 scripts/bench_moe.py --full --skip-decode --threads 16 --prefill-reps 5 --int8-modes --json "
    "prefill16.json": BENCHMARK,
    "python3 scripts/bench_moe.py --full --skip-decode --skip-torch --skip-kernel --methods int4,int8 --prefill-tokens "
    "512,4096 --prefill-reps 3 --threads 1": BENCHMARK,
    "python scripts/bench_moe.py --full --methods int4,rawint4-g128,rawint4-g64,rawint4-g32 --skip-prefill "
    "--skip-kernel --skip-torch --hidden 2048 --inter 768 --experts 16 --topk 8 --footprint-gb 0.5 --reps 5 "
    "--min-time 0.3": BENCHMARK,
    "python3 scripts/bench_moe.py --full --methods int4,rawint4-g128,rawint4-g64,rawint4-g32 --skip-prefill "
    "--skip-kernel --skip-torch --hidden 7168 --inter 2048 --experts 64 --topk 8 --footprint-gb 2 --reps 3": BENCHMARK,
    "python scripts/bench_verify.py --reps 5 [--method rawint4-g128]": BENCHMARK,
    "python3 scripts/bench_hybrid.py --json bench_hybrid.json": BENCHMARK,
    "python scripts/bench_eval.py --json eval.json": BENCHMARK,
    "python3 scripts/bench_eval.py --device cpu --json eval_cpu.json": BENCHMARK,
    "python3 scripts/bench_eval.py --device cuda --gpu-experts 4 --json eval_cuda.json": GPU,
    "python scripts/train_tiny_moe.py /tmp/tiny-moe": "trains for about 25 minutes on one core",
    "python3 scripts/bench_hybrid.py --layers 8 --iters 100 --json bench_hybrid_layers.json": BENCHMARK,
    "python scripts/bench_rawint4.py --groups 1000": BENCHMARK,
    "python scripts/bench_rawint4.py --speed-only": BENCHMARK,
    "python scripts/bench_rawint4.py --speed-only --isa portable,avx2,avx512 [--extension OTHER/kt_kernels...so]":
        BENCHMARK,
    "python scripts/kt_compat.py OUT --kt-path DIR":
        "needs kt-kernel installed in DIR (tests/test_kt_compat.py runs it where kt is found, marker kt)",
}
EVAL_BLOCK = "README's eval block: tests/test_eval.py runs it in a shell as printed"
# Commands not run here at all, and why.
SKIPPED = {
    'pip install -e ".[test]" && python scripts/demo.py':
        "installs the package; .ci/run runs it verbatim (test_ci_runs_the_readmes_two_commands)",
    'pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install -e ".[test]" && '
    "python scripts/demo.py": "installs packages from the network",
    "python -m pytest -q": "the test suite, which this test is part of",
    "python -m kt_convert": "the program's other name, not a command line (the tests run it so)",
    "python scripts/demo.py": "CI runs it (.ci/run)",
    "python -m pytest -q -s tests/test_hybrid_stream.py -k accuracy": "a test of this suite",
    "jid=$(sbatch --parsable convert.sbatch)": "submits to a SLURM cluster (the script's commands run below)",
    "sbatch --dependency=afterany:$jid --job-name=kt-finalize --cpus-per-task=2 --mem=4G --wrap 'source "
    "/shared/kt-convert/.venv/bin/activate && convert-cpu-weights finalize /shared/out/ds3-int4'":
        "submits to a SLURM cluster (its --wrap command runs below)",
    "kubectl apply -f convert-job.yaml": "needs a Kubernetes cluster",
    "kubectl wait --for=condition=complete --timeout=6h job/kt-convert || kubectl wait --for=condition=failed "
    "--timeout=1s job/kt-convert": "needs a Kubernetes cluster",
    "kubectl apply -f finalize-job.yaml": "needs a Kubernetes cluster",
    "convert-cpu-weights -i tests/data/tiny-qwen3-moe -o /tmp/tiny-int4 --threadpool-count 1": EVAL_BLOCK,
    "convert-cpu-weights eval /tmp/tiny-int4 --model tests/data/tiny-qwen3-moe --text \"$(python -c 'import difflib; "
    "print(difflib.__file__)')\" --ctx 256 --max-tokens 4096 --json eval.json": EVAL_BLOCK,
    "convert-cpu-weights eval": "the command's name in prose",
    "convert-cpu-weights eval OUT --model SRC --text difflib.py --ctx 256 --max-tokens 8192 --device cpu":
        "the form of the commands bench_eval.py runs (tests/test_eval.py runs eval on the trained model)",
    "kubectl wait --for=condition=complete --timeout=1h job/kt-finalize": "needs a Kubernetes cluster",
}
V4_CONVERT = ("convert-cpu-weights -i /models/DeepSeek-V4-Flash -o /models/DeepSeek-V4-Flash-CPU-NUMA2-AMXINT4 "
              "--quant-method int4 --threadpool-count 2")
VERIFY = "convert-cpu-weights verify OUT"
VERIFY_SOURCE = ("convert-cpu-weights verify OUT --source /models/DeepSeek-V4-Flash --max-rel-error 0.2 --json "
                 "report.json --html report.html")
HF_DOWNLOAD = "hf download deepseek-ai/DeepSeek-V4-Flash"
HUB_CONVERT = "convert-cpu-weights -i deepseek-ai/DeepSeek-V4-Flash -o /models/V4-Flash-AMXINT4"
HUB_DOWNLOAD = HUB_CONVERT + " --download --max-source-disk 40"
SYNTHETIC = ("python scripts/make_synthetic_checkpoint.py --list",
             "python scripts/make_synthetic_checkpoint.py /tmp/v4 --preset v4-flash-tiny",
             "python scripts/make_synthetic_checkpoint.py /tmp/k2 --family deepseek_v3 --variant kimi_k2_int4")
FINALIZE = "convert-cpu-weights finalize OUT"
FAMILIES = "convert-cpu-weights families"
HELP = "convert-cpu-weights --help"
TEMPLATE = ("convert-cpu-weights -i /models/DeepSeek-V3 --output-template '/out/ds3-{method}-T{threadpool_count}' "
            "--quant-method int4,int8 --threadpool-count 1,2,4")
SHARD = "convert-cpu-weights -i SRC -o OUT --shard 2/8"
SBATCH_SCRIPT = ('set -euo pipefail; source /shared/kt-convert/.venv/bin/activate; convert-cpu-weights -i '
                 '/shared/models/DeepSeek-V3 -o /shared/out/ds3-int4 --quant-method int4 --threadpool-count 2 --shard '
                 '"$SLURM_ARRAY_TASK_ID/8" --cpuinfer-threads "$SLURM_CPUS_PER_TASK" --no-progress')
RUN = {V4_CONVERT, VERIFY, VERIFY_SOURCE, HF_DOWNLOAD, HUB_CONVERT, HUB_DOWNLOAD, *SYNTHETIC, FINALIZE, FAMILIES, HELP,
       TEMPLATE, SHARD, SBATCH_SCRIPT}


def test_every_documented_command_is_run_checked_or_skipped_for_a_reason():
    documented = {command for _, command in documented_commands()}
    assert len(documented) > 40
    tables = (RUN, set(PARSE_ONLY), set(SKIPPED))
    assert not (RUN & set(PARSE_ONLY)) and not (RUN & set(SKIPPED)) and not (set(PARSE_ONLY) & set(SKIPPED))
    unknown = sorted(documented - set().union(*tables))
    assert not unknown, f"commands in the docs that this test neither runs nor skips (add them): {unknown}"
    assert not set().union(*tables) - documented, "commands listed here that the docs no longer print"
    assert all(PARSE_ONLY.values()) and all(SKIPPED.values())


PARSE_HOOK = r"""
import argparse, json, runpy, sys
class Parsed(Exception):
    pass
parse = argparse.ArgumentParser.parse_args
def parse_then_stop(self, args=None, namespace=None):
    parse(self, args, namespace)
    raise Parsed
argparse.ArgumentParser.parse_args = parse_then_stop
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
        results.append("ran without parsing arguments")
    except Parsed:
        results.append("ok")
    except SystemExit as e:
        results.append(f"exit {e.code}")
print(json.dumps(results))
"""


def _variants(command: str) -> list[str]:
    """A command with an optional [--flag value] part: without it and with it."""
    m = re.search(r"\s*\[([^\]]+)\]", command)
    if m is None:
        return [command]
    return [command[:m.start()] + command[m.end():], command[:m.start()] + " " + m[1] + command[m.end():]]


def test_documented_script_commands_are_accepted_by_their_scripts():
    """Each command not run here still has arguments its script accepts (its own argparse parser)."""
    argvs = []
    for command in PARSE_ONLY:
        for variant in _variants(command):
            words = shlex.split(variant)
            assert words[0] in ("python", "python3") and words[1].startswith("scripts/"), command
            argvs.append(words[1:])
    r = subprocess.run([sys.executable, "-c", PARSE_HOOK, json.dumps(argvs)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.splitlines()[-1])
    assert results == ["ok"] * len(argvs), [(a, x) for a, x in zip(argvs, results) if x != "ok"]


def shell(command: str, tmp, subs: dict[str, str] = None, env: dict | None = None, cwd=None, code: int = 0):
    """A documented command run by bash as printed, with its placeholders (paths of the docs' machine, OUT,
    SRC) replaced by this test's synthetic ones; the project's programs come first on PATH."""
    assert any(command == c for _, c in documented_commands()), f"not printed in the docs: {command}"
    for old, new in sorted((subs or {}).items(), key=lambda kv: -len(kv[0])):  # longer first: /a/b before /a
        pattern = rf"\b{old}\b" if old.isalpha() else re.escape(old)  # a word (OUT, SRC) or a path
        command, n = re.subn(pattern, str(new).replace("\\", "\\\\"), command)
        assert n, f"{old} not in {command}"  # never run with a path of the docs' machine left in
    assert not re.search(r"(?<![\w.-])/(models|out|shared|tmp/v4|tmp/k2)\b", command), command
    base = env if env is not None else dict(os.environ)
    base = {**base, "PATH": os.path.dirname(sys.executable) + os.pathsep + base.get("PATH", ""),
            "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp), "TQDM_DISABLE": "1"}
    r = subprocess.run(["bash", "-c", command], cwd=cwd or tmp, env=base, capture_output=True, text=True, timeout=600)
    assert r.returncode == code, f"{command}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("docs")


@pytest.fixture(scope="module")
def v4(work):
    from kt_convert.synthetic.v4_flash import make_v4_flash_checkpoint

    return make_v4_flash_checkpoint(work / "DeepSeek-V4-Flash", "v4-flash-tiny", num_experts=8, num_shards=2).path


def test_readme_convert_and_verify_commands(v4, work):
    from helpers.outputs import tree_hashes

    out = work / "V4-CPU-AMXINT4"
    models = {"/models/DeepSeek-V4-Flash": v4, "/models/DeepSeek-V4-Flash-CPU-NUMA2-AMXINT4": out}
    r = shell(V4_CONVERT, work, models)
    assert "2 layers converted" in r.stderr and (out / "model.safetensors.index.json").exists()
    assert "integrity ok" in shell(VERIFY, work, {"OUT": out}).stdout
    r = shell(VERIFY_SOURCE, work, {"OUT": out, "/models/DeepSeek-V4-Flash": v4})
    assert "--max-rel-error 0.2: every tensor within" in r.stdout
    assert json.loads((work / "report.json").read_text())["source"] == str(v4)
    assert (work / "report.html").read_text().startswith("<!DOCTYPE html>")
    before = tree_hashes(out)
    assert "is complete" in shell(FINALIZE, work, {"OUT": out}).stderr  # a complete output: nothing to do
    assert tree_hashes(out) == before
    assert "deepseek_v4" in shell(FAMILIES, work).stdout
    assert "--threadpool-count" in shell(HELP, work).stdout  # the defaults BATCH.md refers to


def test_readme_hub_commands_against_a_local_hub(v4, work):
    """`hf download` then a conversion from the cache, and --download: a local hub stands in for huggingface.co
    (HF_ENDPOINT), serving the synthetic checkpoint as deepseek-ai/DeepSeek-V4-Flash."""
    from kt_convert.synthetic.hub_server import LocalHub
    from helpers.hub import hub_env

    with LocalHub("deepseek-ai/DeepSeek-V4-Flash", v4) as hub:
        cache = work / "hub"
        env = hub_env(hub.endpoint, cache)
        shell(HF_DOWNLOAD, work, env=env)
        r = shell(HUB_CONVERT, work, {"/models/V4-Flash-AMXINT4": work / "hub-out"}, env=env)
        assert "2 layers converted" in r.stderr
        env2 = hub_env(hub.endpoint, work / "hub2")  # nothing in this cache yet: --download fetches it
        r = shell(HUB_DOWNLOAD, work, {"/models/V4-Flash-AMXINT4": work / "hub-out2"}, env=env2)
        assert "2 layers converted" in r.stderr
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):  # the same packed tensors
        a, b = ((work / d / name).read_bytes() for d in ("hub-out", "hub-out2"))  # (headers name each cache's path)
        assert a[8 + int.from_bytes(a[:8], "little"):] == b[8 + int.from_bytes(b[:8], "little"):]


def test_readme_synthetic_checkpoint_commands(work):
    assert "kimi_k2_int4" in shell(SYNTHETIC[0], work, cwd=ROOT).stdout
    shell(SYNTHETIC[1], work, {"/tmp/v4": work / "v4"}, cwd=ROOT)
    shell(SYNTHETIC[2], work, {"/tmp/k2": work / "k2"}, cwd=ROOT)
    assert json.loads((work / "v4" / "config.json").read_text())["model_type"] == "deepseek_v4"
    assert json.loads((work / "k2" / "config.json").read_text())["model_type"] == "kimi_k2"


@pytest.fixture(scope="module")
def v3(work):
    from kt_convert.synthetic.families import make_family_checkpoint

    # I = 512: int4 splits over 4 NUMA pools (128 each); 9 layers, the first dense: 8 MoE layers, one per shard of 8
    return make_family_checkpoint(work / "DeepSeek-V3", "deepseek_v3_fp8", intermediate_size=512, num_layers=9).path


def test_batch_doc_template_and_shard_commands(v3, work):
    shell(TEMPLATE, work, {"/models/DeepSeek-V3": v3, "/out/": f"{work}/out/"})
    made = sorted(p.name for p in (work / "out").iterdir())
    assert made == [f"ds3-{m}-T{t}" for m in ("int4", "int8") for t in (1, 2, 4)]
    r = shell(SHARD, work, {"SRC": v3, "OUT": work / "sharded"})
    assert "shard 2/8 (from --shard): layers 2" in r.stderr and "not complete yet" in r.stderr


def test_batch_doc_slurm_script_and_its_finalize(v3, work):
    """The sbatch script's commands, once per array task (SLURM's variables set as --array=1-8 sets them),
    and its finalize step: with a task missing, finalize names it; then the output is the single run's."""
    from helpers.outputs import tree_hashes

    activate = work / "activate"  # the script sources the virtual environment: here, ours
    activate.write_text(f'export PATH="{os.path.dirname(sys.executable)}:$PATH"\n')
    out = work / "ds3-int4"
    subs = {"/shared/kt-convert/.venv/bin/activate": activate, "/shared/models/DeepSeek-V3": v3,
            "/shared/out/ds3-int4": out}
    batch = (ROOT / "docs" / "BATCH.md").read_text()
    assert "#SBATCH --array=1-8" in batch
    wrap = re.search(r"--wrap '(.*?)'", batch)[1].split(" && ")[1]
    assert wrap == "convert-cpu-weights finalize /shared/out/ds3-int4"
    for task in range(1, 8):  # task 8 fails (not run)
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "1",
               "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_CPUS_PER_TASK": "1"}
        shell(SBATCH_SCRIPT, work, subs, env=env)
    r = subprocess.run(["bash", "-c", wrap.replace("/shared/out/ds3-int4", str(out))], capture_output=True, text=True,
                       env={**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]})
    assert r.returncode == 2 and "re-run --shard 8/8 " in r.stderr, r.stderr
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MIN": "8", "SLURM_ARRAY_TASK_COUNT": "1",
           "SLURM_CPUS_PER_TASK": "1"}  # re-submitted alone (sbatch --array=8): the script passes --shard itself
    shell(SBATCH_SCRIPT, work, subs, env=env)
    single = work / "single"
    subprocess.run([sys.executable, "-m", "kt_convert", "-i", str(v3), "-o", str(single), "--quant-method", "int4",
                    "--threadpool-count", "2", "--no-progress"], cwd=ROOT, check=True, capture_output=True)
    assert tree_hashes(out) == tree_hashes(single)


def test_readme_inject_example_runs(tmp_path):
    """The README's whole-model example, as printed, on a tiny transformers DeepSeek-V4 model saved with a
    tokenizer and converted; without a GPU the device is the CPU and 3 of its 8 experts stand for 16."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from kt_convert.convert.pipeline import ConvertOptions, convert

    example = blocks("python", "## Using the packed experts from Python")[2]
    assert "kt_runtime.inject(" in example and "AutoTokenizer" in example
    cfg = transformers.DeepseekV4Config(
        vocab_size=64, hidden_size=256, moe_intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, q_lora_rank=32, n_routed_experts=8, num_experts_per_tok=2, o_groups=1,
        o_lora_rank=32, index_n_heads=2, index_head_dim=16, index_topk=4, sliding_window=16, hc_mult=2,
        mlp_layer_types=["moe", "moe"], num_nextn_predict_layers=0,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8})
    torch.manual_seed(0)
    src, out = tmp_path / "model", tmp_path / "out"
    transformers.DeepseekV4ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(src)
    vocab = {w: i for i, w in enumerate(["[UNK]", "The", "capital", "of", "France", "is", "Paris"]
                                        + [f"w{i}" for i in range(57)])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(src)
    convert(ConvertOptions(input_path=str(src), output=out, threadpool_count=1, progress=False))
    code = example.replace('"/models/DeepSeek-V4-Flash-CPU-NUMA2-AMXINT4"', repr(str(out)))
    code = code.replace('"/models/DeepSeek-V4-Flash"', repr(str(src))).replace("num_gpu_experts=16", "num_gpu_experts=3")
    if not torch.cuda.is_available():
        code = code.replace('"cuda"', '"cpu"')
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        scope = {}
        exec(compile(code, "README inject example", "exec"), scope)
    words = printed.getvalue().split()
    # the prompt, then up to 20 generated tokens (an unknown-word token decodes to nothing)
    assert words[:5] == ["The", "capital", "of", "France", "is"] and 15 <= len(words) <= 25, printed.getvalue()
    from kt_convert.kt_runtime.integrations import hybrid_layers

    assert sorted(hybrid_layers(scope["model"])) == [0, 1]
