"""Reading back what a conversion wrote: the digests of its files, its JSON files."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def tree_hashes(path: Path) -> dict[str, str]:
    """sha256 of every file under path (except the lock and the loader's record of hashed layers), by relative name."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file() and p.name not in (".kt_convert.lock", ".kt_verified.json"):
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def published_hashes(path: Path) -> dict[str, str]:
    """sha256 of every file a user publishes or loads from an output (all but kt_manifest.json, which names
    the source's location and stat, and dot-files), by relative name."""
    from kt_convert.kt_runtime.format.names import is_published

    return {name: digest for name, digest in tree_hashes(path).items() if is_published(name)}


def read_json(path):
    return json.loads(Path(path).read_text())
