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

from kt_convert.kt_runtime.format.hub_cache import RepoCache, commit_problem
from kt_convert.kt_runtime.format.safetensors_file import HeaderError, TensorInfo, header_tensors

from .errors import UserError
from .hub_answers import MODEL_INFO_MAX_BYTES, RemoteFile, bad_answer, expecting, remote_files


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


def _failure(e: Exception, what: str) -> Exception:
    """An exception of a huggingface_hub call as the error to raise: ours as they are, the network's and
    the hub's as hub_error says, an answer huggingface_hub could not parse as a bad answer."""
    if isinstance(e, UserError):
        return e
    if is_hub_error(e):
        return hub_error(e, what)
    if isinstance(e, (TypeError, ValueError, KeyError, AttributeError, IndexError)):
        return bad_answer(endpoint(), what, f"{type(e).__name__}: {str(e)[:200]}")
    return e


def open_remote(repo_id: str, revision: str | None) -> RemoteRepo:
    """The repository's file list at `revision` (sizes, LFS sha256) and the commit it resolves to."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import disable_progress_bars

    if not sys.stderr.isatty():  # huggingface_hub's bars are for terminals; logs get our lines only
        disable_progress_bars()
    what = repo_id + (f"@{revision}" if revision else "")
    try:
        with expecting(what, endpoint(), MODEL_INFO_MAX_BYTES, announced=False):
            info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as e:
        raise _failure(e, what) from None
    commit, files = remote_files(info, endpoint(), what)
    return RemoteRepo(repo_id, revision, commit, endpoint(), files)


def download_file(repo: RemoteRepo, name: str, cache: Path, revision: str | None = None) -> Path:
    """One file through hf_hub_download into the cache (resuming its .incomplete blob), no byte beyond the
    size the model info announced; its snapshot path, inside the repository's cache folder. revision: a
    branch or tag (huggingface_hub records refs/<it>); default the resolved commit."""
    from huggingface_hub import hf_hub_download

    what = f"{repo.spec}: {name}"
    cached = RepoCache(cache, repo.repo_id)
    cached.check_before_download(repo.commit, repo.files[name].etag, revision)
    try:
        with expecting(what, repo.endpoint, repo.files[name].size):
            path = hf_hub_download(repo.repo_id, name, revision=revision or repo.commit, cache_dir=str(cache))
    except Exception as e:
        raise _failure(e, what) from None
    return cached.check_download(path, name)


def remote_header(repo: RemoteRepo, name: str) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """(metadata, tensors) of a remote safetensors shard from its header alone; offsets are absolute
    file offsets, derived from the file size the hub lists (checked when the file arrives). Every entry
    is checked as a local file's header is (safetensors_file.header_tensors)."""
    from huggingface_hub import HfApi

    what = f"{repo.spec}: {name} (header)"
    size = repo.files[name].size
    try:
        with expecting(what, repo.endpoint, size):
            meta = HfApi().parse_safetensors_file_metadata(repo.repo_id, name, revision=repo.commit)
        header = {key: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)}
                  for key, t in meta.tensors.items()}
        metadata = dict(meta.metadata or {})
    except Exception as e:
        if type(e).__name__ == "SafetensorsParsingError":
            raise UserError(f"{repo.spec}: {name}: the header is not a valid safetensors header ({e})") from None
        raise _failure(e, what) from None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise bad_answer(repo.endpoint, what, "__metadata__ must map strings to strings")
    try:
        _, data_end = header_tensors(header, 0, size)  # relative offsets first: the buffer's length
        if size - data_end < 10:
            raise HeaderError(f"{data_end} bytes of tensors leave no room for a header in the {size} bytes listed")
        tensors, _ = header_tensors(header, size - data_end, size)
    except HeaderError as e:
        raise bad_answer(repo.endpoint, what, str(e)) from None
    return metadata, tensors


def cached_commit(cache: Path, repo_id: str, revision: str | None) -> str | None:
    """Offline: the commit a revision names in the cache (refs/<rev>, or the revision itself when it is a
    commit with a snapshot); UnsafePathError for a reference that is not a commit hash."""
    repo = RepoCache(cache, repo_id)
    rev = revision or "main"
    commit = repo.ref_commit(rev)
    if commit is not None:
        return commit
    if commit_problem(rev) is None and os.path.isdir(repo.snapshot(rev)):
        return rev
    return None


def file_size_or_none(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None
