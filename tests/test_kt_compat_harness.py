"""scripts/kt_compat.py without kt-kernel: where it looks for kt, the pin_memory workaround, and how a child
run that crashes, raises, hangs or returns NaN is reported (a stand-in kt_kernel package plays kt), so the
harness's own logic runs on CI."""
import json
import signal
import types

import numpy as np
import pytest
import torch

from helpers.kt import kt_compat

FAKE_KT = '''
import os, signal, time
import torch
__cpu_variant__, __version__ = "fake", "0.0"

class KTMoEWrapper:
    def __init__(self, **kw):
        self.kw, self.moe = kw, None

    def load_weights(self, identity):
        pass

    def forward(self, x, ids, weights, stream):
        mode = os.environ["FAKE_KT_MODE"]
        if mode == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        if mode == "raise":
            raise RuntimeError("RAWINT4 per-expert pointer mode requires kt_threadpool_count=1")
        if mode == "hang":
            time.sleep(60)
        if mode == "pinned":  # what kt does with its staging buffers
            torch.zeros(2, pin_memory=True)
        y = torch.zeros(x.shape, dtype=torch.bfloat16)
        return y + float("nan") if mode == "nan" else y + 1
'''


@pytest.fixture()
def fake_kt(tmp_path):
    root = tmp_path / "kt"
    (root / "kt_kernel").mkdir(parents=True)
    (root / "kt_kernel" / "__init__.py").write_text(FAKE_KT)
    return root


def _job(tmp_path, mode):
    x = torch.randn(2, 8).to(torch.bfloat16)
    np.savez(tmp_path / "in.npz", x_bits=x.view(torch.int16).numpy().view(np.uint16), ids=np.zeros((2, 1), np.int64),
             weights=np.ones((2, 1), np.float32))
    return {"weights": str(tmp_path), "method": "RAWINT4", "layer": 0, "num_experts": 2, "hidden_size": 8,
            "moe_intermediate_size": 8, "threads": 1, "threadpool_count": 1, "inputs": str(tmp_path / "in.npz"),
            "env": {"FAKE_KT_MODE": mode}}


def test_finding_kt(fake_kt, tmp_path):
    module = kt_compat()
    assert module.find_kt(str(fake_kt)) == str(fake_kt) and module.has_package(str(fake_kt))
    assert module.find_kt(str(tmp_path / "nothing")) is None
    built = tmp_path / "built"
    built.mkdir()
    (built / "kt_kernel_ext.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    assert module.find_kt(str(built)) == str(built) and not module.has_package(str(built))


@pytest.mark.parametrize("mode, status", [("ok", "ok"), ("nan", "nan"), ("pinned", "ok"),
                                          ("crash", "crashed (signal SIGSEGV)"),
                                          ("raise", "refused: RuntimeError: RAWINT4 per-expert pointer mode requires "
                                                    "kt_threadpool_count=1")])
def test_child_runs_are_contained(fake_kt, tmp_path, mode, status):
    y, ran, got = kt_compat().run_kt(_job(tmp_path, mode), str(fake_kt), tmp_path, timeout=120)
    assert got == status
    if status in ("ok", "nan"):
        assert y.shape == (2, 8) and ran == {"api": "KTMoEWrapper", "backend": "NoneType", "variant": "fake",
                                             "version": "0.0"}
        assert np.all(y == 1) if status == "ok" else np.all(np.isnan(y))
    else:
        assert y is None


def test_a_hung_child_is_stopped(fake_kt, tmp_path):
    assert kt_compat().run_kt(_job(tmp_path, "hang"), str(fake_kt), tmp_path, timeout=5)[2] == "timeout"


def test_pinned_buffers_become_plain_ones_without_cuda():
    calls = []
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: False),
                                 **{n: (lambda *a, _n=n, **kw: calls.append((_n, kw)) or _n)
                                    for n in ("zeros", "empty", "full", "ones")})
    kt_compat()._without_pinned_memory(fake)
    assert fake.zeros(3, pin_memory=True, dtype="bf16") == "zeros" and calls == [("zeros", {"dtype": "bf16"})]


def test_cli_refusals(fake_kt, tmp_path, capsys):
    module = kt_compat()
    assert module.main(["--kt-path", str(tmp_path / "none")]) == 2
    assert "kt-kernel not found" in capsys.readouterr().err
    assert module.main(["--kt-path", str(fake_kt)]) == 2
    assert "nothing to check" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert module.main(["--kt-path", str(fake_kt), "--synthetic", str(tmp_path / "taken")]) == 2
    assert "exists; name a new folder" in capsys.readouterr().err
    assert json.loads(json.dumps(module.SYNTHETIC_OUTPUTS))  # the standard set is plain data
