"""Converting while downloading: a hub model opened from its remote headers, its shards fetched by
huggingface_hub in the order the layers need them, a layer read as soon as its shards are present
(convert.layer_io.LayerReader waits here), shards removed once no unconverted layer needs them
(--delete-source-after-use, --max-source-disk), and everything resumable after a kill.

- Only what the conversion reads is fetched: config, tokenizer files, the index and the shards
  holding routed experts (every shard with --include-non-expert).
- A shard not yet on disk is a PendingFile: a SafetensorsFile built from the header the hub serves
  (two range requests); reading it waits for its download, then reads the real file, whose header
  must match.
- Downloads are huggingface_hub's hf_hub_download into the normal cache (blobs/, snapshots/, refs/),
  --download-workers at a time on background threads, in layer order, ahead of the conversion as far
  as the disk cap allows. huggingface_hub resumes a broken connection within a download (Range);
  a download killed with its process is started again by the next run (huggingface_hub 2.x writes
  each download to a process-private partial file that it never reuses: those of killed runs are
  removed here).
- An LFS shard this run downloads is hashed (sha256) against the hub's record: a mismatch is
  downloaded once more, then the run stops (exit 2) naming the file. A shard once verified is
  recorded and never hashed or fetched again.
- The files kt-convert downloaded are recorded in the repository's cache folder
  (kt-convert-downloads.json) before their download starts: only those are ever deleted, never a
  file that was in the cache before.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kt_convert.kt_runtime.format import files as file_roles
from kt_convert.kt_runtime.format import fsio
from kt_convert.kt_runtime.format.digest import file_sha256
from kt_convert.kt_runtime.format.errors import FixableError
from kt_convert.kt_runtime.format.hub_cache import RepoCache, etag_problem, revision_problem, sha256_problem
from kt_convert.kt_runtime.format.input_files import CONFIG_MAX_BYTES, relative_name_problem, resolve_inside
from kt_convert.kt_runtime.format.json_fields import is_int
from kt_convert.kt_runtime.format.safetensors_file import SafetensorsFile
from kt_convert.kt_runtime.format.verified import file_key

from . import hub, units
from .errors import UserError
from .families import detect_family
from . import preflight
from .source import (COPIED_FILES, INDEX_NAME, Checkpoint, SourceGate, _check_copied_files, _read_json_object,
                     hub_cache_dir)

STATE_NAME = "kt-convert-downloads.json"


class PendingFile(SafetensorsFile):
    """A shard known from its remote header: its tensors and size now, its bytes once downloaded."""

    def __init__(self, path: Path, metadata: dict, tensors: dict, size: int, gate: ShardDownloader):
        self.path = Path(path)
        self.metadata = metadata
        self.tensors = tensors
        self.size = size
        self.mtime_ns = 0
        self._mmap = None
        self._fd = -1
        self._closed = False
        self._real: SafetensorsFile | None = None
        self._gate = gate
        self.deleted = False

    @property
    def present(self) -> bool:
        return self._real is not None

    def attach(self) -> None:
        """Opens the downloaded file; its header must be the one planned from."""
        real = SafetensorsFile(self.path)
        if real.tensors != self.tensors or real.size != self.size:
            real.close()
            raise UserError(f"{self.path}: the downloaded file's header differs from the one the hub served at the "
                            "start of this run (the repository changed?); re-run with --overwrite")
        self._real = real

    def read_into(self, offset: int, out) -> None:
        if self._real is None:
            self._gate.wait_for(self)
        self._real.read_into(offset, out)

    def check_unchanged(self) -> None:
        if self._real is not None and not self.deleted:
            self._real.check_unchanged()

    def drop(self) -> None:
        """Closes the file before it is deleted from the cache."""
        self.deleted = True
        real, self._real = self._real, None
        if real is not None:
            real.close()

    def close(self) -> None:
        self._closed = True
        if self._real is not None:
            self._real.close()


@dataclass
class HubCheckpoint(Checkpoint):
    """A checkpoint read from a hub repository at one commit, some shards still to download."""

    remote: hub.RemoteRepo | None = None

    def fingerprint(self) -> dict:
        """The hub's identity of the files (name, size, sha256 and header), stable across downloads,
        deletions and re-downloads: a resume from the same commit matches."""
        listing = []
        for name in sorted(self.files):
            f = self.files[name]
            header = json.dumps({k: [v.dtype, list(v.shape), v.offset, v.nbytes] for k, v in f.tensors.items()},
                                sort_keys=True).encode()
            rf = self.remote.files.get(name)
            listing.append({"name": name, "size": f.size, "sha256": rf.etag if rf else None,
                            "header_sha256": hashlib.sha256(header).hexdigest()})
        digest = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
        return {"files": listing, "fingerprint": digest,
                "hub": {"repo": self.remote.repo_id, "commit": self.remote.commit, "endpoint": self.remote.endpoint}}

    def close(self) -> None:
        super().close()
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()


STATE_MAX_BYTES = 16 << 20


@dataclass
class _State:
    """kt-convert-downloads.json in the repository's cache folder: the blobs (by etag) kt-convert
    downloaded, and those it verified with the key (size, mtime, inode, device) of the blob it hashed.
    A record: read without following a link, capped; an entry of the wrong form is dropped, a record
    that cannot be read at all counts as empty (and is written again)."""

    path: Path
    downloaded: dict[str, str] = field(default_factory=dict)  # etag -> file name
    verified: dict[str, list[int]] = field(default_factory=dict)  # sha256 -> file_key of the blob hashed

    @classmethod
    def load(cls, path: Path) -> _State:
        data = file_roles.read_json(path, file_roles.RECORD, what="download record", max_bytes=STATE_MAX_BYTES)
        state = cls(path)
        if not isinstance(data, dict):
            return state
        downloaded, verified = data.get("downloaded"), data.get("verified")
        if isinstance(downloaded, dict):
            state.downloaded = {e: n for e, n in downloaded.items()
                                if etag_problem(e) is None and relative_name_problem(n) is None}
        if isinstance(verified, dict):
            state.verified = {h: k for h, k in verified.items() if sha256_problem(h) is None and isinstance(k, list)
                              and len(k) == 4 and all(is_int(x) for x in k)}
        return state

    def save(self) -> None:
        fsio.atomic_write_text(self.path, json.dumps({"downloaded": self.downloaded, "verified": self.verified},
                                                     indent=1, sort_keys=True) + "\n")

    def is_verified(self, sha256: str, path: Path) -> bool:
        try:
            return self.verified.get(sha256) == file_key(path)
        except OSError:
            return False


class ShardDownloader(SourceGate):
    """The source gate of a HubCheckpoint: fetches its shards on `workers` background threads, in the order
    of the layers still to convert (schedule), a shard someone waits for first (wait_for); deletes a shard
    this tool downloaded once every layer needing it is committed (layer_committed), when asked to."""

    holds_every_file = False

    def __init__(self, remote: hub.RemoteRepo, cache: Path, snapshot: Path, delete_after_use: bool,
                 max_source_disk: int | None, note, workers: int):
        self.remote = remote
        self.cache = cache
        self.snapshot = snapshot
        self.repo = RepoCache(cache, remote.repo_id)
        self.delete_after_use = delete_after_use or max_source_disk is not None
        self.max_source_disk = max_source_disk
        self.note = note
        self.workers = max(1, workers)
        self.files: dict[str, PendingFile] = {}
        self.state = _State.load(self.repo.record_path(STATE_NAME))
        self._cond = threading.Condition()
        self._order: list[str] = []  # shards in the order the remaining layers need them
        self._demanded: list[str] = []
        self._users: dict[str, set[int]] = {}  # shard -> layers still to commit that read it
        self._pinned: set[str] = set()  # never deleted during the run (non-expert tensors read at the end)
        self._held = 0  # bytes of shards this tool downloaded that are on disk now
        self._error: FixableError | None = None
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._active: set[str] = set()  # being downloaded or checked now
        self._checks: queue.Queue = queue.Queue()  # downloaded, to be hashed and opened
        self.peak_held = 0
        self.downloaded_bytes = 0
        self.dry_run = False  # --dry-run: nothing may be downloaded
        self.plan: DownloadPlan | None = None  # what open_hub_checkpoint found to fetch

    # -- set-up ---------------------------------------------------------------------------------

    def ours(self, name: str) -> bool:
        etag = self.remote.files[name].etag
        return etag is not None and self.state.downloaded.get(etag) == name

    def add(self, f: PendingFile) -> None:
        self.files[f.path.name] = f
        if f.present and self.ours(f.path.name):
            self._held += f.size

    def schedule(self, layer_files: list[tuple[int, set[str]]], pinned: set[str] = frozenset()) -> None:
        """The layers still to convert, in order, with the shards each reads; starts downloading."""
        with self._cond:
            self._users = {}
            for layer, names in layer_files:
                for n in names:
                    self._users.setdefault(n, set()).add(layer)
            self._pinned = set(pinned)
            self._order = [n for _, names in layer_files for n in sorted(names)]
            self._order = list(dict.fromkeys(self._order))
            for name, f in self.files.items():  # left over from a run killed before it could delete them
                if name not in self._users and name not in self._pinned:
                    self._maybe_delete(name)
            self.check_cap(layer_files)
            self._cond.notify_all()
        self._start()

    def peak_source_bytes(self, layer_files: list[tuple[int, set[str]]]) -> int:
        """Source bytes this run puts on disk at most: the cap, or every shard still to download."""
        names = {n for _, ns in layer_files for n in ns} | self._pinned
        total = sum(self.files[n].size for n in names if not self.files[n].present)
        return total if self.max_source_disk is None else min(total, self.max_source_disk)

    def check_cap(self, layer_files: list[tuple[int, set[str]]]) -> None:
        """Refuses a cap smaller than what one layer needs on disk at once."""
        if self.max_source_disk is None:
            return
        for layer, names in layer_files:
            need = sum(self.files[n].size for n in names if not (self.files[n].present and not self.ours(n)))
            if need > self.max_source_disk:
                raise UserError(f"--max-source-disk {self.max_source_disk / 1e9:.2f} GB is too small: layer {layer} "
                                f"reads {len(names)} shards of {need / 1e9:.2f} GB together; raise it to at least "
                                f"{-(-need // 10**7) / 100:.2f}")

    def preflight(self, layer_files: list[tuple[int, set[str]]], out: Path, out_bytes: int) -> str:
        peak = self.peak_source_bytes(layer_files)
        preflight.check_source_disk(peak, self.cache, out, out_bytes)
        return preflight.describe_source(peak, self)

    def plan_facts(self, layer_files: list[tuple[int, set[str]]]) -> dict:
        return {"peak_source_bytes": self.peak_source_bytes(layer_files),
                "delete_source_after_use": self.delete_after_use,
                "download": self.plan.to_dict(), "download_text": self.plan.describe()}

    def _start(self) -> None:
        if not self._threads:
            checker = threading.Thread(target=self._check_loop, name="kt-download-check", daemon=True)
            checker.start()
            self._threads.append(checker)
            for i in range(self.workers):
                t = threading.Thread(target=self._run, name=f"kt-download-{i}", daemon=True)
                t.start()
                self._threads.append(t)

    # -- the conversion's side ------------------------------------------------------------------

    def wait_for(self, f: PendingFile) -> None:
        """Blocks until `f` is downloaded (asking for it first), or raises the download's error."""
        name = f.path.name
        if self.dry_run:
            raise UserError(f"--dry-run: planning {self.remote.spec} reads tensor data from {name}, which is not in "
                            "the cache; run without --dry-run (or download that file first)")
        with self._cond:
            if not f.present and name not in self._demanded:
                self._demanded.append(name)
                self._cond.notify_all()
            self._start()
            while not f.present:
                if self._error is not None:
                    raise self._error
                if self._threads and not any(t.is_alive() for t in self._threads):
                    raise UserError(f"{self.remote.spec}: the download threads stopped before {name} was "
                                    "downloaded; re-run the same command to resume")
                if self._closed:
                    raise UserError(f"{f.path}: the download was stopped")
                if f.deleted:
                    raise RuntimeError(f"{name} was deleted while still needed")
                self._cond.wait(1.0)

    def layer_committed(self, layer: int) -> None:
        with self._cond:
            for name, users in self._users.items():
                if layer in users:
                    users.discard(layer)
                    if not users and name not in self._pinned:
                        self._maybe_delete(name)
            self._cond.notify_all()

    def finished(self) -> None:
        """The output is complete: shards kept for its last step (non-expert tensors) may go too."""
        with self._cond:
            for name in list(self.files):
                self._maybe_delete(name)

    def _maybe_delete(self, name: str) -> None:
        f = self.files[name]
        if not self.delete_after_use or not f.present or not self.ours(name):
            return
        f.drop()
        etag = self.remote.files[name].etag
        self.repo.remove_download(self.remote.commit, name, etag)
        self._held -= f.size
        if self.state.verified.pop(etag, None) is not None:  # a later download of it is checked again
            self.state.save()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        # the thread may be inside a download: it is a daemon and stops with the process; the cache
        # keeps its .incomplete blob, which the next run resumes

    # -- the download thread --------------------------------------------------------------------

    def _next(self) -> str | None:
        for name in self._demanded + self._order:
            f = self.files.get(name)
            if f is not None and not f.present and not f.deleted and name not in self._active \
                    and (name in self._demanded or self._users.get(name)):
                return name
        return None

    def _run(self) -> None:
        try:
            self._download_loop()
        except BaseException as e:  # noqa: BLE001 - whatever stops this thread reaches the waiting run
            self._failed(None, e)

    def _download_loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed or self._error is not None:
                        return
                    name = self._next()
                    if name is not None:
                        size = self.files[name].size
                        # a shard the reader waits for waits for the cap too: the layer before
                        # it commits on its own thread, and its shards' removal frees the room
                        fits = self.max_source_disk is None or self._held == 0 \
                            or self._held + size <= self.max_source_disk
                        if fits:
                            break
                    self._cond.wait(1.0)
                etag = self.remote.files[name].etag
                self._held += size
                self._active.add(name)
                self.peak_held = max(self.peak_held, self._held)
            started = time.perf_counter()
            try:
                with self._cond:
                    if self.state.downloaded.get(etag) != name:
                        self.state.downloaded[etag] = name
                        self.state.save()  # recorded before the first byte: a killed run's blob is still ours
                self._remove_stale_partials(etag)
                path = hub.download_file(self.remote, name, self.cache)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting conversion
                self._failed(name, e)
                return
            # hashed on the checker thread while this one fetches the next shard: the link stays busy
            self._checks.put((name, path, started))

    def _failed(self, name: str | None, e: BaseException) -> None:
        """Hands a worker's failure to the waiting conversion (exit 2 with its cause), once."""
        with self._cond:
            if name is not None and name in self._active:
                self._held -= self.files[name].size
                self._active.discard(name)
            if self._error is None:
                what = f"downloading {name}" if name is not None else "a download thread"
                self._error = e if isinstance(e, FixableError) else UserError(
                    f"{self.remote.spec}: {what} failed ({type(e).__name__}: {e}); downloaded files "
                    "and converted layers are kept: re-run the same command to resume")
            self._cond.notify_all()

    def _check_loop(self) -> None:
        name = None
        try:
            while True:
                name, path, started = self._checks.get()
                self._verify_and_attach(name, path)
                if not self._closed:  # a run that stops says why last
                    self.note(f"downloaded {name} ({units.size(self.files[name].size)}, "
                              f"{time.perf_counter() - started:.1f} s)")
                with self._cond:
                    self._active.discard(name)
                    if name in self._demanded:
                        self._demanded.remove(name)
                    self.downloaded_bytes += self.files[name].size
                    self._cond.notify_all()
                name = None
        except BaseException as e:  # noqa: BLE001 - handed to the waiting conversion
            self._failed(name, e)

    def _remove_stale_partials(self, etag: str) -> None:
        """Partial downloads of a file kt-convert fetches, left by a killed run: huggingface_hub writes
        each download to a process-unique <etag>.<id>.incomplete and never reuses one, so they only
        hold disk. Removed under huggingface_hub's own lock of that file (skipped while another
        process holds it: that one is downloading)."""
        partials = self.repo.partial_downloads(etag)
        if not partials:
            return
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.cache / ".locks" / self.repo.path.name / f"{etag}.lock"))
        try:
            lock.acquire(timeout=0)
        except (Timeout, OSError):
            return
        try:
            for p in partials:
                self.repo.remove_entry(p)
        finally:
            lock.release()

    def _verify_and_attach(self, name: str, path: Path) -> None:
        """Checks a downloaded shard's sha256 against the hub's record (a mismatch: removed, downloaded
        once more, then refused), then opens it for the reader."""
        rf = self.remote.files[name]
        for attempt in (1, 2):
            if attempt == 2:
                path = hub.download_file(self.remote, name, self.cache)
            if rf.sha256 is None or self.state.is_verified(rf.sha256, path):
                break
            got = file_sha256(path)
            if got == rf.sha256:
                with self._cond:
                    self.state.verified[rf.sha256] = file_key(path)
                    self.state.save()
                break
            self.repo.remove_download(self.remote.commit, name, rf.etag)
            if attempt == 2:
                raise UserError(f"{self.remote.spec}: {name} was downloaded twice from {self.remote.endpoint} and its "
                                f"sha256 ({got}) is not the hub's ({rf.sha256}) either time: the server or the network "
                                "damages it. Nothing damaged is kept; converted layers are kept: re-run later to resume")
            self.note(f"{name}: sha256 does not match the hub's record; downloading it again")
        self.files[name].attach()


# -- opening ------------------------------------------------------------------------------------


@dataclass
class DownloadPlan:
    """What a hub input needs: the shards the conversion reads, which are present, the bytes to fetch."""

    repo: hub.RemoteRepo
    needed: list[str]
    present: list[str]
    to_download: list[str]
    small_files: list[str]

    @property
    def download_bytes(self) -> int:
        return sum(self.repo.files[n].size for n in self.to_download)

    def describe(self) -> str:
        lines = [f"download from {self.repo.endpoint}: {self.repo.repo_id} at {self.repo.commit[:12]}: "
                 f"{len(self.to_download)} of {len(self.needed)} shards to fetch ({units.size(self.download_bytes)}), "
                 f"{len(self.present)} already in the cache"]
        lines += [f"  {n} ({units.size(self.repo.files[n].size)})" for n in self.to_download]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"endpoint": self.repo.endpoint, "repo": self.repo.repo_id, "revision": self.repo.revision,
                "commit": self.repo.commit, "needed": list(self.needed), "present": list(self.present),
                "to_download": [{"name": n, "size": self.repo.files[n].size} for n in self.to_download],
                "download_bytes": self.download_bytes}


def _weight_map(root: Path, names: set[str]) -> dict[str, str] | None:
    if INDEX_NAME not in names:
        return None
    index = _read_json_object(root, INDEX_NAME, "safetensors index", 1 << 30)
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise UserError(f"{root / INDEX_NAME}: weight_map must map tensor names to file names; the repository's "
                        "index is damaged")
    return wm


def needed_shards(config: dict, weight_map: dict[str, str] | None, shard_names: list[str],
                  include_non_expert: bool) -> list[str]:
    """The shards the conversion reads: those holding routed-expert tensors (all with
    --include-non-expert, or when there is no index to tell)."""
    if weight_map is None or include_non_expert:
        return sorted(set(weight_map.values()) if weight_map else shard_names)
    from .plan import text_config

    model_type = text_config(config).get("model_type") or config.get("model_type")
    family = detect_family(model_type, weight_map)
    if family is None:
        return sorted(set(weight_map.values()))  # the plan reports the unknown family
    return sorted({name for key, name in weight_map.items() if family.match_expert(key)})


def open_hub_checkpoint(repo_id: str, revision: str | None, *, include_non_expert: bool, delete_after_use: bool,
                        max_source_disk: int | None, dry_run: bool, note,
                        workers: int) -> tuple[HubCheckpoint, DownloadPlan]:
    """The checkpoint of a hub model: small files fetched into the cache (a temporary one for a dry
    run), shard headers from the cache or the hub, a ShardDownloader for the shards still missing."""
    cache = hub_cache_dir()
    if revision is not None and revision_problem(revision) is not None:  # it becomes refs/<revision>
        raise UserError(f"{repo_id}@{revision}: {revision_problem(revision)}; pass a branch, tag or commit after @")
    if hub.offline():
        return _open_offline(repo_id, revision, cache, include_non_expert)
    remote = hub.open_remote(repo_id, revision)
    small = [n for n in (*COPIED_FILES, INDEX_NAME) if n in remote.files]
    if "config.json" not in remote.files:
        raise UserError(f"{remote.spec} at {remote.endpoint} has no config.json: not a model checkpoint")
    small_cache = cache
    tmp = None
    if dry_run:  # writes nothing: the small files go to a temporary cache
        tmp = file_roles.temporary_dir("kt-dry-run-")
        small_cache = Path(tmp.name)
    try:
        for n in small:
            path = hub.download_file(remote, n, small_cache, revision=remote.revision or "main")
        root = path.parent
        if root.name != remote.commit:
            raise UserError(f"{remote.spec} moved to another commit while this run started ({remote.commit[:12]} -> "
                            f"{root.name[:12]}); re-run")
        repo = RepoCache(cache, repo_id)
        snapshot = repo.snapshot(remote.commit)
        config = _read_json_object(root, "config.json", "config.json", CONFIG_MAX_BYTES)
        _check_copied_files(root)
        shard_names = sorted(n for n in remote.files if n.endswith(".safetensors") and "/" not in n)
        wm = _weight_map(root, set(remote.files))
        if wm is not None:
            missing = sorted(set(wm.values()) - set(remote.files))
            if missing:
                raise UserError(f"{remote.spec}: its index {INDEX_NAME} names {missing[0]}, which the repository does not hold "
                                f"({len(missing)} such files); the repository is incomplete")
        needed = needed_shards(config, wm, shard_names, include_non_expert)
        if not needed:
            raise UserError(f"{remote.spec}: no .safetensors files in the repository")
        gate = ShardDownloader(remote, cache, snapshot, delete_after_use, max_source_disk, note, workers)
        gate.dry_run = dry_run
        files = {}
        present, todo = [], []
        try:
            for name in needed:
                path = repo.snapshot_file(remote.commit, name)
                if hub.file_size_or_none(path) == remote.files[name].size:
                    resolve_inside(snapshot, name)  # a cached file is read only inside the repository folder
                    f = PendingFile(path, {}, {}, remote.files[name].size, gate)
                    real = SafetensorsFile(path)
                    f.metadata, f.tensors, f._real = real.metadata, real.tensors, real
                    present.append(name)
                else:
                    metadata, tensors = hub.remote_header(remote, name)
                    f = PendingFile(path, metadata, tensors, remote.files[name].size, gate)
                    todo.append(name)
                files[name] = f
                gate.add(f)
        except BaseException:
            for f in files.values():
                f.close()
            raise
        key_file = {}
        for name, f in files.items():
            for key in f.tensors:
                if key in key_file:
                    raise UserError(f"{remote.spec}: tensor {key} is in two files ({key_file[key]} and {name})")
                key_file[key] = name
        ckpt = HubCheckpoint(root if dry_run else snapshot, config, files, key_file, [], remote=remote, gate=gate)
        if tmp is not None:
            ckpt._tmp = tmp  # removed with the checkpoint
        gate.plan = DownloadPlan(remote, needed, present, todo, small)
        return ckpt, gate.plan
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        raise


def _cached_etag(snapshot: Path, name: str) -> tuple[str | None, str | None]:
    """(sha256, git blob id) of a cached file from the blob its snapshot entry links to (None where the
    entry is no link, or the link's target is not a blob name)."""
    if not os.path.islink(snapshot / name):
        return None, None
    target = os.path.basename(os.readlink(snapshot / name))
    if sha256_problem(target) is None:
        return target, None
    return None, target if etag_problem(target) is None else None


def _open_offline(repo_id: str, revision: str | None, cache: Path, include_non_expert: bool):
    """HF_HUB_OFFLINE=1: the model as the cache holds it, if every shard the conversion reads is there."""
    spec = repo_id + (f"@{revision}" if revision else "")
    repo = RepoCache(cache, repo_id)
    commit = hub.cached_commit(cache, repo_id, revision)
    snapshot = repo.snapshot(commit) if commit is not None else None
    if snapshot is None or not (snapshot / "config.json").is_file():
        raise UserError(f"{spec}: HF_HUB_OFFLINE=1 is set and the model is not in the cache {cache}; unset "
                        "HF_HUB_OFFLINE to download it (re-runs resume)")
    config = _read_json_object(snapshot, "config.json", "config.json", CONFIG_MAX_BYTES)
    names = set(fsio.list_dir(snapshot))
    wm = _weight_map(snapshot, names)
    needed = needed_shards(config, wm, sorted(n for n in names if n.endswith(".safetensors")), include_non_expert)
    missing = [n for n in needed if not (snapshot / n).is_file()]
    if missing:
        partial = [n for n in fsio.list_dir(repo.path / "blobs") if n.endswith(".incomplete")] \
            if (repo.path / "blobs").is_dir() else []
        raise UserError(f"{spec}: HF_HUB_OFFLINE=1 is set and {len(missing)} of the {len(needed)} shards this "
                        f"conversion reads are not in the cache {cache} (e.g. {', '.join(missing[:3])}"
                        f"{'; ' + str(len(partial)) + ' partly downloaded' if partial else ''}); unset HF_HUB_OFFLINE "
                        "to download them: the run resumes where it stopped")
    _check_copied_files(snapshot)
    remote_files = {}
    for name in sorted(names):
        real = resolve_inside(snapshot, name)  # never a file outside the repository folder
        sha, blob_id = _cached_etag(snapshot, name)
        remote_files[name] = hub.RemoteFile(name, os.stat(real).st_size, sha, blob_id)
    remote = hub.RemoteRepo(repo_id, revision, commit, hub.endpoint(), remote_files)
    files, key_file = {}, {}
    try:
        for name in needed:
            files[name] = SafetensorsFile(snapshot / name)
            for key in files[name].tensors:
                key_file[key] = name
    except BaseException:
        for f in files.values():
            f.close()
        raise
    ckpt = HubCheckpoint(snapshot, config, files, key_file, [], remote=remote)
    return ckpt, DownloadPlan(remote, needed, needed, [], [])
