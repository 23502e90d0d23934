"""The hub side of a download: what a repository holds at one commit (huggingface_hub's model_info),
its small files fetched into the Hugging Face cache, the header of a remote safetensors shard (two
range requests, huggingface_hub's parse_safetensors_file_metadata), and huggingface_hub's errors
turned into messages that name the endpoint and the fix. Every request is huggingface_hub's own:
HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE / HF_HOME and offline mode apply as they do for `hf download`.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from kt_runtime.format.safetensors_file import DTYPE_BITS, TensorInfo

from .errors import UserError


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None  # LFS files: the content hash the hub records (also their ETag and blob name)
    blob_id: str | None  # the git blob id (the ETag of a small file)

    @property
    def etag(self) -> str | None:
        return self.sha256 or self.blob_id


@dataclass(frozen=True)
class RemoteRepo:
    repo_id: str
    revision: str | None
    commit: str
    endpoint: str
    files: dict[str, RemoteFile]

    @property
    def spec(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def repo_cache_dir(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def hub_error(e: BaseException, what: str) -> UserError:
    """A huggingface_hub / network error as a message naming the endpoint and what to do."""
    from huggingface_hub import errors

    resume = "downloaded files and converted layers are kept: re-run the same command to resume"
    if isinstance(e, errors.OfflineModeIsEnabled):
        return UserError(f"{what}: HF_HUB_OFFLINE=1 is set, so nothing can be downloaded; unset it (or pass a "
                         "model that is fully in the cache) and re-run")
    if isinstance(e, errors.RevisionNotFoundError):
        return UserError(f"{what}: the hub at {endpoint()} has no such revision; check the @revision")
    if isinstance(e, errors.RepositoryNotFoundError):
        return UserError(f"{what}: the hub at {endpoint()} has no such repository (or it is private/gated: log in "
                         "with `hf auth login` or set HF_TOKEN)")
    if isinstance(e, errors.EntryNotFoundError):
        return UserError(f"{what}: the hub at {endpoint()} has no such file")
    if isinstance(e, errors.HfHubHTTPError):
        return UserError(f"{what}: the hub at {endpoint()} answered {e}; {resume}")
    return UserError(f"{what}: cannot reach the hub at {endpoint()} ({type(e).__name__}: {e}); check the network "
                     f"(or HF_ENDPOINT); {resume}")


def is_hub_error(e: BaseException) -> bool:
    """Errors of the network or the hub (not our bugs): those hub_error describes."""
    from huggingface_hub import errors

    http_errors: tuple = ()
    for module in ("httpx2", "httpx", "requests"):  # whichever HTTP client this huggingface_hub uses
        try:
            mod = __import__(module)
        except ImportError:
            continue
        http_errors += tuple(getattr(mod, n) for n in ("HTTPError", "RequestException") if hasattr(mod, n))
    return isinstance(e, (errors.HfHubHTTPError, errors.OfflineModeIsEnabled, ConnectionError, TimeoutError,
                          errors.LocalEntryNotFoundError, *http_errors))


def open_remote(repo_id: str, revision: str | None) -> RemoteRepo:
    """The repository's file list at `revision` (sizes, LFS sha256) and the commit it resolves to."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import disable_progress_bars

    if not sys.stderr.isatty():  # huggingface_hub's bars are for terminals; logs get our lines only
        disable_progress_bars()
    what = repo_id + (f"@{revision}" if revision else "")
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as e:
        if is_hub_error(e):
            raise hub_error(e, what) from None
        raise
    files = {}
    for s in info.siblings or []:
        sha = s.lfs.sha256 if s.lfs is not None else None
        files[s.rfilename] = RemoteFile(s.rfilename, int(s.size or 0), sha, s.blob_id)
    if not info.sha:
        raise UserError(f"{what}: the hub at {endpoint()} did not say which commit this is; re-run later")
    return RemoteRepo(repo_id, revision, info.sha, endpoint(), files)


def download_file(repo: RemoteRepo, name: str, cache: Path, revision: str | None = None) -> Path:
    """One file through hf_hub_download into the cache (resuming its .incomplete blob); its snapshot
    path. revision: a branch or tag (huggingface_hub records refs/<it>); default the resolved commit."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo.repo_id, name, revision=revision or repo.commit, cache_dir=str(cache)))
    except Exception as e:
        if is_hub_error(e):
            raise hub_error(e, f"{repo.spec}: {name}") from None
        raise


def remote_header(repo: RemoteRepo, name: str) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """(metadata, tensors) of a remote safetensors shard from its header alone; offsets are absolute
    file offsets, derived from the file size the hub lists (checked when the file arrives)."""
    from huggingface_hub import HfApi

    try:
        meta = HfApi().parse_safetensors_file_metadata(repo.repo_id, name, revision=repo.commit)
    except Exception as e:
        if is_hub_error(e) or type(e).__name__ == "SafetensorsParsingError":
            raise hub_error(e, f"{repo.spec}: {name} (header)") if is_hub_error(e) else UserError(
                f"{repo.spec}: {name}: the header is not a valid safetensors header ({e})") from None
        raise
    size = repo.files[name].size
    data_end = max((t.data_offsets[1] for t in meta.tensors.values()), default=0)
    base = size - data_end  # 8 + header length, for a file whose data fills it (checked on arrival)
    tensors = {}
    for key, t in meta.tensors.items():
        if t.dtype not in DTYPE_BITS:
            raise UserError(f"{repo.spec}: {name}: tensor {key} has unknown dtype {t.dtype}")
        begin, end = t.data_offsets
        tensors[key] = TensorInfo(key, t.dtype, tuple(t.shape), base + begin, end - begin)
    return dict(meta.metadata or {}), tensors


def cached_commit(cache: Path, repo_id: str, revision: str | None) -> str | None:
    """Offline: the commit a revision names in the cache (refs/<rev>, or the revision itself)."""
    base = repo_cache_dir(cache, repo_id)
    rev = revision or "main"
    ref = base / "refs" / rev
    if ref.is_file():
        return ref.read_text().strip()
    if (base / "snapshots" / rev).is_dir():
        return rev
    return None


def file_size_or_none(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None
