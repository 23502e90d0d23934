"""The loader against damaged or mismatched outputs: manifest vs shard sizes, __metadata__ and
sha256, outputs without a manifest, and seeded fuzzing of manifests and shard headers. Whatever
is wrong, load_experts raises PackedWeightsError with a message — never another exception."""
import copy
import json
import random
import shutil
import struct
import warnings

import numpy as np
import pytest

from kt_convert import kt_runtime
from kt_convert.convert.pipeline import ConvertOptions, convert
from kt_convert.synthetic.v4_flash import make_v4_flash_checkpoint
from kt_convert.kt_runtime import PackedWeightsError
from kt_convert.kt_runtime.format.byte_orders import merged_key
from kt_convert.kt_runtime.format.names import MANIFEST_FILE
from kt_convert.kt_runtime.format.safetensors_file import SafetensorsFile, save_file

SHARD0, SHARD1 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Converted outputs of a 2-layer, 2-expert checkpoint: merged and kt-folders, threadpool count 2."""
    root = tmp_path_factory.mktemp("fuzz")
    ck = make_v4_flash_checkpoint(root / "ck", "v4-flash-tiny", num_experts=2, num_shards=1)
    outs = {}
    for layout in ("merged", "kt-folders"):
        outs[layout] = root / layout
        convert(ConvertOptions(input_path=str(ck.path), output=outs[layout], threadpool_count=2, progress=False,
                               merge=layout == "merged"))
    return outs


@pytest.fixture
def merged(outputs, tmp_path):
    out = tmp_path / "merged"
    shutil.copytree(outputs["merged"], out)
    return out


@pytest.fixture
def folders(outputs, tmp_path):
    out = tmp_path / "folders"
    shutil.copytree(outputs["kt-folders"], out)
    return out


def edit_manifest(out, fn):
    d = json.loads((out / MANIFEST_FILE).read_text())
    fn(d)
    (out / MANIFEST_FILE).write_text(json.dumps(d))


def load_quietly(out, verify=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kt_runtime.load_experts(out, verify=verify)


# --- the manifest against the files ---

@pytest.mark.parametrize("change,needle", [
    (lambda d: d.update(format_version=2), "format_version 2 is not supported"),
    (lambda d: d.update(method="int8", kt_method="AMXINT8"), "need at least"),
    (lambda d: d.update(method="int8"), "contradicts method"),
    (lambda d: d.update(threadpool_count=1), "__metadata__ threadpool_count"),
    (lambda d: d.update(hidden_size=512), "need at least"),
    (lambda d: d.update(moe_intermediate_size=1024), "need at least"),
    (lambda d: d.update(num_experts=1, num_experts_per_tok=1), "__metadata__ num_experts is '2'"),
    (lambda d: d.update(num_experts=10**12), "need at least"),
    (lambda d: d.update(num_experts=1), "num_experts_per_tok 2 exceeds num_experts 1"),
    (lambda d: d.update(num_experts_per_tok=1), "__metadata__ num_experts_per_tok"),
    (lambda d: d.update(activation="gelu"), "__metadata__ activation"),
    (lambda d: d.update(hidden_size=400), "hidden_size 400 is not a multiple of 128, which int4 needs"),
    (lambda d: d.update(layers=[0, 1, 2], model_layers=[0, 1, 2], complete=False), "layer 2 was never completed"),
    (lambda d: d.update(layers=[0, 1, 2]), "complete is true but not every layer"),
    (lambda d: d.update(layers=[0]), "completed layer 1 is not among the planned layers"),
    (lambda d: d.update(layers=[0, 0, 1]), "lists a layer twice"),
    (lambda d: d["completed"]["1"].update(nbytes=d["completed"]["1"]["nbytes"] + 1), "the manifest says"),
    (lambda d: d["completed"]["1"].update(sha256="0" * 64), "sha256"),
    (lambda d: d["completed"]["1"].update(sha256="abc"), "not a sha256"),
    (lambda d: d["completed"]["1"].update(source_sha256="f" * 64), "__metadata__ source_sha256"),
    (lambda d: d["completed"]["1"].update(source_sha256="F" * 64), r"completed\[1\].source_sha256 is not a sha256"),
    (lambda d: d["completed"]["1"].update(source_sha256=5), "source_sha256 is not a sha256 hex digest"),
    (lambda d: d["completed"]["1"].update(source_sha256=["x"]), "source_sha256 is not a sha256 hex digest"),
    (lambda d: d["completed"]["1"].pop("source_sha256"), "__metadata__ source_fingerprint is None"),
    (lambda d: d["completed"]["1"].update(source_sha256=None), "__metadata__ source_fingerprint is None"),
    (lambda d: d["completed"]["1"].update(files=["../../etc/passwd"]), "inside the output directory"),
    (lambda d: d["completed"]["1"].update(files=[]), "non-empty list"),
    (lambda d: d["completed"]["1"].update(files=[SHARD0]), "sha256"),
    (lambda d: d["completed"].update({"1": d["completed"]["0"]}), "record of layer 0"),
    (lambda d: d.update(completed=[1, 2]), "completed must be an object"),
    (lambda d: d.pop("hidden_size"), "missing hidden_size"),
    (lambda d: d.update(layout="gguf"), "unknown layout"),
    (lambda d: d.update(source=[]), "source must be an object"),
])
def test_manifest_mismatches_are_named(merged, change, needle):
    edit_manifest(merged, change)
    with pytest.raises(PackedWeightsError, match=needle.replace("(", r"\(")):
        kt_runtime.load_experts(merged)


def test_swapped_shards_are_caught_without_hashing(merged):
    a, b = merged / SHARD0, merged / SHARD1
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    with pytest.raises(PackedWeightsError, match="sha256"):
        kt_runtime.load_experts(merged)
    with pytest.raises(PackedWeightsError, match="__metadata__ layer is '1' but the manifest says '0'"):
        kt_runtime.load_experts(merged, verify=False)


def test_shard_from_another_conversion_is_caught(merged, tmp_path):
    """Same dims, other source: sizes match, the source identity in __metadata__ does not."""
    st = SafetensorsFile(merged / SHARD1)
    meta = dict(st.metadata, source_sha256="f" * 64)
    tensors = {k: (st.tensors[k].dtype, st.tensors[k].shape, bytes(st.raw(k))) for k in st.keys()}
    st.close()
    save_file(merged / SHARD1, tensors, meta)
    with pytest.raises(PackedWeightsError, match="source_sha256"):
        kt_runtime.load_experts(merged, verify=False)


def test_kt_folders_manifest_mismatch(folders):
    edit_manifest(folders, lambda d: d["completed"]["0"]["files"].pop())
    with pytest.raises(PackedWeightsError, match="need 24 files"):
        kt_runtime.load_experts(folders)


def test_kt_folders_wrong_file_names(folders):
    def rename(d):
        files = d["completed"]["0"]["files"]
        files[0] = files[0].replace("_numa_0", "_numa_7")
    edit_manifest(folders, rename)
    with pytest.raises(PackedWeightsError, match="files other than the kt names"):
        kt_runtime.load_experts(folders)


# --- outputs without a manifest (kt-kernel's own) ---

def rewrite_shard(path, fn):
    st = SafetensorsFile(path)
    tensors = {k: (st.tensors[k].dtype, st.tensors[k].shape, bytes(st.raw(k))) for k in st.keys()}
    meta = dict(st.metadata)
    st.close()
    tensors, meta = fn(tensors, meta)
    save_file(path, tensors, meta)


def test_no_manifest_merged_loads_with_a_warning(merged):
    ref = kt_runtime.load_experts(merged)
    (merged / MANIFEST_FILE).unlink()
    rewrite_shard(merged / SHARD0, lambda t, m: (t, {"format": "pt"}))  # kt writes no facts
    with pytest.warns(UserWarning, match="inferred"):
        w = kt_runtime.load_experts(merged)
    assert (w.method, w.threadpool_count, w.num_experts, w.layers) == ("int4", 2, 2, [0, 1])
    for key in ref._tensors:
        assert np.array_equal(w._tensors[key][0], ref._tensors[key][0])


@pytest.mark.parametrize("damage,needle", [
    ("missing expert", "experts or NUMA shards are missing"),
    ("missing numa shard", "experts or NUMA shards are missing"),
    ("wrong-size tensor", "expected I8"),
    ("2-D scale", "expected a 1-D F32"),
    ("metadata disagrees", "__metadata__ quant_method is 'int8' but the tensors say 'int4'"),
])
def test_no_manifest_merged_damage(merged, damage, needle):
    (merged / MANIFEST_FILE).unlink()

    def fn(t, m):
        if damage == "missing expert":
            t = {k: v for k, v in t.items() if ".1.numa." not in k}
        elif damage == "missing numa shard":
            t = {k: v for k, v in t.items() if not k.endswith(".numa.1.weight") or "down" not in k}
        elif damage == "wrong-size tensor":
            k = merged_key(1, "up", 1, 0, "weight")
            t[k] = ("I8", (t[k][1][0] - 64,), t[k][2][:-64])
        elif damage == "2-D scale":
            k = merged_key(1, "up", 1, 0, "scale")
            t[k] = ("F32", (2, t[k][1][0] // 2), t[k][2])
        else:
            m = dict(m, quant_method="int8")
        return t, m
    rewrite_shard(merged / SHARD1, fn)
    with pytest.raises(PackedWeightsError, match=needle):
        load_quietly(merged)


def test_no_manifest_kt_folders(folders):
    ref = kt_runtime.load_experts(folders)
    (folders / MANIFEST_FILE).unlink()
    (folders / "_layer_1.tmp" / "_numa_0").mkdir(parents=True)  # left by an interrupted kt run
    (folders / "_layer_1.tmp" / "_numa_0" / "INT4_gate_0_1Byte_quant_.kt").write_bytes(b"x")
    with pytest.warns(UserWarning, match="inferred"):
        w = kt_runtime.load_experts(folders)
    assert (w.method, w.threadpool_count, w.num_experts, w.layers) == ("int4", 2, 2, [0, 1])
    assert np.array_equal(w.expert_tensors(1, 1, "down", 1)[0], ref.expert_tensors(1, 1, "down", 1)[0])


@pytest.mark.parametrize("damage,needle", [("missing expert file", "missing"), ("truncated file", "bytes, expected"),
                                           ("renamed size", "missing")])
def test_no_manifest_kt_folders_damage(folders, damage, needle):
    (folders / MANIFEST_FILE).unlink()
    victim = sorted((folders / "_layer_1" / "_numa_1").glob("INT4_up_1_*quant_.kt"))[0]
    if damage == "missing expert file":
        victim.unlink()
        (folders / "_layer_1" / "_numa_1" / "INT4_up_2_9Byte_quant_.kt").write_bytes(b"x" * 9)  # keeps the count
    elif damage == "truncated file":
        victim.write_bytes(victim.read_bytes()[:-1])
    else:
        victim.rename(victim.with_name("INT4_up_1_64Byte_quant_.kt"))
    with pytest.raises(PackedWeightsError, match=needle):
        load_quietly(folders)


# --- fuzzing ---

VALUES = [None, True, False, 0, -1, 1, 2, 3, 7, 64, 128, 384, 512, 10**18, -10**18, 1.5, float("nan"), "", "x",
          "int8", "int4", "merged", "kt-folders", "0", [], [0], [0, 1], [0, 1, 2], [-1], ["0"], {}, {"0": 1},
          "0" * 64, ["../x"], ["/etc/passwd"], [SHARD0], [SHARD0, SHARD0], [SHARD1]]


def mutate_json(d, rng):
    """One random change somewhere in the manifest tree."""
    d = copy.deepcopy(d)
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + [i])
    walk(d, [])
    paths = paths[1:]
    if rng.random() < 0.8:  # mostly the fields the loader checks, not the source description
        paths = [p for p in paths if p[0] != "source"] or paths
    path = rng.choice(paths)
    parent = d
    for p in path[:-1]:
        parent = parent[p]
    key, old = path[-1], parent[path[-1]]
    op = rng.random()
    if op < 0.15 and isinstance(parent, dict):
        del parent[key]
    elif op < 0.3 and isinstance(old, int) and not isinstance(old, bool):
        parent[key] = old + rng.choice([-1, 1, 2, -old, old, 10**9])
    elif op < 0.4 and isinstance(old, str) and old:
        i = rng.randrange(len(old))
        parent[key] = old[:i] + rng.choice("0af./_x") + old[i + 1:]
    elif op < 0.5 and isinstance(parent, dict):
        parent[rng.choice(["extra", "1", "2", "99", "-1", "layer"])] = copy.deepcopy(rng.choice(VALUES + [old]))
    elif op < 0.55 and isinstance(parent, list):
        parent.append(copy.deepcopy(rng.choice(parent)))
    else:
        parent[key] = copy.deepcopy(rng.choice(VALUES))
    return d


def assert_clean(out, verify, what):
    try:
        load_quietly(out, verify)
    except PackedWeightsError as e:
        assert str(e), what
    except Exception as e:  # noqa: BLE001 - the point of the test
        raise AssertionError(f"{what}: {type(e).__name__}: {e}") from e


@pytest.mark.parametrize("layout,cases", [("merged", 1500), ("kt-folders", 300)])
def test_fuzz_manifest(outputs, tmp_path, layout, cases):
    out = tmp_path / "out"
    shutil.copytree(outputs[layout], out)
    text = (out / MANIFEST_FILE).read_text()
    base = json.loads(text)
    rng = random.Random(f"manifest-{layout}")
    for case in range(cases):
        r = rng.random()
        if r < 0.1:  # damaged text
            i = rng.randrange(len(text))
            new = text[:i] if rng.random() < 0.5 else text[:i] + rng.choice('{}[]",:0x\x00') + text[i + 1:]
            what = f"case {case}: text damaged at {i}"
        else:
            d = base
            for _ in range(1 if r < 0.7 else rng.randint(2, 5)):
                d = mutate_json(d, rng)
            new = json.dumps(d)
            what = f"case {case}: {new[:300]}"
        (out / MANIFEST_FILE).write_text(new)
        assert_clean(out, rng.random() < 0.3, what)


def header_of(data):
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n])


def mutate_header(data, rng):
    n, h = header_of(data)
    r = rng.random()
    if r < 0.3:  # raw bytes of the header (its length prefix included)
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(8 + n)] = rng.randrange(256) if rng.random() < 0.2 else rng.choice(b'0123456789"{}[],: ')
        return bytes(b)
    if r < 0.4:  # truncated or extended file
        return data[:rng.randrange(len(data))] if rng.random() < 0.7 else data + b"\0" * rng.randint(1, 100)
    keys = [k for k in h if k != "__metadata__"]
    key = rng.choice(keys)
    entry = h[key]
    r = rng.random()
    if r < 0.1:
        del h[key]
    elif r < 0.2:
        entry["dtype"] = rng.choice(["F32", "I8", "U8", "BF16", "F16", "I64", "F8_E8M0", "XX", 3])
    elif r < 0.35:
        entry["shape"] = rng.choice([[], [0], [1], [entry["shape"][0] - 1], [entry["shape"][0] + 1], [2, -1],
                                     [entry["shape"][0] // 2, 2], ["1"], None, [10**12]])
    elif r < 0.55:
        b, e = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[b, e - 1], [b + 1, e + 1], [b - 64, e - 64], [e, b], [b], None,
                                            [b, e + 10**12], [0, e - b], [-1, e]])
    elif r < 0.65:  # swap the places of two tensors
        other = rng.choice(keys)
        entry["data_offsets"], h[other]["data_offsets"] = h[other]["data_offsets"], entry["data_offsets"]
    elif r < 0.75:  # rename a tensor
        h[rng.choice([key.replace(".0.", ".5."), key.replace("numa.1", "numa.9"), key + "x",
                      key.replace("blk.1", "blk.0"), "blk.1.ffn_up_exps.99999999.numa.0.scale"])] = h.pop(key)
    elif r < 0.9:
        meta = h.setdefault("__metadata__", {})
        field = rng.choice(["layer", "quant_method", "num_experts", "hidden_size", "threadpool_count", "format",
                            "kt_format_version", "source_sha256"])
        meta[field] = rng.choice(["", "0", "1", "int8", "x", "999"])
        if rng.random() < 0.1:
            h["__metadata__"] = rng.choice([[], {"a": 1}, None])
    else:
        h[key] = rng.choice([None, [], "x", {"dtype": "I8"}])
    raw = json.dumps(h, separators=(",", ":")).encode()
    if len(raw) <= n and rng.random() < 0.8:  # keep the file size (and so the manifest's size check) intact
        raw += b" " * (n - len(raw))
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


@pytest.mark.parametrize("with_manifest", [True, False])
def test_fuzz_shard_headers(outputs, tmp_path, with_manifest):
    out = tmp_path / "out"
    shutil.copytree(outputs["merged"], out)
    if not with_manifest:
        (out / MANIFEST_FILE).unlink()
    original = (out / SHARD1).read_bytes()
    rng = random.Random(f"headers-{with_manifest}")
    loaded = 0
    for case in range(700):
        data = mutate_header(original, rng)
        (out / SHARD1).write_bytes(data)
        try:
            n, h = header_of(data)
            what = f"case {case}: {json.dumps(h)[:400]}"
        except Exception:  # noqa: BLE001
            what = f"case {case}: undecodable header"
        assert_clean(out, False, what)
        try:
            load_quietly(out, verify=False)
            loaded += 1
        except PackedWeightsError:
            pass
    assert loaded < 350  # most mutations are caught (the rest touch only padding or unchecked metadata)


def test_fuzz_kt_folder_files(outputs, tmp_path):
    rng = random.Random("folders")
    for case in range(40):
        out = tmp_path / f"out{case}"
        shutil.copytree(outputs["kt-folders"], out)
        if rng.random() < 0.5:
            (out / MANIFEST_FILE).unlink()
        files = sorted(p for p in out.rglob("*.kt"))
        for _ in range(rng.randint(1, 3)):
            victim = rng.choice(files)
            if not victim.exists():
                continue
            r = rng.random()
            if r < 0.3:
                victim.unlink()
            elif r < 0.6:
                victim.write_bytes(victim.read_bytes()[:rng.randrange(victim.stat().st_size)])
            elif r < 0.8:
                victim.rename(victim.with_name(victim.name.replace("_1_", "_7_").replace("Byte", "0Byte")))
            else:
                data = bytearray(victim.read_bytes())
                data[rng.randrange(len(data))] ^= 0xFF
                victim.write_bytes(bytes(data))
        assert_clean(out, rng.random() < 0.5, f"case {case}")
        shutil.rmtree(out)
