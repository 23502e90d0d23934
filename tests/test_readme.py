"""The README's commands and Python example are what CI runs and what works."""
import re

import pytest
import torch

from conftest import ROOT

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
    from convert.pipeline import ConvertOptions, convert
    from kt_runtime.reference import moe_reference
    from synthetic.v4_flash import make_v4_flash_checkpoint

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
    import kt_runtime

    import subprocess
    import sys

    fresh = subprocess.run([sys.executable, "-c", "import kt_runtime; print(' '.join(dir(kt_runtime)))"],
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
