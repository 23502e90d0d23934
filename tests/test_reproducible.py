"""Reproducible outputs: every file a user publishes or loads (shards, index, copied model files, .kt files,
the non-expert shard) depends only on the source's contents, the options that change bytes and the converter
version. Two copies of one checkpoint at other paths with other modification times, another
--cpuinfer-threads, a batch run (--output-template), --shard processes and --device cuda all give the same
bytes; only kt_manifest.json (it records where the source was and its files' stat) and dot-files differ.
The shards name their source by its contents (source_sha256), checked here against a digest computed by hand."""
import hashlib
import json
import os
import shutil
import struct

import numpy as np
import pytest

from kt_convert import kt_runtime
from helpers.outputs import published_hashes
from kt_convert.convert.cli import main
from kt_convert.convert.pipeline import ConvertOptions, convert
from kt_convert.kt_runtime.format.digest import tree_sha256_files
from kt_convert.kt_runtime.format.manifest import read_manifest
from kt_convert.kt_runtime.format.safetensors_file import SafetensorsFile
from kt_convert.synthetic.families import VARIANTS, make_family_checkpoint
from kt_convert.synthetic.v4_flash import make_v4_flash_checkpoint


def copy_elsewhere(src, dst, seconds: int = 1_000_000_000):
    """A copy at another path whose files (and folder) carry other modification times, as cp or a download gives."""
    shutil.copytree(src, dst)
    for i, p in enumerate(sorted(dst.rglob("*"))):
        os.utime(p, ns=(seconds * 10**9 + i, seconds * 10**9 + i))
    os.utime(dst, ns=(seconds * 10**9, seconds * 10**9))
    assert all(os.stat(p).st_mtime_ns != os.stat(src / p.relative_to(dst)).st_mtime_ns for p in dst.rglob("*"))
    return dst


def run(src, out, **kw):
    return convert(ConvertOptions(input_path=str(src), output=out, device="cpu", progress=False, **kw))


def header_metadata(path) -> dict:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]).get("__metadata__", {})


# -- every family and source format, from two copies ---------------------------------------------------------

CASES = sorted(VARIANTS) + ["v4_flash_mxfp4"]  # every family x source format, and V4-Flash's MXFP4 (F4 storage)


def _checkpoint(case: str, path):
    if case == "v4_flash_mxfp4":
        return make_v4_flash_checkpoint(path, "v4-flash-tiny", storage="F4", num_experts=4, num_shards=2).path
    return make_family_checkpoint(path, case).path


@pytest.mark.parametrize("case", CASES)
def test_two_copies_give_the_same_files(case, tmp_path):
    """Copy b: another path, other mtimes, one packing thread; both with the non-expert shard."""
    a = _checkpoint(case, tmp_path / "a" / "model")
    b = copy_elsewhere(a, tmp_path / "elsewhere" / "deeper" / "copy-of-model")
    run(a, tmp_path / "out-a", include_non_expert=True)
    run(b, tmp_path / "out-b", include_non_expert=True, cpuinfer_threads=1)
    files = published_hashes(tmp_path / "out-a")
    assert "model.safetensors.index.json" in files and "config.json" in files
    assert sum(name.endswith(".safetensors") for name in files) >= 2
    assert published_hashes(tmp_path / "out-b") == files
    # the stat fingerprint stays in the manifests (resume and change detection), never in a shard
    ma, mb = read_manifest(tmp_path / "out-a"), read_manifest(tmp_path / "out-b")
    assert ma.source["fingerprint"] != mb.source["fingerprint"]
    assert {k: r.source_sha256 for k, r in ma.completed.items()} == {k: r.source_sha256 for k, r in mb.completed.items()}
    for layer, rec in ma.completed.items():
        meta = header_metadata(tmp_path / "out-a" / rec.files[0])
        assert meta["source_sha256"] == rec.source_sha256 and "source_fingerprint" not in meta
        assert not any(str(a) in v or str(b) in v or ma.source["fingerprint"] in v for v in meta.values())


@pytest.mark.parametrize("case,kw", [("qwen3_5_moe_bf16", dict(merge=False, quant_method="int8", threadpool_count=1)),
                                     ("gpt_oss_mxfp4", dict(merge=False, threadpool_count=2)),
                                     ("kimi_k2_int4", dict(quant_method="rawint4", group_size=32, threadpool_count=1))],
                         ids=["kt-folders-fused", "kt-folders-gpt-oss", "rawint4"])
def test_two_copies_give_the_same_files_in_other_layouts(case, kw, tmp_path):
    a = _checkpoint(case, tmp_path / "a")
    b = copy_elsewhere(a, tmp_path / "b" / "copy")
    run(a, tmp_path / "out-a", **kw)
    run(b, tmp_path / "out-b", cpuinfer_threads=1, **kw)
    files = published_hashes(tmp_path / "out-a")
    if kw.get("merge") is False:
        assert sum(name.endswith(".kt") for name in files) > 0
    assert published_hashes(tmp_path / "out-b") == files
    for out in (tmp_path / "out-a", tmp_path / "out-b"):
        assert all(rec.source_sha256 for rec in read_manifest(out).completed.values())


# -- batch, shard and resume runs of a copy ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 6-layer checkpoint and a copy of it elsewhere with other mtimes."""
    root = tmp_path_factory.mktemp("repro")
    a = make_v4_flash_checkpoint(root / "a", "v4-flash-tiny", num_layers=6, num_experts=8, num_shards=3).path
    return a, copy_elsewhere(a, root / "b" / "copy")


def test_batch_run_of_a_copy_equals_single_runs(pair, tmp_path):
    a, b = pair
    singles = {}
    for method, t in (("int4", 2), ("int8", 1)):
        run(a, tmp_path / f"single-{method}-T{t}", quant_method=method, threadpool_count=t)
        singles[method, t] = published_hashes(tmp_path / f"single-{method}-T{t}")
    assert main(["-i", str(b), "--no-progress", "--device", "cpu", "--cpuinfer-threads", "1",
                 "--output-template", str(tmp_path / "batch" / "{method}-T{threadpool_count}"),
                 "--quant-method", "int4,int8", "--threadpool-count", "2,1"]) == 0
    for (method, t), files in singles.items():
        assert published_hashes(tmp_path / "batch" / f"{method}-T{t}") == files, (method, t)


def test_shard_runs_of_a_copy_equal_a_single_run(pair, tmp_path):
    a, b = pair
    run(a, tmp_path / "single", threadpool_count=2, include_non_expert=True)
    for i in (2, 1, 3):
        assert main(["-i", str(b), "-o", str(tmp_path / "sharded"), "--no-progress", "--device", "cpu",
                     "--threadpool-count", "2", "--include-non-expert", "--shard", f"{i}/3"]) == 0
    assert read_manifest(tmp_path / "sharded").complete
    assert published_hashes(tmp_path / "sharded") == published_hashes(tmp_path / "single")


def test_resume_and_overwrite_keep_the_bytes_and_refuse_a_changed_source(pair, tmp_path):
    """A re-run converts the layers whose shards are gone and ends with the bytes of one uninterrupted run; a
    copy with other mtimes is refused as a changed source (stat change detection), and --overwrite converts
    it to the same bytes."""
    from kt_convert.convert.errors import UserError

    a, b = pair
    run(a, tmp_path / "whole", threadpool_count=1)
    out = tmp_path / "out"
    run(a, out, threadpool_count=1)
    for layer in (1, 4):
        (out / read_manifest(out).completed[layer].files[0]).unlink()
    report = run(a, out, threadpool_count=1)
    assert (report.layers_converted, report.layers_resumed) == (2, 4)
    assert published_hashes(out) == published_hashes(tmp_path / "whole")
    with pytest.raises(UserError, match="modification time"):
        run(b, out, threadpool_count=1)
    report = run(b, out, threadpool_count=1, overwrite=True)
    assert report.layers_converted == 6
    assert published_hashes(out) == published_hashes(tmp_path / "whole")
    kt_runtime.load_experts(out, verify=True)


# -- what the shard header holds -----------------------------------------------------------------------------


def _tensors(path):
    """{key: (dtype, shape, bytes)} of a safetensors file, parsed by hand."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], data[8 + n + v["data_offsets"][0]: 8 + n + v["data_offsets"][1]])
            for k, v in header.items()}


def _by_hand(rows) -> str:
    """FORMAT.md's source_sha256: the compact JSON list of [key, expert, dtype, shape, sha256], sorted."""
    rows = sorted(rows, key=lambda r: (r[0], -1 if r[1] is None else r[1]))
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def test_source_sha256_of_per_expert_tensors_by_hand(tmp_path):
    ck = make_family_checkpoint(tmp_path / "ck", "deepseek_v3_fp8")  # MoE layer 1; weight + weight_scale_inv
    tensors = {}
    for f in ck.path.glob("*.safetensors"):
        tensors.update(_tensors(f))
    rows = []
    for e in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for part in ("weight", "weight_scale_inv"):
                key = f"model.layers.1.mlp.experts.{e}.{proj}.{part}"
                dtype, shape, raw = tensors[key]
                rows.append([key, None, dtype, shape, hashlib.sha256(raw).hexdigest()])
    assert {r[2] for r in rows} == {"F8_E4M3", "F32"}
    run(ck.path, tmp_path / "out", threadpool_count=1)
    record = read_manifest(tmp_path / "out").completed[1]
    assert record.source_sha256 == _by_hand(rows)
    assert header_metadata(tmp_path / "out" / record.files[0])["source_sha256"] == _by_hand(rows)


def test_source_sha256_of_fused_tensors_by_hand(tmp_path):
    """A fused [E, ...] tensor is read one expert's part at a time: one row per part, its index and shape."""
    ck = make_family_checkpoint(tmp_path / "ck", "qwen3_5_moe_bf16")
    tensors = {}
    for f in ck.path.glob("*.safetensors"):
        tensors.update(_tensors(f))
    for layer in (0, 1):
        rows = []
        for name in ("gate_up_proj", "down_proj"):
            key = f"model.language_model.layers.{layer}.mlp.experts.{name}"
            dtype, shape, raw = tensors[key]
            per = len(raw) // shape[0]
            rows += [[key, e, dtype, shape[1:], hashlib.sha256(raw[e * per:(e + 1) * per]).hexdigest()]
                     for e in range(shape[0])]
        assert len(rows) == 8
        if layer == 0:
            run(ck.path, tmp_path / "out", threadpool_count=1, merge=False)
        assert read_manifest(tmp_path / "out").completed[layer].source_sha256 == _by_hand(rows)


def test_another_source_gives_another_identity(tmp_path):
    """One changed expert byte: the shards of that layer name another source; the other layer's stay."""
    a = make_family_checkpoint(tmp_path / "a", "qwen3_moe_bf16").path
    b = copy_elsewhere(a, tmp_path / "b")
    key = "model.layers.1.mlp.experts.2.up_proj.weight"
    for f in b.glob("*.safetensors"):
        st = SafetensorsFile(f)
        if key in st.tensors:
            offset = st.tensors[key].offset
            st.close()
            with open(f, "r+b") as fh:
                fh.seek(offset)
                byte = fh.read(1)
                fh.seek(offset)
                fh.write(bytes([byte[0] ^ 0x40]))
            break
        st.close()
    else:
        pytest.fail(f"{key} not found")
    run(a, tmp_path / "out-a", threadpool_count=1)
    run(b, tmp_path / "out-b", threadpool_count=1)
    ra, rb = read_manifest(tmp_path / "out-a").completed, read_manifest(tmp_path / "out-b").completed
    assert ra[0].source_sha256 == rb[0].source_sha256 and ra[1].source_sha256 != rb[1].source_sha256
    assert header_metadata(tmp_path / "out-b" / rb[1].files[0])["source_sha256"] == rb[1].source_sha256


def test_loaders_read_the_shards_unchanged(tmp_path):
    """The safetensors library (what kt-kernel's SafeTensorLoader opens shards with) reads the header and every
    tensor; the project's loader checks the header against the manifest and the digests."""
    from safetensors import safe_open

    ck = make_v4_flash_checkpoint(tmp_path / "ck", "v4-flash-tiny", num_experts=4)
    run(ck.path, tmp_path / "out", threadpool_count=2)
    w = kt_runtime.load_experts(tmp_path / "out", verify=True)
    for layer, rec in w.manifest.completed.items():
        with safe_open(tmp_path / "out" / rec.files[0], framework="numpy") as f:
            assert f.metadata()["source_sha256"] == rec.source_sha256 and f.metadata()["format"] == "pt"
            for e in range(w.num_experts):
                for t in range(2):
                    key = f"blk.{layer}.ffn_down_exps.{e}.numa.{t}.weight"
                    assert np.array_equal(f.get_tensor(key).view(np.uint8), w.expert_tensors(layer, e, "down", t)[0])


def test_outputs_of_an_older_converter_still_load(tmp_path):
    """Shards that carry the manifest's source fingerprint and layer records without source_sha256 (converters
    before it) load; the loader still catches a shard whose fingerprint is another source's."""
    from safetensors.numpy import save_file

    from kt_convert.kt_runtime import PackedWeightsError
    from kt_convert.kt_runtime.format.manifest import write_manifest

    ck = make_v4_flash_checkpoint(tmp_path / "ck", "v4-flash-tiny", num_experts=4)
    out = tmp_path / "out"
    run(ck.path, out, threadpool_count=1)
    manifest = read_manifest(out)

    def rewrite(fingerprint):
        for rec in manifest.completed.values():
            st = SafetensorsFile(out / rec.files[0])
            meta = {k: v for k, v in st.metadata.items() if k != "source_sha256"}
            meta = {**{k: v for k, v in meta.items() if k != "converter_version"}, "source_fingerprint": fingerprint,
                    "converter_version": meta["converter_version"]}
            arrays = {k: np.array(st.array(k)) for k in st.keys()}
            st.close()
            save_file(arrays, str(out / rec.files[0]), metadata=meta)
            rec.source_sha256 = None
            rec.nbytes = (out / rec.files[0]).stat().st_size
            rec.sha256 = tree_sha256_files([out / rec.files[0]])
        write_manifest(out, manifest)
        (out / ".kt_verified.json").unlink(missing_ok=True)

    rewrite(manifest.source["fingerprint"])
    w = kt_runtime.load_experts(out, verify=True)
    assert all(r.source_sha256 is None for r in w.manifest.completed.values())
    rewrite("0" * 64)
    with pytest.raises(PackedWeightsError, match="source_fingerprint"):
        kt_runtime.load_experts(out, verify=False)


# -- the GPU ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_run_of_a_copy_equals_a_cpu_run(tmp_path, monkeypatch):
    from kt_convert.convert import packers
    from kt_convert.quant.gpu import gpu_unavailable_reason

    if gpu_unavailable_reason():
        pytest.skip("needs a real CUDA device")
    monkeypatch.setattr(packers, "PACK_ON_CPU_WHILE_DEVICE_STARTS", False)  # every batch on the GPU
    a = make_v4_flash_checkpoint(tmp_path / "a", "v4-flash-tiny", num_experts=8, num_shards=2).path
    b = copy_elsewhere(a, tmp_path / "b" / "copy")
    for kw in (dict(threadpool_count=2), dict(quant_method="int8", threadpool_count=1, merge=False)):
        cpu = run(a, tmp_path / "cpu", overwrite=True, **kw)
        gpu = convert(ConvertOptions(input_path=str(b), output=tmp_path / "gpu", device="cuda", progress=False,
                                     overwrite=True, **kw))
        assert (cpu.device, gpu.device) == ("cpu", "cuda")
        assert published_hashes(tmp_path / "gpu") == published_hashes(tmp_path / "cpu"), kw


def test_output_digests_one_prints_the_same_lines_from_any_folder(tmp_path, capsys):
    """scripts/output_digests.py --one (what two machines compare): the same output lines from two folders."""
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("output_digests", ROOT / "scripts" / "output_digests.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    printed = []
    for parent in (tmp_path / "a", tmp_path / "b" / "deeper"):
        assert script.main(["--one", "--workdir", str(parent)]) == 0
        printed.append(capsys.readouterr().out.splitlines())
        assert list(parent.iterdir()) == []  # its scratch folder is gone, nothing else touched
    assert printed[0] == printed[1]
    lines = printed[0]
    outputs = [line for line in lines[:-1] if not line.split("  ", 1)[1].startswith("source/")]
    assert [line.split("  ", 1)[1] for line in outputs] == [
        "config.json", "generation_config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]
    assert "(all 8 output files, converted on cpu" in lines[-1]
    assert lines[-1].split()[0] == hashlib.sha256("\n".join(outputs).encode()).hexdigest()
    assert not any("kt_manifest" in line or "/." in line for line in lines[:-1])


@pytest.mark.parametrize("ahead", [0, 1])
def test_slab_sha256_is_taken_before_the_buffer_is_reused(tmp_path, monkeypatch, ahead):
    """Each batch's slab sha256 equals hashlib's over the file's bytes, though the batch is released (its
    buffer handed back) before they are asked for and hashing is slow; with ahead=0 every batch reuses the
    one buffer."""
    import time

    from kt_convert.convert.source import open_checkpoint
    from kt_convert.convert.source_reader import Slab, SourceStream

    take = SourceStream._sha256

    def slow(self, raw):
        time.sleep(0.02)  # a read into a buffer handed back too early would land before this hash
        return take(self, raw)

    monkeypatch.setattr(SourceStream, "_sha256", slow)

    ck = make_family_checkpoint(tmp_path / "ck", "qwen3_5_moe_bf16")  # fused tensors: per-expert slabs
    c = open_checkpoint(str(ck.path))
    try:
        keys = sorted(k for k in c.key_file if ".experts." in k)
        schedule = [[Slab(k, e)] for k in keys for e in range(4)]
        stream = SourceStream(c, schedule, ahead=ahead, threads=2)
        batches = []
        for _ in schedule:
            batch = stream.next()
            batch.release()
            batches.append(batch)
        for slabs, batch in zip(schedule, batches):
            (slab,) = slabs
            raw = _tensors(c.files[c.key_file[slab.key]].path)[slab.key][2]
            per = len(raw) // 4
            assert batch.sha256() == {slab: hashlib.sha256(raw[slab.expert * per:(slab.expert + 1) * per]).hexdigest()}
        stream.close()
    finally:
        c.close()
