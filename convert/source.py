"""Finding and opening a checkpoint: local dir, single .safetensors file, or a hub id resolved
offline through the Hugging Face cache. Only headers are read here; tensors stay mapped."""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kt_runtime.safetensors_file import SafetensorsFile, SafetensorsFormatError, TensorInfo

from .errors import UserError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
INDEX_NAME = "model.safetensors.index.json"
# Files copied next to the packed experts so the output directory describes its model.
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja",
                "added_tokens.json", "preprocessor_config.json")


@dataclass
class Checkpoint:
    root: Path
    config: dict  # config.json as written (text_config not unwrapped)
    files: dict[str, SafetensorsFile]  # by file name relative to root
    key_file: dict[str, str]  # tensor key -> file name

    def info(self, key: str) -> TensorInfo:
        return self.files[self.key_file[key]].tensors[key]

    def array(self, key: str) -> np.ndarray:
        return self.files[self.key_file[key]].array(key)

    def release(self, key: str) -> None:
        self.files[self.key_file[key]].release(key)

    def where(self, key: str) -> str:
        return str(self.root / self.key_file[key])

    @property
    def input_bytes(self) -> int:
        return sum(f.path.stat().st_size for f in self.files.values())

    def fingerprint(self) -> dict:
        """Names, sizes and header hashes of the source files: changes whenever their content layout does."""
        listing = []
        for name in sorted(self.files):
            f = self.files[name]
            header = json.dumps({k: [v.dtype, list(v.shape), v.offset, v.nbytes] for k, v in f.tensors.items()},
                                sort_keys=True).encode()
            listing.append({"name": name, "size": f.path.stat().st_size,
                            "header_sha256": hashlib.sha256(header).hexdigest()})
        digest = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
        return {"files": listing, "fingerprint": digest}

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def resolve_input(spec: str) -> Path:
    """A local directory or .safetensors file, or org/name[@rev] from the Hugging Face cache."""
    path = Path(spec).expanduser()
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


def resolve_hub_id(repo: str, revision: str | None) -> Path:
    """The snapshot folder of a cached model, offline: never downloads. The snapshot's files are
    symlinks into blobs/ (or plain files where symlinks are unavailable); both are read through."""
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=str(cache), local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError and friends: the hub's error classes vary by version
        rev = f" --revision {revision}" if revision else ""
        raise UserError(f"{repo}{'@' + revision if revision else ''} is neither a local path nor in the Hugging Face "
                        f"cache {cache} ({type(e).__name__}). Download it first:\n"
                        f"  huggingface-cli download {repo}{rev}\n"
                        "(or `hf download`; HF_HOME / HF_HUB_CACHE select the cache; add --local-dir DIR to get a "
                        "plain folder and pass that folder)") from None


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; a checkpoint needs its {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read {what} ({e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: {what} is not valid JSON ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} must be a JSON object")
    return data


def _open(path: Path) -> SafetensorsFile:
    try:
        return SafetensorsFile(path)
    except SafetensorsFormatError as e:
        raise UserError(str(e)) from None


def open_checkpoint(spec: str) -> Checkpoint:
    path = resolve_input(spec)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"{path}: expected a directory or a .safetensors file")
        root, shard_names = path.parent, [path.name]
    else:
        root = path
        index_path = root / INDEX_NAME
        if index_path.exists():
            weight_map = _read_json(index_path, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{index_path}: has no weight_map; re-download the index or delete it")
            shard_names = sorted(set(weight_map.values()))
            for name in shard_names:
                if not (root / name).is_file():
                    raise UserError(f"{index_path} names {name}, which is missing from {root}: "
                                    "the download is incomplete; fetch the missing file")
        else:
            shard_names = sorted(p.name for p in root.glob("*.safetensors"))
        if not shard_names:
            raise UserError(f"{root}: no .safetensors files found")
    config = _read_json(root / "config.json", "config.json")
    files = {name: _open(root / name) for name in shard_names}
    key_file: dict[str, str] = {}
    for name, f in files.items():
        for key in f.keys():
            if key in key_file:
                raise UserError(f"tensor {key} is in two files ({key_file[key]} and {name}) under {root}: "
                                "remove the stray copy")
            key_file[key] = name
    return Checkpoint(root, config, files, key_file)
