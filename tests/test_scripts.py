"""The scripts (output digests, benchmarks) as a user meets them: they remove only what they made (or say
where it is, with --keep), skip an ISA the CPU lacks with a line, and compare what a user loads."""
import importlib.util
import os
import subprocess
import sys

import pytest

from helpers import ROOT
from kt_convert.synthetic.scratch import Scratch


def script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name, *args, tmp, timeout=600):
    """The script as a user runs it, with its temporary files under tmp (TMPDIR)."""
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp), "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --- Scratch: what the scripts make, and only that, is removed ---------------------------------------


def test_scratch_in_a_user_folder_removes_only_what_it_made(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("the user's")
    (work / "kept").mkdir()
    with Scratch(work, "x_") as scratch:
        made = scratch.new("ckpt")
        (made / "sub").mkdir(parents=True)
        (made / "sub" / "f").write_text("x")
        assert scratch.reused("kept") == work / "kept" and scratch.reused("absent") is None
        with pytest.raises(SystemExit, match="mine.txt exists and this run did not make it"):
            scratch.new("mine.txt")
    assert sorted(p.name for p in work.iterdir()) == ["kept", "mine.txt"]
    assert (work / "mine.txt").read_text() == "the user's"


def test_scratch_folder_it_created_goes_when_empty_and_a_temporary_one_always(tmp_path, monkeypatch):
    with Scratch(tmp_path / "new", "x_") as scratch:
        scratch.new("a").mkdir()
    assert not (tmp_path / "new").exists()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "t"))
    (tmp_path / "t").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    with Scratch(None, "bench_x_") as scratch:
        assert scratch.root.parent == tmp_path / "t"
        (scratch.root / "stats.json").write_text("{}")  # anything in a temporary folder is the run's
    assert list((tmp_path / "t").iterdir()) == []


def test_scratch_keep_names_where_and_removes_nothing(tmp_path, capsys):
    with Scratch(tmp_path / "w", "x_", keep=True) as scratch:
        scratch.new("ckpt").mkdir()
    assert (tmp_path / "w" / "ckpt").is_dir()
    assert f"kept (--keep): {tmp_path / 'w' / 'ckpt'}; remove it when done" in capsys.readouterr().err


def test_scratch_removes_what_it_made_after_an_error(tmp_path):
    with pytest.raises(RuntimeError):
        with Scratch(tmp_path, "x_") as scratch:
            scratch.new("half").mkdir()
            raise RuntimeError("stopped")
    assert list(tmp_path.iterdir()) == []


def test_output_digests_never_deletes_what_it_did_not_create(tmp_path):
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    (work / "src" / "precious").write_text("a user's file")
    (work / "notes.txt").write_text("more")
    r = run_script("output_digests", tmp_path / "d.json", "--workdir", work, tmp=tmp_path / "tmp")
    assert r.returncode != 0 and "src exists and this run did not make it" in r.stderr, r.stderr
    assert (work / "src" / "precious").read_text() == "a user's file" and (work / "notes.txt").exists()
    assert not (tmp_path / "d.json").exists()


def test_bench_verify_leaves_nothing_behind_unless_kept(tmp_path):
    small = ["--hidden", "256", "--inter", "256", "--experts", "2", "--layers", "1", "--reps", "1"]
    r = run_script("bench_verify", *small, tmp=tmp_path / "tmp")
    assert r.returncode == 0, r.stderr
    assert "verify --source" in r.stdout and list((tmp_path / "tmp").iterdir()) == []
    r = run_script("bench_verify", *small, "--workdir", tmp_path / "w", "--keep", tmp=tmp_path / "tmp")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["ck", "out"]
    assert f"kept (--keep): {tmp_path / 'w' / 'ck'}, {tmp_path / 'w' / 'out'}" in r.stderr


def test_bench_hybrid_cleans_up_or_keeps_and_reuses(tmp_path):
    small = ["--experts", "8", "--gpu-experts", "2", "--topk", "4", "--hidden", "512", "--intermediate", "256",
             "--iters", "3", "--warmup", "1", "--routings", "2", "--device", "cpu"]
    r = run_script("bench_hybrid", *small, tmp=tmp_path / "tmp")
    assert r.returncode == 0, r.stderr
    assert list((tmp_path / "tmp").iterdir()) == []
    r = run_script("bench_hybrid", *small, "--workdir", tmp_path / "w", "--keep", tmp=tmp_path / "tmp")
    assert r.returncode == 0 and "kept (--keep): " in r.stderr, r.stderr
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["v4-H512-I256-E8-int4-T1"]  # its source removed
    r = run_script("bench_hybrid", *small, "--workdir", tmp_path / "w", tmp=tmp_path / "tmp")
    assert r.returncode == 0 and "# reusing" in r.stderr, r.stderr
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["v4-H512-I256-E8-int4-T1"]  # not this run's to remove


def test_bench_prefill_runs_both_paths_and_cleans_up(tmp_path):
    """Without a GPU: the CPU path alone, said so; --cpu-prefill runs the GPU path's code on the CPU (so the script
    itself is tested here): every table filled, the crossover computed, nothing left behind."""
    import json

    small = ["--hidden", "256", "--intermediate", "256", "--experts", "8", "--topk", "2", "--tokens", "16,32",
             "--layers", "2", "--iters", "1", "--warmup", "0"]
    r = run_script("bench_prefill", *small, tmp=tmp_path / "tmp")
    assert r.returncode == 0, r.stderr
    assert "# CPU path only" in r.stderr and list((tmp_path / "tmp").iterdir()) == []
    d = json.loads(r.stdout)
    assert d["cpu_only"] and [row["tokens"] for row in d["one_layer"]] == [16, 32] and "gpu_ms" not in d["one_layer"][0]
    assert d["crossover"]["tokens"] is None and "# crossover: not measured" in r.stderr
    r = run_script("bench_prefill", *small, "--cpu-prefill", "--json", tmp_path / "p.json", tmp=tmp_path / "tmp")
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "p.json").read_text())
    assert json.loads(r.stdout) == d and list((tmp_path / "tmp").iterdir()) == []
    for row in d["one_layer"] + d["stack"]:
        assert row["gpu_ms"] > 0 and row["cpu_ms"] > 0 and row["floor_ms"] > 0 and 0 < row["gpu_of_floor"]
        # the CPU device registers nothing: "auto" copies from the mapping as it is; gather measured beside it
        assert row["gpu_staging"] == "registered" and list(row["compared"]) == ["gather"]
        g = row["compared"]["gather"]
        assert g["gpu_staging"] == "gather" and g["gpu_ms"] > 0 and 0 < g["gpu_of_floor"]
    assert d["one_layer"][0]["experts_touched"] == 8 and d["gpu"]["group_experts"] >= 1
    assert {m: s["used"] for m, s in d["gpu"]["staging"].items()} == {"auto": "registered", "gather": "gather"}
    assert "tokens" in d["crossover"] and d["crossover"]["staging"] == "registered"
    assert "tokens" in d["crossover_compared"]["gather"]
    assert "# crossover (registered)" in r.stderr and "# crossover (compared: gather)" in r.stderr
    assert '# staging auto: {"used": "registered"' in r.stderr
    r = run_script("bench_prefill", *small, "--staging", "registered,pinned", tmp=tmp_path / "tmp")
    assert r.returncode == 2 and "--staging: comma-separated names of auto, registered, gather" in r.stderr


# --- bench_moe -----------------------------------------------------------------------------------------


def test_bench_moe_skips_an_isa_the_cpu_lacks_with_a_line(monkeypatch, capsys):
    import argparse

    bench = script("bench_moe")
    # the engine's answer on an AVX2-only CPU without AVX-VNNI (Zen 2)
    monkeypatch.setattr(bench.kt_kernels, "moe_isas", lambda: ["portable", "avx2"])
    ap = argparse.ArgumentParser()
    assert bench.runnable_isas(["avx512", "avx2", "avxvnni", "amx", "portable", "auto"], ap) == \
        ["avx2", "portable", "auto"]
    out = capsys.readouterr().out.splitlines()
    lacks = ": this CPU lacks its features (the engine runs portable, avx2 here)"
    assert out == [f"skipping --isa {name}{lacks}" for name in ("avx512", "avxvnni", "amx")]
    with pytest.raises(SystemExit):
        bench.runnable_isas(["amx"], ap)
    assert "none of these runs on this CPU" in capsys.readouterr().err
    for unknown in ("sse2", "avx2-novnni"):  # avx2-novnni: today the avx2 row (VPMADDUBSW)
        with pytest.raises(SystemExit):
            bench.runnable_isas([unknown], ap)
        assert f"--isa {unknown}: not one of auto, portable, avx2, avxvnni, avx512, amx" in capsys.readouterr().err


def test_bench_prefill_scaling_runs_small(tmp_path):
    """Every thread count gets its probes (VPDPBUSD where the engine has AVX-512) and our prefill for every method
    and token count; --kt-bench without the build's folder is refused; nothing is left behind."""
    import json

    from kt_convert import kt_kernels

    small = ["--threads", "1,2", "--tokens", "16", "--methods", "int4,rawint4-g32", "--hidden", "256", "--inter", "256",
             "--experts", "8", "--topk", "2", "--reps", "1", "--min-time", "0.01", "--probe-seconds", "0.05"]
    r = run_script("bench_prefill_scaling", *small, "--json", tmp_path / "s.json", tmp=tmp_path / "tmp")
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "s.json").read_text())
    assert [run["threads"] for run in d["runs"]] == [1, 2] and list((tmp_path / "tmp").iterdir()) == []
    for run in d["runs"]:
        assert set(run["probes"]) == {"clock"} | ({"vnni"} if "avx512" in kt_kernels.moe_isas() else set()) | \
            ({"amx"} if "amx" in kt_kernels.moe_isas() else set())
        assert all(p["mean"] > 0 and 0 < p["cpu_share"] <= 1.01 for p in run["probes"].values())
        assert [(o["method"], o["tokens"]) for o in run["ours"]] == [("int4", 16), ("rawint4-g32", 16)]
        assert all(o["ms"] > 0 and o["TFLOPs"] > 0 for o in run["ours"]) and run["kt"] == []
    assert "threads=2: probes per thread clock" in r.stdout
    r = run_script("bench_prefill_scaling", *small, "--kt-bench", "x.py", tmp=tmp_path / "tmp")
    assert r.returncode == 2 and "--kt-bench needs --kt-ext-dir" in r.stderr
