"""One output directory written by several --shard processes at once (on one host or many).

Instead of the run-long lock of a single conversion:
- OUT/.kt_convert.lock is held for moments only: to set the directory up (the planned manifest, written
  once, by the first process) and to finalize it;
- each layer is converted under its claim (convert/claims.py: OUT/.kt_shards/claims/layer_L.claim);
- a committed layer is recorded in its own file, OUT/.kt_shards/done/layer_L.json (its LayerRecord, written
  atomically after the layer's files are renamed into place), never by rewriting the shared manifest;
- each shard count the processes use is recorded in OUT/.kt_shards/split_N.json (with the scheduler's task
  numbers), so that finalize can name the shards whose layers are missing;
- finalizing (the last shard to finish, or `convert-cpu-weights finalize OUT`) merges the records into
  kt_manifest.json, writes the index and the copied files, marks the manifest complete and removes
  OUT/.kt_shards: the directory then holds exactly what one process would have written.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

from kt_convert.kt_runtime.format import files, fsio
from kt_convert.kt_runtime.format.errors import ManifestError
from kt_convert.kt_runtime.format.manifest import LayerRecord, Manifest

from .claims import Claim, ClaimDir, Held
from .errors import UserError
from .output_dir import SHARD_DIR
from .shards import ShardSpec, TaskIds, shards_holding
from .units import plural

RECORD = re.compile(r"^layer_(\d+)\.json$")
RECORD_MAX_BYTES = 1 << 24  # a kt-folders layer lists a few thousand file names
SPLIT = re.compile(r"^split_(\d{1,6})\.json$")
SPLIT_MAX_BYTES = 1 << 12


class SharedOutput:
    def __init__(self, out: Path):
        self.out = out
        self.root = out / SHARD_DIR
        self.done_dir = self.root / "done"
        fsio.real_dir(self.root)  # every level a real directory: never through a planted link
        fsio.real_dir(self.done_dir)
        self.claims = ClaimDir(self.root / "claims")

    def claim(self, layer: int) -> Claim | Held:
        return self.claims.acquire(layer)

    def record_split(self, spec: ShardSpec) -> None:
        """Notes that processes split the layers into spec.count shards (the first of them to get here writes it)."""
        path = self.root / f"split_{spec.count}.json"
        if fsio.entry(path) is None:
            tasks = asdict(spec.tasks) if spec.tasks is not None else None
            fsio.atomic_write_text(path, json.dumps({"count": spec.count, "tasks": tasks}) + "\n")

    def record(self, rec: LayerRecord) -> None:
        fsio.atomic_write_text(self.done_dir / f"layer_{rec.layer}.json", json.dumps(rec.to_dict()) + "\n")

    def drop_record(self, layer: int) -> None:
        fsio.remove(self.done_dir / f"layer_{layer}.json")

    def records(self, manifest: Manifest) -> dict[int, LayerRecord]:
        return read_records(self.out, manifest)


def read_records(out: Path, manifest: Manifest) -> dict[int, LayerRecord]:
    """The layers recorded done under OUT/.kt_shards (none when there is no such folder), each checked as
    the manifest checks its own records."""
    done_dir = out / SHARD_DIR / "done"
    if not fsio.real_dir(out / SHARD_DIR, create=False) or not fsio.real_dir(done_dir, create=False):
        return {}
    found = {}
    for name in fsio.list_dir(done_dir):
        m = RECORD.match(name)
        if m is None:
            continue
        path = done_dir / name
        try:
            d = files.read_json(path, files.SHARED, what="layer record", max_bytes=RECORD_MAX_BYTES)
            if not isinstance(d, dict):
                raise TypeError("not a JSON object")
            rec = LayerRecord(**d)
        except FileNotFoundError:
            continue  # dropped meanwhile by the shard that found its layer damaged
        except TypeError as e:
            raise UserError(f"{path}: not a layer record ({e}); {files.SHARED.fix}") from None
        if rec.layer != int(m[1]):
            raise UserError(f"{path}: a record of layer {rec.layer}; delete it (that layer is converted again)")
        found[rec.layer] = rec
    probe = Manifest(**{**manifest.__dict__, "completed": {**manifest.completed, **found}, "complete": False})
    try:
        probe.check(str(done_dir))
    except ManifestError as e:
        raise UserError(f"{e}; delete the record named (that layer is converted again)") from None
    return found


def check_no_live_shards(out: Path) -> None:
    """A single-process run refuses a directory while --shard processes hold claims there (it may resume
    one they started: their recorded layers count as completed, convert.pipeline)."""
    claims = out / SHARD_DIR / "claims"
    if not fsio.real_dir(out / SHARD_DIR, create=False) or not fsio.real_dir(claims, create=False):
        return
    held = ClaimDir(claims, create=False).live_holders()
    if held:
        raise UserError(f"{out} is being written by --shard processes ({held[0].path.name}: {held[0].describe()}); "
                        "run this with --shard too, or wait for them to finish")


def read_splits(out: Path) -> list[tuple[int, TaskIds | None]]:
    """(shard count, the scheduler's task numbers) of every split recorded under OUT/.kt_shards; a record
    that does not read as one is left out (it only serves messages)."""
    root = out / SHARD_DIR
    if fsio.entry(root, fsio.DIR) is None:
        return []
    found = []
    for name in fsio.list_dir(root):
        m = SPLIT.match(name)
        if m is None:
            continue
        try:  # a record: absent, unreadable or malformed reads as None
            d = files.read_json(root / name, files.RECORD, what="split record", max_bytes=SPLIT_MAX_BYTES)
            tasks = d["tasks"]
            tasks = None if tasks is None else TaskIds(str(tasks["name"]), int(tasks["first"]), int(tasks["step"]))
            if d["count"] != int(m[1]) or (tasks is not None and tasks.step < 1):
                continue
        except (TypeError, ValueError, KeyError, OSError):
            continue
        found.append((int(m[1]), tasks))
    return sorted(found, key=lambda s: s[0])


def missing_layers_message(out: Path, missing: list[int], layers: list[int] | None = None,
                           splits: list[tuple[int, TaskIds | None]] = ()) -> str:
    """What finalize says when layers are missing: which, and the shards that hold them (layers: every layer
    of the output in plan order; splits: from read_splits)."""
    shown = ", ".join(str(x) for x in missing[:20]) + (", ..." if len(missing) > 20 else "")
    text = f"{out} is not complete: {plural(len(missing), 'layer')} not converted yet ({shown})"
    shards = []
    for count, tasks in splits if layers is not None else ():
        indices = shards_holding(layers, missing, count)
        names = ", ".join(f"--shard {i + 1}/{count}" for i in indices[:20]) + (", ..." if len(indices) > 20 else "")
        shards.append(names + (f" ({tasks.of(indices[:20])})" if tasks is not None else ""))
    if not shards:
        return (text + "; their shards are still running or were stopped: re-run those shards (a re-run converts "
                "only unfinished layers), then finalize")
    return (text + f"; re-run {' or '.join(shards)} once no process of theirs runs (a re-run converts only "
            "unfinished layers), then finalize")
