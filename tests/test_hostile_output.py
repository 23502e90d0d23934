"""A hostile output directory: links and special files planted under the names a conversion writes,
a lock file that is a link or has a second name, a malformed manifest, -o paths that are link loops
or lead nowhere. Each ends with exit 2 and a message that names the entry and what to do; the file a
link points to is never opened for writing (same bytes, same mtime, same inode); nothing in the
output looks complete; never a hang (a watchdog alarm turns one into a failure)."""
import json
import os
import shutil
import signal
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest

from kt_convert import kt_runtime
from helpers.outputs import read_json, tree_hashes
from kt_convert.convert.cli import main
from kt_convert.kt_runtime.format import fsio
from kt_convert.kt_runtime.format.errors import UnsafePathError
from kt_convert.kt_runtime.format.names import INDEX_FILE, LOCK_FILE, MANIFEST_FILE


SHARD0 = "model-00001-of-00002.safetensors"


@contextmanager
def deadline(seconds=60):
    """A blocking open/read (a FIFO) becomes a test failure instead of a hang."""
    def fire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def snapshot(path: Path):
    """What must not change about a file a link points to (content, mtime, inode)."""
    st = os.stat(path)
    return path.read_bytes(), st.st_mtime_ns, st.st_ino


def tree_snapshot(path: Path):
    return {str(p.relative_to(path)): snapshot(p) for p in sorted(path.rglob("*")) if p.is_file()}


def run(ck, out, *extra, capsys):
    with deadline():
        code = main(["-i", str(ck), "-o", str(out), "--no-progress", "--threadpool-count", "2", *extra])
    return code, capsys.readouterr().err


def assert_refused(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.splitlines()[-1].startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)


def assert_nothing_complete(out):
    assert not (out / INDEX_FILE).is_file() or (out / INDEX_FILE).is_symlink()
    manifest = out / MANIFEST_FILE
    if manifest.is_file() and not manifest.is_symlink():
        assert read_json(manifest)["complete"] is False
    with warnings.catch_warnings(), pytest.raises(kt_runtime.PackedWeightsError):
        warnings.simplefilter("ignore")  # no manifest: the loader warns, then finds no layer
        kt_runtime.load_experts(out)


@pytest.fixture
def victim(tmp_path):
    """A file and a folder outside the output that a planted link points to."""
    f = tmp_path / "victim.txt"
    f.write_text("precious data\n")
    d = tmp_path / "victim_dir"
    (d / "_numa_0").mkdir(parents=True)
    (d / "_numa_0" / "keep.kt").write_bytes(b"keep me")
    (d / "notes.txt").write_text("notes\n")
    return f, d


# (entry name, layout, link to the victim "file" or "dir")
PLANTED = [
    (LOCK_FILE, "merged", "file"),
    (MANIFEST_FILE, "merged", "file"),
    (MANIFEST_FILE + ".tmp", "merged", "file"),
    (SHARD0, "merged", "file"),
    (SHARD0 + ".tmp", "merged", "file"),
    (INDEX_FILE, "merged", "file"),
    (INDEX_FILE + ".tmp", "merged", "file"),
    ("config.json", "merged", "file"),
    ("config.json.tmp", "merged", "file"),
    ("_layer_0", "kt-folders", "dir"),
    ("_layer_0.tmp", "kt-folders", "dir"),
    ("_layer_1.old", "kt-folders", "dir"),
]


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("name,layout,target", PLANTED, ids=[p[0] for p in PLANTED])
def test_planted_link_is_refused_and_its_target_untouched(tiny_checkpoint, tmp_path, capsys, victim, name, layout,
                                                          target, overwrite):
    f, d = victim
    before = snapshot(f), tree_snapshot(d)
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(f if target == "file" else d, out / name)
    extra = (["--no-merge-safetensor"] if layout == "kt-folders" else []) + (["--overwrite"] if overwrite else [])
    code, err = run(tiny_checkpoint.path, out, *extra, capsys=capsys)
    assert_refused(code, err, str(out / name), "symbolic link", "remove the link")
    assert (snapshot(f), tree_snapshot(d)) == before
    assert (out / name).is_symlink()  # left as it was: the user decides
    assert_nothing_complete(out)


@pytest.mark.parametrize("layout", ["merged", "kt-folders"])
def test_link_planted_into_a_finished_output_is_refused_on_rerun(tiny_checkpoint, tmp_path, capsys, victim, layout):
    """Resume reads and may replace completed files: a link swapped in for one of them is refused
    before anything is hashed or replaced, with and without --overwrite."""
    f, d = victim
    extra = ["--no-merge-safetensor"] if layout == "kt-folders" else []
    out = tmp_path / "out"
    assert run(tiny_checkpoint.path, out, *extra, capsys=capsys)[0] == 0
    if layout == "merged":
        planted = out / SHARD0
        shutil.copyfile(planted, f)
        planted.unlink()
        os.symlink(f, planted)
    else:  # a folder deep inside a layer: never recursed through
        planted = out / "_layer_1" / "_numa_1"
        shutil.rmtree(planted)
        os.symlink(d, planted)
    before = snapshot(f), tree_snapshot(d)
    for flags in ([], ["--overwrite"]):
        code, err = run(tiny_checkpoint.path, out, *extra, *flags, capsys=capsys)
        assert_refused(code, err, str(planted), "symbolic link")
        assert (snapshot(f), tree_snapshot(d)) == before


@pytest.mark.parametrize("name", [LOCK_FILE, MANIFEST_FILE, SHARD0, SHARD0 + ".tmp", "_layer_0.tmp"])
def test_fifo_under_an_output_name_is_refused_without_blocking(tiny_checkpoint, tmp_path, capsys, name):
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / name)
    code, err = run(tiny_checkpoint.path, out, capsys=capsys)
    assert_refused(code, err, str(out / name), "FIFO", "remove it")


def test_socket_under_the_lock_name_is_refused(tiny_checkpoint, tmp_path, capsys):
    import socket

    out = tmp_path / "out"
    out.mkdir()
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(out / LOCK_FILE))
        code, err = run(tiny_checkpoint.path, out, capsys=capsys)
    finally:
        s.close()
    assert_refused(code, err, LOCK_FILE, "socket")


def test_lock_with_a_second_name_is_refused(tiny_checkpoint, tmp_path, capsys, victim):
    """A hard link in place of the lock would let writing our pid truncate another file."""
    f, _ = victim
    before = snapshot(f)
    out = tmp_path / "out"
    out.mkdir()
    os.link(f, out / LOCK_FILE)
    code, err = run(tiny_checkpoint.path, out, capsys=capsys)
    assert_refused(code, err, LOCK_FILE, "hard links")
    assert snapshot(f) == before


def test_report_json_is_never_written_through_a_link(tiny_checkpoint, tmp_path, capsys, victim):
    f, _ = victim
    before = snapshot(f)
    link = tmp_path / "report.json"
    os.symlink(f, link)
    code, err = run(tiny_checkpoint.path, tmp_path / "out", "--json", str(link), capsys=capsys)
    assert_refused(code, err, str(link), "symbolic link")
    assert snapshot(f) == before
    # an existing regular report is replaced (a new file renamed over it), '-' goes to stdout
    link.unlink()
    link.write_text("old\n")
    code, _ = run(tiny_checkpoint.path, tmp_path / "out", "--json", str(link), capsys=capsys)
    assert code == 0 and read_json(link)["layers"] == 2
    with deadline():
        assert main(["-i", str(tiny_checkpoint.path), "-o", str(tmp_path / "out"), "--no-progress",
                     "--threadpool-count", "2", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["layers_resumed"] == 2


@pytest.mark.parametrize("entry", [".", ""])
def test_manifest_listing_the_directory_itself(tiny_checkpoint, tmp_path, capsys, entry):
    """A completed layer whose files entry is '.' or empty: a malformed manifest (exit 2 naming the
    field), and --overwrite replaces it; neither is an IndexError."""
    out = tmp_path / "out"
    assert run(tiny_checkpoint.path, out, capsys=capsys)[0] == 0
    reference = tree_hashes(out)
    manifest = read_json(out / MANIFEST_FILE)
    manifest["completed"]["1"]["files"] = [entry]
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    code, err = run(tiny_checkpoint.path, out, capsys=capsys)
    assert_refused(code, err, MANIFEST_FILE, "completed[1].files", "--overwrite")
    with pytest.raises(kt_runtime.PackedWeightsError, match=r"completed\[1\]\.files"):
        kt_runtime.load_experts(out)
    code, err = run(tiny_checkpoint.path, out, "--overwrite", capsys=capsys)
    assert code == 0, err
    assert tree_hashes(out) == reference


def test_output_that_is_a_link_loop(tiny_checkpoint, tmp_path, capsys):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    for out in (loop, loop / "sub"):
        code, err = run(tiny_checkpoint.path, out, capsys=capsys)
        assert_refused(code, err, str(loop), "points back to itself")


@pytest.mark.parametrize("below", [False, True], ids=["output", "parent"])
def test_output_that_is_a_dangling_link(tiny_checkpoint, tmp_path, capsys, below):
    link = tmp_path / "dangling"
    target = tmp_path / "nowhere" / "out"
    os.symlink(target, link)
    out = link / "sub" if below else link
    code, err = run(tiny_checkpoint.path, out, capsys=capsys)
    assert_refused(code, err, str(link), str(target), "does not exist", "create that directory")
    assert not (tmp_path / "nowhere").exists()  # nothing created at the far end of the link
    target.mkdir(parents=True)  # the fix the message names
    code, err = run(tiny_checkpoint.path, out, capsys=capsys)
    assert code == 0, err
    assert (target / MANIFEST_FILE).is_file() if not below else (target / "sub" / MANIFEST_FILE).is_file()


def test_output_reached_through_a_link_to_a_directory_works(tiny_checkpoint, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "alias")
    code, err = run(tiny_checkpoint.path, tmp_path / "alias", capsys=capsys)
    assert code == 0, err
    assert read_json(real / MANIFEST_FILE)["complete"] is True


# --- the helpers themselves (kt_runtime.format.fsio): links planted at the moment of writing ---

def test_fsio_create_new_replaces_a_stale_file_and_refuses_a_link(tmp_path, victim):
    f, d = victim
    before = snapshot(f)
    stale = tmp_path / "x.tmp"
    stale.write_text("partial")
    fd = fsio.create_new(stale)
    os.write(fd, b"new")
    os.close(fd)
    assert stale.read_bytes() == b"new"
    for target in (f, d, tmp_path / "missing"):
        link = tmp_path / "y.tmp"
        os.symlink(target, link)
        with pytest.raises(UnsafePathError, match="symbolic link"):
            fsio.create_new(link)
        link.unlink()
    assert snapshot(f) == before and not (tmp_path / "missing").exists()


def test_fsio_replace_remove_and_atomic_write_refuse_links(tmp_path, victim):
    f, d = victim
    before = snapshot(f), tree_snapshot(d)
    link_f, link_d = tmp_path / "lf", tmp_path / "ld"
    os.symlink(f, link_f)
    os.symlink(d, link_d)
    src = tmp_path / "src"
    src.write_text("ours")
    with pytest.raises(UnsafePathError):
        fsio.replace(src, link_f)
    with pytest.raises(UnsafePathError):
        fsio.atomic_write_text(link_f, "x")
    with pytest.raises(UnsafePathError):
        fsio.remove(link_d)
    with pytest.raises(UnsafePathError):
        fsio.check_tree(link_d)
    inner = tmp_path / "tree"
    (inner / "a").mkdir(parents=True)
    os.symlink(d, inner / "a" / "escape")
    with pytest.raises(UnsafePathError, match="escape"):
        fsio.remove(inner)  # never recursed through, not even by rmtree
    fsio.discard(link_d)  # best effort while unwinding: leaves a link alone, never raises
    assert link_d.is_symlink() and src.read_text() == "ours"
    assert (snapshot(f), tree_snapshot(d)) == before
    assert fsio.regular_size_below(tmp_path, "lf") is None and fsio.regular_size_below(tmp_path, "src") == 4
    assert fsio.regular_size_below(tmp_path, "ld/notes.txt") is None


def test_unsafe_path_error_is_a_value_error_for_library_callers(tmp_path, victim):
    """kt_runtime writers (routing statistics, safetensors) follow the same rule."""
    from kt_convert.kt_runtime.hybrid.placement import ExpertStats
    from kt_convert.kt_runtime.format.safetensors_file import save_file

    f, _ = victim
    before = snapshot(f)
    link = tmp_path / "stats.json"
    os.symlink(f, link)
    with pytest.raises(ValueError, match="symbolic link"):
        ExpertStats(4, {0: [1, 2, 3, 4]}).save(link)
    with pytest.raises(ValueError, match="symbolic link"):
        save_file(link, {"a": ("F32", (1,), b"\0\0\0\0")})
    assert snapshot(f) == before


def test_fsio_check_tree_walks_a_deep_tree_without_recursion(tmp_path, victim):
    f, _ = victim
    root = tmp_path / "_layer_0.tmp"
    deep = root.joinpath(*["d"] * 300)
    deep.mkdir(parents=True)
    (deep / "ok.kt").write_bytes(b"x")
    depth, frame = 0, sys._getframe()
    while frame:
        depth, frame = depth + 1, frame.f_back
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 80)  # the tree (300 levels) is deeper than what is left of the stack
    try:
        fsio.check_tree(root)
        os.symlink(f, deep / "escape.kt")
        with pytest.raises(UnsafePathError, match="escape.kt"):
            fsio.check_tree(root)
    finally:
        sys.setrecursionlimit(old)
