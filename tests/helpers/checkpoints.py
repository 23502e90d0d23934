"""Edits of a synthetic checkpoint's files (the bad and hostile inputs' tests), and what a refused run must
not leave behind."""
from __future__ import annotations

import json

import pytest

from kt_convert import kt_runtime
from kt_convert.kt_runtime.format.names import INDEX_FILE, MANIFEST_FILE
from kt_convert.kt_runtime.format.safetensors_file import SafetensorsFile, save_file

from .outputs import read_json


def rewrite(ck, fn):
    """Apply fn(file name, {key: (dtype, shape, bytes)}) -> dict to every shard; keeps the index in step."""
    index = read_json(ck / INDEX_FILE)
    weight_map = {}
    for name in sorted(set(index["weight_map"].values())):
        f = SafetensorsFile(ck / name)
        tensors = {k: (f.tensors[k].dtype, f.tensors[k].shape, bytes(f.raw(k))) for k in f.keys()}
        meta = dict(f.metadata)
        f.close()
        tensors = fn(name, tensors)
        save_file(ck / name, tensors, meta)
        weight_map.update(dict.fromkeys(tensors, name))
    index["weight_map"] = dict(sorted(weight_map.items()))
    (ck / INDEX_FILE).write_text(json.dumps(index))


def drop(ck, pred):
    rewrite(ck, lambda name, t: {k: v for k, v in t.items() if not pred(k)})


def set_config(ck, **changes):
    cfg = read_json(ck / "config.json")
    cfg.update(changes)
    (ck / "config.json").write_text(json.dumps(cfg))


def assert_nothing_complete(out):
    """No index, no complete manifest, no half-written file with a final name."""
    if not out.exists():
        return
    assert not (out / INDEX_FILE).exists()
    if (out / MANIFEST_FILE).exists():
        manifest = read_json(out / MANIFEST_FILE)
        assert manifest["complete"] is False
        done = {f for rec in manifest["completed"].values() for f in rec["files"]}
        assert {p.name for p in out.glob("*.safetensors")} <= done
    assert not list(out.glob("*.tmp"))
    with pytest.raises(kt_runtime.PackedWeightsError):
        kt_runtime.load_experts(out)
