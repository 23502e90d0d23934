"""Hostile values handed to the commands themselves, as classes of input, several cases each:

6.  report paths (--json, --html) naming a file the same command reads or writes;
7.  entries of a shared output folder (OUT/.kt_shards: its folders, claims, records) that are links, FIFOs,
    hard links or of the wrong kind, at every level;
8.  the source path the manifest records (resolved, absolute; when missing, said to come from the manifest);
9.  JSON read by the runtime and the converter (the verified-layers record, routing statistics, an index)
    through the one capped reader: a bad record ignored and rewritten, a bad user file a ValueError naming it;
10. option values that pass click but would fail later (NUL, ~user, non-finite numbers, template fields);
11. verify --source given another model of the same shapes, or other files;
12. the message of an error fits the command that ran; one error root, mapped once.

Converter cases: exit 2, the file / option named with what to do, no traceback, nothing that looks complete;
the security cases: watched files outside untouched and never read. Runtime cases: a ValueError subclass."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from kt_convert import kt_runtime
from kt_convert.convert.cli import main
from kt_convert.convert.errors import UserError
from kt_convert.kt_runtime.format.errors import FixableError, PackedFormatError
from kt_convert.kt_runtime.format.names import INDEX_FILE, MANIFEST_FILE, VERIFIED_FILE
from kt_convert.synthetic.v4_flash import make_v4_flash_checkpoint
from helpers.checkpoints import assert_nothing_complete
from helpers.hangs import deadline  # noqa: F401 - autouse: a hang (a blocking open) fails the test
from helpers.watch import Watched

SHARD1 = "model-00001-of-00002.safetensors"
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """2 layers x 4 experts (H=384, I=512) over two shards."""
    return make_v4_flash_checkpoint(tmp_path_factory.mktemp("cmd") / "base", "v4-flash-tiny", num_experts=4,
                                    num_shards=2).path


@pytest.fixture(scope="module")
def other_seed(tmp_path_factory):
    """The same shapes, files and headers as `base`, other weights."""
    return make_v4_flash_checkpoint(tmp_path_factory.mktemp("cmd") / "other", "v4-flash-tiny", num_experts=4,
                                    num_shards=2, seed=7).path


@pytest.fixture(scope="module")
def converted(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmd-out") / "out"
    assert main(["-i", str(base), "-o", str(out), "--no-progress", "--threadpool-count", "1"]) == 0
    return out


@pytest.fixture
def victim(tmp_path, base):
    return Watched(tmp_path / "outside", base / SHARD1)


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (".kt_verified.json",)}


def fails(args, capsys, *words, out: Path | None = None) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.splitlines()[-1].startswith(("error: ", "Error: ")), err
    for w in words:
        assert w in err, (w, err)
    if out is not None:
        assert_nothing_complete(out)
    return err


def convert_args(src, out, *extra):
    return ["-i", str(src), "-o", str(out), "--no-progress", "--threadpool-count", "1", *extra]


# -- 6. report paths naming a file of the run ---------------------------------------------------------------

CONVERT_REPORTS = [
    ("the output's manifest", lambda src, out: out / MANIFEST_FILE),
    ("a shard the run writes", lambda src, out: out / "model-00001-of-00002.safetensors"),
    ("the index the run writes", lambda src, out: out / INDEX_FILE),
    ("a copied model file", lambda src, out: out / "config.json"),
    ("the verified-layers record", lambda src, out: out / VERIFIED_FILE),
    ("a shard record of the output", lambda src, out: out / ".kt_shards" / "done" / "layer_0.json"),
    ("the input's config", lambda src, out: src / "config.json"),
    ("an input shard", lambda src, out: src / SHARD1),
    ("a new file inside the input", lambda src, out: src / "report.json"),
    ("the input's config through a link", lambda src, out: _link_into(src, out.parent) / "config.json"),
    ("the input's index through '..'", lambda src, out: out.parent / "elsewhere" / ".." / src.name / INDEX_FILE),
]


def _link_into(src: Path, where: Path) -> Path:
    link = where / "via-link"
    link.symlink_to(src, target_is_directory=True)
    return link


@pytest.mark.parametrize("target", [c[1] for c in CONVERT_REPORTS], ids=[c[0] for c in CONVERT_REPORTS])
def test_convert_report_naming_a_file_of_the_run_is_refused_first(base, tmp_path, capsys, target):
    src = tmp_path / "src"
    shutil.copytree(base, src)
    out = tmp_path / "out"
    (tmp_path / "elsewhere").mkdir()
    before = digests(src)
    report = target(src, out)
    fails(convert_args(src, out, "--json", str(report)), capsys, "--json", "write the report somewhere else",
          out=out)
    assert digests(src) == before and not out.exists()


def test_convert_report_beside_the_run_and_in_the_output_folder_is_fine(base, tmp_path):
    out = tmp_path / "out"
    assert main(convert_args(base, out, "--json", str(tmp_path / "report.json"))) == 0
    assert json.loads((tmp_path / "report.json").read_text())["layers_converted"] == 2
    out2 = tmp_path / "out2"
    out2.mkdir()
    assert main(convert_args(base, out2, "--json", str(out2 / "notes.json"))) == 0  # a name the run never uses


def test_job_file_as_the_report(base, tmp_path, capsys):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"outputs": [{"output": "o1"}, {"output": "o2", "quant_method": "int8"}]}))
    before = job.read_bytes()
    fails(["-i", str(base), "--job-file", str(job), "--no-progress", "--json", str(job)], capsys, "--json",
          "the job file")
    assert job.read_bytes() == before


VERIFY_REPORTS = [
    ("json: the output's manifest", lambda src, out, t: ["--json", str(out / MANIFEST_FILE)], "--json"),
    ("json: the output's record", lambda src, out, t: ["--json", str(out / VERIFIED_FILE)], "--json"),
    ("html: an output shard", lambda src, out, t: ["--html", str(out / "model-00001-of-00002.safetensors")], "--html"),
    ("json: a source shard", lambda src, out, t: ["--json", str(src / SHARD1)], "--json"),
    ("html: the source's index", lambda src, out, t: ["--html", str(src / INDEX_FILE)], "--html"),
    ("json and html: one file", lambda src, out, t: ["--json", str(t / "r"), "--html", str(t / "r")], "the same file"),
]


@pytest.mark.parametrize("extra,option", [c[1:] for c in VERIFY_REPORTS], ids=[c[0] for c in VERIFY_REPORTS])
def test_verify_report_naming_a_file_of_the_command_is_refused(base, converted, tmp_path, capsys, extra, option):
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(base, src)
    shutil.copytree(converted, out)
    before = (digests(src), digests(out))
    fails(["verify", str(out), "--source", str(src), *extra(src, out, tmp_path)], capsys, option)
    assert (digests(src), digests(out)) == before


def test_dry_run_report_naming_a_file_of_the_run_is_refused(base, tmp_path, capsys):
    """--dry-run --json writes the plan: its path gets the same check as the report of a conversion."""
    src = tmp_path / "src"
    shutil.copytree(base, src)
    before = digests(src)
    for report in (src / "config.json", src / "plan.json"):
        fails(convert_args(src, tmp_path / "out", "--dry-run", "--json", str(report)), capsys, "--json",
              "the input checkpoint", "write the report somewhere else")
    assert digests(src) == before and not (tmp_path / "out").exists()
    assert main(convert_args(src, tmp_path / "out", "--dry-run", "--json", str(tmp_path / "plan.json"))) == 0
    assert json.loads((tmp_path / "plan.json").read_text())["dry_run"] is True


def _records(out: Path) -> Path:
    return out.with_name(out.name + ".kt-convert")


KT_TREE_REPORTS = [
    ("a free name in kt's tree", lambda out: out / "notes.json", "kt-kernel's SFT tree"),
    ("the records folder's manifest", lambda out: _records(out) / MANIFEST_FILE, "the records folder"),
    ("a copied file in the records folder", lambda out: _records(out) / "config.json", "the records folder"),
]


@pytest.mark.parametrize("target,words", [c[1:] for c in KT_TREE_REPORTS], ids=[c[0] for c in KT_TREE_REPORTS])
def test_kt_sft_report_paths(base, tmp_path, capsys, target, words):
    """--kt-sft-manifest: kt's SFT loader refuses any file beside its tree, so every name in OUT is the run's;
    the converter's own files are in OUT.kt-convert. A report there is refused before anything is written;
    verify of such an output refuses the same paths."""
    out = tmp_path / "out"
    sft = ["--quant-method", "int8", "--no-merge-safetensor", "--kt-sft-manifest"]
    fails(convert_args(base, out, *sft, "--json", str(target(out))), capsys, "--json", words)
    assert not out.exists() and not _records(out).exists()
    assert main(convert_args(base, out, *sft)) == 0
    kept, existed = (digests(out), digests(_records(out))), target(out).exists()
    fails(["verify", str(out), "--json", str(target(out))], capsys, "--json", words)
    assert (digests(out), digests(_records(out))) == kept and target(out).exists() == existed


# -- 7. the shared output folder, at every level ------------------------------------------------------------


def _plant(out: Path, rel: str, kind: str, victim: Watched) -> None:
    """Plants `kind` at out/rel (for each layer where rel holds {L})."""
    for layer in ((0, 1) if "{L}" in rel else (None,)):
        _plant_one(out / rel.format(L=layer), kind, victim)


def _plant_one(path: Path, kind: str, victim: Watched) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "link to a folder outside":
        path.symlink_to(victim.add_folder(path.name + "-dir"), target_is_directory=True)
        victim.settle()
    elif kind == "link to a file outside":
        path.symlink_to(victim.path("secret.txt"))
    elif kind == "hard link to a file outside":
        os.link(victim.path("secret.txt"), path)
        victim.settle()
    elif kind == "FIFO":
        os.mkfifo(path)
    elif kind == "file":
        path.write_text("x")


def _shards_started(converted: Path, out: Path) -> None:
    """The state --shard processes leave mid-way: a planned manifest, no layer recorded, the shared folder."""
    shutil.copytree(converted, out)
    m = json.loads((out / MANIFEST_FILE).read_text())
    m.update(complete=False, completed={})
    (out / MANIFEST_FILE).write_text(json.dumps(m))
    (out / INDEX_FILE).unlink()
    for shard in out.glob("*.safetensors"):
        shard.unlink()
    for sub in ("claims", "done"):
        (out / ".kt_shards" / sub).mkdir(parents=True)


SHARED = [
    (".kt_shards", "link to a folder outside"),
    (".kt_shards", "FIFO"),
    (".kt_shards/done", "link to a folder outside"),
    (".kt_shards/done", "FIFO"),
    (".kt_shards/claims", "link to a folder outside"),
    (".kt_shards/claims", "file"),
    (".kt_shards/claims/layer_{L}.claim", "link to a file outside"),
    (".kt_shards/claims/layer_{L}.claim", "hard link to a file outside"),
    (".kt_shards/claims/layer_{L}.claim", "FIFO"),
    (".kt_shards/claims/layer_{L}.claim", "link to a folder outside"),
    (".kt_shards/done/layer_{L}.json", "link to a file outside"),
    (".kt_shards/done/layer_{L}.json", "hard link to a file outside"),
    (".kt_shards/done/layer_{L}.json", "FIFO"),
]


@pytest.mark.parametrize("rel,kind", SHARED, ids=[f"{r}: {k}" for r, k in SHARED])
def test_shared_output_entries_get_the_lock_files_rules(converted, tmp_path, capsys, victim, rel, kind):
    """A --shard run into an output that other shards started, whose shared folder holds a planted entry:
    refused, naming the entry and saying to remove it; nothing outside is written, truncated or read; no
    open blocks."""
    out = tmp_path / "out"
    _shards_started(converted, out)
    _plant(out, rel, kind, victim)
    victim.settle()
    named = str(out / rel.split("{L}")[0])
    # --shard 1/2: the first of two shards (numbered from 1); the entry is planted for both layers
    fails(convert_args(_source_of(out), out, "--shard", "1/2"), capsys, named, "remove", out=out)
    victim.assert_untouched()


def _source_of(out: Path) -> str:
    return json.loads((out / MANIFEST_FILE).read_text())["source"]["path"]


@pytest.mark.parametrize("rel,kind", [(".kt_shards/claims", "link to a folder outside"),
                                      (".kt_shards/claims/layer_{L}.claim", "FIFO"),
                                      (".kt_shards/claims/layer_{L}.claim", "hard link to a file outside")])
def test_a_single_run_looking_for_live_shards_follows_the_same_rules(converted, tmp_path, capsys, victim, rel,
                                                                      kind):
    out = tmp_path / "out"
    _shards_started(converted, out)
    _plant(out, rel, kind, victim)
    victim.settle()
    fails(convert_args(_source_of(out), out), capsys, str(out / rel.split("{L}")[0]), out=out)
    victim.assert_untouched()


def test_a_claim_being_published_is_waited_for_not_refused(tmp_path):
    """A claim has two names for a moment (linked from its private name, which goes next): another process
    looking then waits instead of calling it a planted hard link."""
    import threading
    import time

    from kt_convert.convert.claims import open_claim

    private, claim = tmp_path / ".layer_0.claim.h.1", tmp_path / "layer_0.claim"
    private.write_text("{}")
    os.link(private, claim)
    threading.Timer(0.2, private.unlink).start()
    t0 = time.monotonic()
    fd = open_claim(claim)
    assert fd is not None and time.monotonic() - t0 >= 0.15
    os.close(fd)


# -- 8. the source path in the manifest ------------------------------------------------------------------------


def test_manifest_records_the_resolved_absolute_source(base, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    shutil.copytree(base, tmp_path / "models" / "real")
    (tmp_path / "models" / "alias").symlink_to(tmp_path / "models" / "real", target_is_directory=True)
    monkeypatch.chdir(tmp_path / "models")
    for spec in ("alias", "./real", "../models/alias/"):
        out = tmp_path / f"out-{spec.strip('./').replace('/', '-')}"
        assert main(convert_args(spec, out)) == 0
        recorded = json.loads((out / MANIFEST_FILE).read_text())["source"]["path"]
        assert recorded == str((tmp_path / "models" / "real").resolve()), spec


def _unfinished_output(base, tmp_path) -> tuple[Path, Path]:
    """An output whose layers are all converted but whose manifest is not complete yet (what the shards
    leave for finalize), from a copy of the source."""
    src = tmp_path / "src"
    shutil.copytree(base, src)
    out = tmp_path / "out"
    assert main(convert_args(src, out)) == 0
    m = json.loads((out / MANIFEST_FILE).read_text())
    m["complete"] = False
    (out / MANIFEST_FILE).write_text(json.dumps(m))
    (out / INDEX_FILE).unlink()
    return src, out


@pytest.mark.parametrize("change,words", [
    ("moved", ["as recorded in", MANIFEST_FILE, "does not exist", "put it back"]),
    ("relative", ["as recorded in", MANIFEST_FILE, "does not exist"]),
    ("not a string", ["records no usable source path"]),
    ("NUL", ["records no usable source path"]),
])
def test_finalize_says_the_source_path_came_from_the_manifest(base, tmp_path, capsys, change, words):
    src, out = _unfinished_output(base, tmp_path)
    m = json.loads((out / MANIFEST_FILE).read_text())
    if change == "moved":
        src.rename(tmp_path / "moved")
    m["source"]["path"] = {"moved": str(src), "relative": "some/relative/ckpt", "not a string": 7,
                           "NUL": "a\u0000b"}[change]
    (out / MANIFEST_FILE).write_text(json.dumps(m))
    fails(["finalize", str(out)], capsys, *words)


# -- 9. JSON through the one reader -------------------------------------------------------------------------------

RECORDS = {
    "not JSON": b"\xff{",
    "nested 100,000 deep": b"[" * 100_000 + b"]" * 100_000,
    "duplicate keys": b'{"version": 1, "version": 1, "layers": {}}',
    "wrong types": json.dumps({"version": 1, "layers": {"0": {"sha256": 5, "files": {"x": "y"}}}}).encode(),
    "a list": b"[]",
    "huge": b'{"version": 1, "pad": "' + b"x" * (65 << 20) + b'"}',
}


@pytest.mark.parametrize("content", list(RECORDS.values()), ids=list(RECORDS))
def test_a_bad_verified_record_is_ignored_and_rewritten(converted, tmp_path, content):
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    (out / VERIFIED_FILE).write_bytes(content)
    w = kt_runtime.load_experts(out)  # hashes every layer again: the record said nothing usable
    assert sorted(w.layers) == [0, 1]
    record = json.loads((out / VERIFIED_FILE).read_text())
    assert record["version"] == 1 and sorted(record["layers"]) == ["0", "1"]


@pytest.mark.parametrize("kind", ["link to a file outside", "hard link to a file outside", "FIFO"])
def test_a_verified_record_that_is_no_plain_file_is_neither_followed_nor_read(converted, tmp_path, victim, kind):
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    (out / VERIFIED_FILE).unlink(missing_ok=True)
    if kind == "hard link to a file outside":  # replaced by a fresh record: the secret's own name alone again
        os.link(victim.path("secret.txt"), out / VERIFIED_FILE)
    else:
        _plant(out, VERIFIED_FILE, kind, victim)
    w = kt_runtime.load_experts(out)
    assert sorted(w.layers) == [0, 1]
    victim.assert_untouched()


def _stats(**changes) -> dict:
    d = {"format": "kt-expert-routing-stats", "version": 1, "num_experts": 4, "layers": {"0": [1, 2, 3, 4]}}
    d.update(changes)
    return d


STATS = [
    ("NaN count", json.dumps(_stats(layers={"0": [1, float("nan"), 3, 4]})), "layers.0[1]"),
    ("infinite count", json.dumps(_stats(layers={"0": [1, 2, float("inf"), 4]})), "layers.0[2]"),
    ("negative count", json.dumps(_stats(layers={"0": [1, -2, 3, 4]})), "layers.0[1]"),
    ("count past int64", json.dumps(_stats(layers={"0": [2 ** 70, 2, 3, 4]})), "layers.0[0]"),
    ("fractional count", json.dumps(_stats(layers={"0": [1.5, 2, 3, 4]})), "layers.0[0]"),
    ("count that is true", json.dumps(_stats(layers={"0": [True, 2, 3, 4]})), "layers.0[0]"),
    ("too few counts", json.dumps(_stats(layers={"0": [1, 2, 3]})), "layers.0"),
    ("layer key of words", json.dumps(_stats(layers={"x": [1, 2, 3, 4]})), "not a layer number"),
    ("negative layer key", json.dumps(_stats(layers={"-1": [1, 2, 3, 4]})), "not a layer number"),
    ("num_experts 0", json.dumps(_stats(num_experts=0)), "num_experts"),
    ("num_experts 2^40", json.dumps(_stats(num_experts=2 ** 40)), "num_experts"),
    ("layers a list", json.dumps(_stats(layers=[[1, 2, 3, 4]])), "layers"),
    ("not JSON", "{nope", "not valid JSON"),
    ("nested deep", "[" * 50_000 + "]" * 50_000, "nested too deeply"),
    ("another format", json.dumps(_stats(format="x")), "not a routing statistics object"),
]


@pytest.mark.parametrize("text,words", [c[1:] for c in STATS], ids=[c[0] for c in STATS])
def test_routing_statistics_of_the_wrong_type_or_range(tmp_path, text, words):
    from kt_convert.kt_runtime.hybrid.placement import ExpertStats

    path = tmp_path / "stats.json"
    path.write_text(text)
    with pytest.raises(PackedFormatError) as e:
        ExpertStats.load(path)
    assert isinstance(e.value, ValueError) and str(path) in str(e.value) and words in str(e.value)


@pytest.mark.parametrize("kind", ["FIFO", "folder", "link to a FIFO"])
def test_routing_statistics_that_are_no_file_never_block(tmp_path, kind):
    from kt_convert.kt_runtime.hybrid.placement import ExpertStats

    path = tmp_path / "stats.json"
    if kind == "FIFO":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        os.mkfifo(tmp_path / "pipe")
        path.symlink_to(tmp_path / "pipe")
    with pytest.raises(PackedFormatError, match="only regular files are read"):
        ExpertStats.load(path)


@pytest.mark.parametrize("index,words", [("{nope", "not valid JSON"), ('{"weight_map": [1]}', "weight_map"),
                                         ('{"weight_map": {"a": 1}}', "weight_map"),
                                         ("[" * 30_000 + "]" * 30_000, "nested too deeply")])
def test_expert_bias_index_of_the_wrong_shape(tmp_path, index, words):
    from kt_convert.kt_runtime.expert_activation import read_expert_biases

    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(PackedFormatError, match=words):
        read_expert_biases(tmp_path, None, 0)


# -- 10. option values --------------------------------------------------------------------------------------------

OPTIONS = [
    ("input with a NUL", lambda b, t: ["-i", "a\0b", "-o", str(t / "o")], "--input-path"),
    ("input of an unknown user", lambda b, t: ["-i", "~no_such_user_x/m", "-o", str(t / "o")], "--input-path"),
    ("output with a NUL", lambda b, t: ["-i", str(b), "-o", str(t / "o\0x")], "--output"),
    ("output of an unknown user", lambda b, t: ["-i", str(b), "-o", "~no_such_user_x/o"], "--output"),
    ("json with a NUL", lambda b, t: ["-i", str(b), "-o", str(t / "o"), "--json", "r\0.json"], "--json"),
    ("json of an unknown user", lambda b, t: ["-i", str(b), "-o", str(t / "o"), "--json", "~no_such_user_x/r"],
     "--json"),
    ("job file with a NUL", lambda b, t: ["-i", str(b), "--job-file", "j\0.json"], "--job-file"),
    ("template with a conversion", lambda b, t: ["-i", str(b), "--output-template", str(t / "{method!r}")],
     "--output-template"),
    ("template with a format of the wrong type", lambda b, t: ["-i", str(b), "--output-template",
                                                               str(t / "{threadpool_count:s}")], "--output-template"),
    ("template with an attribute", lambda b, t: ["-i", str(b), "--output-template", str(t / "{method.upper}")],
     "--output-template"),
    ("template with a huge width", lambda b, t: ["-i", str(b), "--output-template",
                                                 str(t / "{method:>999999999}")], "--output-template"),
    ("template with an index", lambda b, t: ["-i", str(b), "--output-template", str(t / "{method[0]}")],
     "--output-template"),
    ("template with a NUL", lambda b, t: ["-i", str(b), "--output-template", str(t / "{method}\0")],
     "--output-template"),
    ("disk cap nan", lambda b, t: ["-i", "org/x", "-o", str(t / "o"), "--download", "--max-source-disk", "nan"],
     "--max-source-disk"),
    ("disk cap inf", lambda b, t: ["-i", "org/x", "-o", str(t / "o"), "--download", "--max-source-disk", "inf"],
     "--max-source-disk"),
    ("disk cap -1", lambda b, t: ["-i", "org/x", "-o", str(t / "o"), "--download", "--max-source-disk", "-1"],
     "--max-source-disk"),
    ("verify: error bound nan", lambda b, t: ["verify", str(t), "--max-rel-error", "nan"], "--max-rel-error"),
    ("verify: error bound -inf", lambda b, t: ["verify", str(t), "--max-rel-error", "-inf"], "--max-rel-error"),
    ("verify: output with a NUL", lambda b, t: ["verify", "o\0"], "OUTPUT"),
    ("verify: source of an unknown user", lambda b, t: ["verify", str(t), "--source", "~no_such_user_x/s"],
     "--source"),
    ("verify: html with a NUL", lambda b, t: ["verify", str(t), "--html", "x\0.html"], "--html"),
    ("finalize: output of an unknown user", lambda b, t: ["finalize", "~no_such_user_x/o"], "OUTPUT"),
]


@pytest.mark.parametrize("args,option", [c[1:] for c in OPTIONS], ids=[c[0] for c in OPTIONS])
def test_option_values_are_checked_when_parsed(base, tmp_path, capsys, args, option):
    argv = args(base, tmp_path)
    code = main(argv if argv[0] in ("verify", "finalize") else [*argv, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert option in err, (option, err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("output,words", [("~no_such_user_x/o", "no user no_such_user_x"), ("o\u0000", "NUL")])
def test_job_file_output_values(base, tmp_path, capsys, output, words):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"outputs": [{"output": output}]}))
    fails(["-i", str(base), "--job-file", str(job), "--no-progress"], capsys, str(job), "outputs[0]", words)


# -- 11. verify --source of another model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(base, other_seed, tmp_path_factory):
    """method -> (the source, another model of the same shapes, files and headers, the converted output): the
    V4 MXFP4 model for the per-row methods, a Qwen3 BF16 one for group-wise RAWINT4 (the V4 clamp refuses it)."""
    from kt_convert.synthetic.families import make_family_checkpoint

    work = tmp_path_factory.mktemp("verify-src")
    qwen = make_family_checkpoint(work / "qwen", "qwen3_moe_bf16").path
    qwen_other = make_family_checkpoint(work / "qwen-other", "qwen3_moe_bf16", seed=7).path
    found = {}
    for method, src, other, extra in (("int4", base, other_seed, []), ("int8", base, other_seed, []),
                                      ("rawint4", qwen, qwen_other, ["--group-size", "32"])):
        out = work / method
        assert main(["-i", str(src), "-o", str(out), "--no-progress", "--quant-method", method,
                     "--threadpool-count", "1", *extra]) == 0
        found[method] = (src, other, out)
    return found


@pytest.mark.parametrize("method", ["int4", "int8", "rawint4"])
def test_verify_refuses_another_model_of_the_same_shapes(models, capsys, method):
    """Same file names, sizes and headers (the identity the manifest records cannot tell them apart): the
    errors, far beyond what the method can produce, do."""
    src, other, out = models[method]
    fails(["verify", str(out), "--source", str(other)], capsys, f"--source {other} is not the checkpoint",
          "times the most", "layer ")


@pytest.mark.parametrize("method", ["int4", "int8", "rawint4"])
def test_verify_accepts_the_source_and_a_copy_of_it(models, tmp_path, capsys, method):
    src, _, out = models[method]
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)  # other modification times, same files
    for s in (src, copy):
        assert main(["verify", str(out), "--source", str(s)]) == 0, capsys.readouterr().err


def test_verify_refuses_other_source_files_before_reading_them(models, tmp_path, capsys):
    """Other file names (three shards instead of two) or other headers: refused from the identity the
    manifest records, naming it, before any tensor is compared."""
    three = make_v4_flash_checkpoint(tmp_path / "three", "v4-flash-tiny", num_experts=4, num_shards=3).path
    fails(["verify", str(models["int4"][2]), "--source", str(three)], capsys, "is not the checkpoint",
          "kt_manifest.json records")
    wider = make_v4_flash_checkpoint(tmp_path / "mtp", "v4-flash-tiny", num_experts=4, num_shards=2,
                                     mtp_layers=1).path
    fails(["verify", str(models["int8"][2]), "--source", str(wider)], capsys, "is not the checkpoint",
          "differs in size and its header")


def test_verify_refuses_another_model_for_a_subset_of_layers(models, capsys):
    src, other, out = models["int4"]
    fails(["verify", str(out), "--source", str(other), "--layers", "1"], capsys, "is not the checkpoint",
          "layer 1 expert 0")


def test_the_error_bound_holds_for_every_method_and_is_not_vacuous():
    """Every weight of kt's edge rows (scales at rounding ties, subnormals, flushed scales, outliers) packed
    by the reference quantizer is within QuantMethod.max_error of its row's largest |weight|, and the worst
    comes within a factor 2.5 of the bound (an int8 row, for one)."""
    import torch

    from helpers.numerics import kt_special_rows
    from kt_convert.kt_runtime.format.methods import METHODS
    from kt_convert.quant.reference import dequantize_packed, pack_reference

    w = kt_special_rows(256)
    # where the least-squares scale (RAWINT4) clips hardest: g - 1 equal small weights and one 1.0 per group
    clipping = torch.ones(32, 256)
    for g, v in ((32, 0.06298828125), (64, 0.05712890625), (128, 0.0498046875)):
        clipping[g // 32 - 1].view(-1, g)[:, :-1] = v
    w = torch.cat([w, clipping.to(torch.bfloat16)])
    x = w.float()
    for m in METHODS.values():
        packed, scales, _ = pack_reference(w, m)
        e = (dequantize_packed(packed, scales, *w.shape, m) - x).abs()
        amax = x.abs().amax(dim=1, keepdim=True) if m.group_size is None else \
            x.abs().view(len(x), -1, m.group_size).amax(dim=2).repeat_interleave(m.group_size, dim=1)
        worst = float((e / m.max_error(amax)).max())
        assert worst <= 1.0 and worst > 0.4, (m.name, worst)
    other = torch.roll(x, 1, dims=0)  # another matrix of the same shape: far beyond the bound
    e = (other - x).abs().amax()
    assert e > 3 * METHODS["int4"].max_error(float(x.abs().amax()))


# -- 12. one error root, mapped once; messages that fit the command -------------------------------------------


def test_one_error_root():
    from kt_convert.convert.hub_answers import HubAnswerError

    for cls in (UserError, HubAnswerError, PackedFormatError, kt_runtime.PackedWeightsError):
        assert issubclass(cls, FixableError) and issubclass(cls, ValueError)


def test_a_format_room_error_reaches_the_command_line_as_it_is(base, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(base, src)
    (src / SHARD1).write_bytes((src / SHARD1).read_bytes()[:100])  # a SafetensorsFormatError, not re-wrapped
    err = fails(convert_args(src, tmp_path / "out"), capsys, str(src / SHARD1), "re-download")
    assert err.count("error:") == 1


def test_os_errors_of_verify_say_nothing_of_layers(converted, tmp_path, capsys):
    for report in (tmp_path / "missing-dir" / "r.json", tmp_path / "file" / "r.json"):
        (tmp_path / "file").write_text("x")
        err = fails(["verify", str(converted), "--json", str(report)], capsys, "r.json", "re-run verify")
        assert "layers are kept" not in err and "resume" not in err


def test_os_errors_of_finalize_say_nothing_of_resuming_a_conversion(base, tmp_path, capsys, monkeypatch):
    src, out = _unfinished_output(base, tmp_path)
    import kt_convert.convert.output_job as output_job

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / INDEX_FILE))

    monkeypatch.setattr(output_job, "write_index", full)
    err = fails(["finalize", str(out)], capsys, INDEX_FILE, "No space left", "re-run finalize")
    assert "layers are kept" not in err


def test_os_errors_of_families_and_conversion_messages(capsys, monkeypatch, base, tmp_path):
    import kt_convert.convert.cli.families as families

    def broken(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(families, "families_table", broken)
    code = main(["families"])
    err = capsys.readouterr().err
    assert code == 2 and "Input/output error" in err and "layers" not in err and "internal error" not in err
    monkeypatch.undo()
    import kt_convert.convert.output_job as output_job

    def eio(*a, **k):
        raise OSError(errno.EIO, "Input/output error", "somewhere")

    monkeypatch.setattr(output_job, "copy_model_files", eio)
    fails(convert_args(base, tmp_path / "out"), capsys, "somewhere", "completed layers are kept")


def test_interrupting_verify_says_nothing_of_layers(converted, capsys, monkeypatch):
    import kt_convert.convert.verify as verify_module

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(verify_module, "verify", interrupted)
    code = main(["verify", str(converted)])
    err = capsys.readouterr().err
    assert code == 130 and err.splitlines()[-1].startswith("interrupted") and "layers" not in err


def _eval_stops(monkeypatch, error: BaseException):
    import kt_convert.convert.eval.evaluate as evaluate_module

    def stopped(*a, **k):
        raise error

    monkeypatch.setattr(evaluate_module, "evaluate", stopped)


def _eval_args(converted, base, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("a text to score\n")
    return ["eval", str(converted), "--model", str(base), "--text", str(text)]


def test_interrupting_eval_says_what_eval_leaves(converted, base, tmp_path, capsys, monkeypatch):
    _eval_stops(monkeypatch, KeyboardInterrupt())
    code = main(_eval_args(converted, base, tmp_path))
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert code == 130 and last.startswith("interrupted") and "re-run eval" in last
    assert "layers" not in err and "resume" not in err


def test_os_errors_and_thread_limits_of_eval_fit_eval(converted, base, tmp_path, capsys, monkeypatch):
    _eval_stops(monkeypatch, OSError(errno.EIO, "Input/output error", "somewhere"))
    err = fails(_eval_args(converted, base, tmp_path), capsys, "somewhere", "Input/output error", "re-run eval")
    assert "layers are kept" not in err and "resume" not in err
    _eval_stops(monkeypatch, RuntimeError("can't start new thread"))
    err = fails(_eval_args(converted, base, tmp_path), capsys, "--threads", "ulimit", "re-run eval")
    assert "--cpuinfer-threads" not in err and "layers are kept" not in err


def test_a_thread_limit_in_verify_names_its_own_option(converted, capsys, monkeypatch):
    import kt_convert.convert.verify as verify_module

    def no_thread(*a, **k):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(verify_module, "verify", no_thread)
    err = fails(["verify", str(converted)], capsys, "--threads", "ulimit")
    assert "--cpuinfer-threads" not in err and "layers are kept" not in err
