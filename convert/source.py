"""Finding and opening a checkpoint: local dir, single .safetensors file, or a hub id resolved
offline through the Hugging Face cache. Only headers are read here (tensors are read later with
pread, convert.source_reader). Every file the checkpoint names stays inside it and must be a
regular file (kt_runtime.format.input_files); JSON files are read with a size cap and typed checks."""
from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kt_convert.kt_runtime.format.errors import (FieldError, InputFileError, SafetensorsChangedError,
                                                 SafetensorsFormatError)
from kt_convert.kt_runtime.format.fsio import names_ending
from kt_convert.kt_runtime.format.hub_cache import RepoCache, revision_problem
from kt_convert.kt_runtime.format.input_files import (CONFIG_MAX_BYTES, INDEX_MAX_BYTES, check_regular, file_kind,
                                                      read_json, resolve_inside, size_text)
from kt_convert.kt_runtime.format.json_fields import describe, get_dict
from kt_convert.kt_runtime.format.safetensors_file import SafetensorsFile, TensorInfo

from .errors import UserError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
INDEX_NAME = "model.safetensors.index.json"
HF_QUANT_CONFIG = "hf_quant_config.json"  # ModelOpt's quantization record beside config.json (optional)
# Files copied next to the packed experts so the output directory describes its model.
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja",
                "added_tokens.json", "preprocessor_config.json")
COPIED_MAX_BYTES = 256 << 20  # tokenizer.json of real models: up to ~35 MB


class SourceGate:
    """What a run asks of its source files beyond reading them: a local checkpoint holds every file already,
    so each step here is a no-op; a hub download (convert.download.ShardDownloader) fetches the shards in
    the order of the layers to convert and removes those it fetched once their layers are committed.
    layer_files: (layer, the source files it reads) in conversion order (Checkpoint.layer_files)."""

    holds_every_file = True  # every source file is on disk before the run reads it (not so while downloading)

    def check_cap(self, layer_files: list[tuple[int, set[str]]]) -> None:
        """Refuses, before anything is written, a layer the source's disk cap cannot hold."""

    def preflight(self, layer_files: list[tuple[int, set[str]]], out: Path, out_bytes: int) -> str | None:
        """Refuses a source that cannot fit on its disk beside `out_bytes` of output in `out`; the
        pre-flight line that describes it (None: nothing to say)."""
        return None

    def plan_facts(self, layer_files: list[tuple[int, set[str]]]) -> dict:
        """The --dry-run summary's fields about fetching the source (convert.dry_run.PlanSummary)."""
        return {}

    def schedule(self, layer_files: list[tuple[int, set[str]]], pinned: set[str]) -> None:
        """The layers still to convert, in order; `pinned` files are read at the end (kept until finished)."""

    def layer_committed(self, layer: int) -> None:
        """The layer is safe on disk in every output: files no later layer reads may go."""

    def finished(self) -> None:
        """Every output is complete: the pinned files may go too."""

    def close(self) -> None:
        """Stops: a read still waiting for a file fails instead of waiting."""


@dataclass
class Checkpoint:
    root: Path
    config: dict  # config.json as written (text_config not unwrapped)
    files: dict[str, SafetensorsFile]  # by file name relative to root
    key_file: dict[str, str]  # tensor key -> file name
    # .safetensors files in the folder that the index does not name (a hint when tensors are missing)
    unindexed: list[str] = field(default_factory=list)
    hf_quant_config: dict | None = None  # hf_quant_config.json where the checkpoint has one
    gate: SourceGate = field(default_factory=SourceGate)  # a local checkpoint's: every file is there

    def info(self, key: str) -> TensorInfo:
        return self.files[self.key_file[key]].tensors[key]

    def file_of(self, key: str) -> SafetensorsFile:
        return self.files[self.key_file[key]]

    def read_tensor(self, key: str) -> np.ndarray:
        """A copy of a (small) tensor, read with pread: exit 2 naming the file if it shrank."""
        try:
            return self.file_of(key).read(key)
        except SafetensorsFormatError as e:
            raise source_changed(e) from None

    def check_unchanged(self) -> None:
        """Exit 2 naming a source file whose size or mtime changed since it was opened."""
        for f in self.files.values():
            try:
                f.check_unchanged()
            except SafetensorsFormatError as e:
                raise source_changed(e) from None

    def where(self, key: str) -> str:
        return str(self.root / self.key_file[key])

    @property
    def input_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def fingerprint(self) -> dict:
        """Names, sizes, modification times and header hashes of the source files, as they were
        when opened: changes whenever a file is rewritten, so that resume refuses a changed source."""
        listing = []
        for name in sorted(self.files):
            f = self.files[name]
            header = json.dumps({k: [v.dtype, list(v.shape), v.offset, v.nbytes] for k, v in f.tensors.items()},
                                sort_keys=True).encode()
            listing.append({"name": name, "size": f.size, "mtime_ns": f.mtime_ns,
                            "header_sha256": hashlib.sha256(header).hexdigest()})
        digest = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
        return {"files": listing, "fingerprint": digest}

    def layer_files(self, layers) -> list[tuple[int, set[str]]]:
        """(layer, the files its routed-expert tensors are in) for LayerPlans `layers`, in order."""
        from .plan import source_slabs  # plan imports this module

        return [(lp.layer, {self.key_file[s.key] for e in lp.experts for src in e.values() for s in source_slabs(src)})
                for lp in layers]

    def close(self) -> None:
        self.gate.close()
        for f in self.files.values():
            f.close()


def source_changed(e: SafetensorsFormatError) -> SafetensorsFormatError | UserError:
    """A source that shrank or changed during the run (or cannot be read): exit 2 naming it, with what to
    do about a changed one."""
    if isinstance(e, SafetensorsChangedError):
        return UserError(f"{e}. Wait until it is complete (e.g. a download still running), then re-run with "
                         "--overwrite: layers converted from the old contents cannot be kept")
    return e


def describe_source_change(before: dict, now: dict) -> str | None:
    """Which source files differ between two manifest `source` records, comparing the facts both
    recorded (None if none does: same files, or a fingerprint of another converter version)."""
    if before.get("fingerprint") == now.get("fingerprint"):
        return None
    old = {f.get("name"): f for f in before.get("files") or [] if isinstance(f, dict)}
    new = {f["name"]: f for f in now.get("files", [])}
    changes = [f"{n} is new" for n in sorted(new.keys() - old.keys())]
    changes += [f"{n} is gone" for n in sorted(old.keys() - new.keys(), key=str)]
    for n in sorted(new.keys() & old.keys()):
        diff = [k for k in ("size", "mtime_ns", "header_sha256") if k in old[n] and old[n][k] != new[n].get(k)]
        if diff:
            changes.append(f"{n} ({', '.join('modification time' if k == 'mtime_ns' else k for k in diff)})")
    if not changes:
        return None
    return "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")


IDENTITY_FACTS = ("size", "header_sha256")  # what a copy of the same files keeps (a modification time does not)


def source_identity_problem(recorded: dict, now: dict) -> str | None:
    """Why the files `now` describes (Checkpoint.fingerprint) are not the source files a manifest recorded
    (its `source`), comparing names, sizes and header hashes; None when they are (more files than
    recorded are fine: a download fetches only what it converts), or when nothing was recorded."""
    old = {f.get("name"): f for f in recorded.get("files") or [] if isinstance(f, dict)}
    old.pop(None, None)
    if not old:
        return None
    new = {f["name"]: f for f in now.get("files", [])}
    gone = sorted(old.keys() - new.keys(), key=str)
    if len(gone) == len(old):
        return f"it has none of the {len(old)} source files recorded (e.g. {gone[0]})"
    if gone:
        return f"it lacks {gone[0]}" + (f" and {len(gone) - 1} more recorded source files" if len(gone) > 1 else "")
    for name in sorted(old):
        differ = [k for k in IDENTITY_FACTS if k in old[name] and old[name][k] != new[name].get(k)]
        if differ:
            what = " and ".join("its header" if k == "header_sha256" else k for k in differ)
            return f"{name} differs in {what} from the file recorded"
    return None


def resolve_input(spec: str) -> Path:
    """A local directory or .safetensors file, or org/name[@rev] from the Hugging Face cache."""
    try:
        path = Path(spec).expanduser()
    except RuntimeError:  # ~user of a user this machine does not know
        raise UserError(f"input path {spec}: there is no such user's home directory here") from None
    if path.exists():
        return path
    m = HUB_ID.match(spec)
    if not m or spec.startswith((".", "/", "~")):
        raise UserError(f"input path {spec} does not exist")
    return resolve_hub_id(m["repo"], m["rev"])


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment at call time (huggingface_hub reads it
    once at import): HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return Path(os.path.expandvars(env[name])).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


HF_CLI_SINCE = (0, 34)  # huggingface_hub 0.34 added the `hf` command; 1.0 removed `huggingface-cli`


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        parts.append(int(digits or 0))
    return tuple(parts)


def hub_download_command() -> str:
    """The download command of the huggingface_hub here: `hf download`, or `huggingface-cli download`
    where only that one is on PATH (or, with neither on PATH, where huggingface_hub predates `hf`)."""
    if shutil.which("hf"):
        return "hf download"
    if shutil.which("huggingface-cli"):
        return "huggingface-cli download"
    try:
        installed = _version_tuple(importlib.metadata.version("huggingface_hub"))
    except importlib.metadata.PackageNotFoundError:
        return "hf download"
    return "hf download" if installed >= HF_CLI_SINCE else "huggingface-cli download"


def resolve_hub_id(repo: str, revision: str | None) -> Path:
    """The snapshot folder of a cached model, offline: never downloads. The snapshot's files are
    symlinks into blobs/ (or plain files where symlinks are unavailable); both are read through."""
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    cached = RepoCache(cache, repo)
    if revision is not None and revision_problem(revision) is not None:
        raise UserError(f"{repo}@{revision}: {revision_problem(revision)}; pass a branch, tag or commit after @")
    if os.path.lexists(cached.path / "refs" / (revision or "main")):
        cached.ref_commit(revision or "main")  # a reference that is no commit hash names no snapshot: refused
    try:
        folder = snapshot_download(repo, revision=revision, cache_dir=str(cache), local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError and friends: the hub's error classes vary by version
        rev = f" --revision {revision}" if revision else ""
        raise UserError(f"{repo}{'@' + revision if revision else ''} is neither a local path nor in the Hugging Face "
                        f"cache {cache} ({type(e).__name__}). Convert it while downloading with --download, or "
                        f"download it first:\n"
                        f"  {hub_download_command()} {repo}{rev}\n"
                        "(HF_HOME / HF_HUB_CACHE select the cache; add --local-dir DIR to get a plain folder and "
                        "pass that folder)") from None
    cached.check_snapshot(folder)  # wherever the cache's refs pointed it: inside the repository folder
    return Path(folder)


def _read_json_object(root: Path, name: str, what: str, max_bytes: int) -> dict:
    path = root / name
    try:
        resolve_inside(root, name)
        data = read_json(path, what=what, max_bytes=max_bytes)
    except FileNotFoundError:
        raise UserError(f"{path}: missing; a checkpoint needs its {what}") from None
    except InputFileError as e:
        fix = "" if str(e).endswith(("re-download it", "instead of linking it")) else f"; put the real {what} there (re-download it)"
        raise UserError(f"{e}{fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} must be a JSON object, found {describe(data)}; re-download it")
    return data


def _open(root: Path, name: str, named_by: str | None, contained: bool = True) -> SafetensorsFile:
    """contained: check that root/name stays inside the checkpoint (not for the file the user named)."""
    try:
        if contained:
            resolve_inside(root, name, named_by=named_by)
        return SafetensorsFile(root / name)
    except InputFileError as e:
        raise UserError(f"{e}; re-download the checkpoint or fix the link") from None


def _index_shards(root: Path, index_path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(tensor key -> shard name, shard name -> first key naming it) from the index, every value
    checked: a plain relative file name inside the checkpoint, present."""
    index = _read_json_object(root, INDEX_NAME, "safetensors index", INDEX_MAX_BYTES)
    try:
        weight_map = get_dict(index, "weight_map", str(index_path))
    except FieldError as e:
        raise UserError(f"{e}; re-download the index or delete it") from None
    if not weight_map:
        raise UserError(f"{index_path}: weight_map is empty; re-download the index or delete it")
    first_key: dict[str, str] = {}
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise UserError(f"{index_path}: weight_map[{describe(key)}] must be a file name, found {describe(name)}; "
                            "re-download the index or delete it")
        first_key.setdefault(name, key)
    for name, key in sorted(first_key.items()):
        try:
            real = resolve_inside(root, name, named_by=f"{index_path}: weight_map[{describe(key)}]")
        except InputFileError as e:
            raise UserError(f"{e}; re-download the index") from None
        if not os.path.lexists(root / name) or not real.exists():
            raise UserError(f"{index_path} names {name}, which is missing from {root}: "
                            "the download is incomplete; fetch the missing file")
    return weight_map, first_key


def _check_copied_files(root: Path) -> None:
    """The model files copied into the output (config, tokenizer, ...) must be regular files inside
    the checkpoint and of a sane size: checked now, before any work."""
    for name in COPIED_FILES:
        if not os.path.lexists(root / name):
            continue
        try:
            resolve_inside(root, name)
            st = check_regular(root / name, what=name)
        except FileNotFoundError:
            raise UserError(f"{root / name} is a symlink to a missing file; re-download it or delete it") from None
        except InputFileError as e:
            raise UserError(f"{e}; replace it with the real file or delete it") from None
        if st.st_size > COPIED_MAX_BYTES:
            raise UserError(f"{root / name} is {size_text(st.st_size)}, more than the {size_text(COPIED_MAX_BYTES)} "
                            f"allowed for a model file copied into the output; this is not a real {name}: "
                            "re-download it or delete it")


def open_checkpoint(spec: str) -> Checkpoint:
    path = resolve_input(spec)
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    index_keys: dict[str, str] | None = None
    first_key: dict[str, str] = {}
    unindexed: list[str] = []
    single_file = stat.S_ISREG(st.st_mode)
    if single_file:
        if path.suffix != ".safetensors":
            raise UserError(f"{path}: expected a directory or a .safetensors file")
        root, shard_names = path.parent, [path.name]
    elif stat.S_ISDIR(st.st_mode):
        root = path
        index_path = root / INDEX_NAME
        on_disk = names_ending(root, ".safetensors")
        if os.path.lexists(index_path):
            index_keys, first_key = _index_shards(root, index_path)
            shard_names = sorted(first_key)
            unindexed = sorted(set(on_disk) - set(shard_names))
        else:
            shard_names = on_disk
        if not shard_names:
            raise UserError(f"{root}: no .safetensors files found")
    else:
        raise UserError(f"{path} is {file_kind(st.st_mode)}; pass a checkpoint directory or a .safetensors file")
    config = _read_json_object(root, "config.json", "config.json", CONFIG_MAX_BYTES)
    hf_quant_config = (_read_json_object(root, HF_QUANT_CONFIG, HF_QUANT_CONFIG, CONFIG_MAX_BYTES)
                       if os.path.lexists(root / HF_QUANT_CONFIG) else None)
    _check_copied_files(root)
    files: dict[str, SafetensorsFile] = {}
    try:
        for name in shard_names:
            named_by = f"{root / INDEX_NAME}: weight_map[{describe(first_key[name])}]" if name in first_key else None
            files[name] = _open(root, name, named_by, contained=not single_file)
    except BaseException:
        for f in files.values():
            f.close()
        raise
    key_file: dict[str, str] = {}
    for name, f in files.items():
        for key in f.keys():
            if key in key_file:
                for g in files.values():
                    g.close()
                raise UserError(f"tensor {key} is in two files ({key_file[key]} and {name}) under {root}: "
                                "remove the stray copy")
            key_file[key] = name
    if index_keys is not None:
        wrong = [(k, n) for k, n in index_keys.items() if key_file.get(k) != n]
        if wrong:
            key, name = wrong[0]
            for g in files.values():
                g.close()
            where = f"it is in {key_file[key]}" if key in key_file else "no file holds it"
            raise UserError(f"{root / INDEX_NAME} says tensor {key} is in {name}, but {where} "
                            f"({len(wrong)} such entries): the index and the shards come from different downloads; "
                            "re-download them")
    return Checkpoint(root, config, files, key_file, unindexed, hf_quant_config)
