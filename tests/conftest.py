"""Fixtures every test may use and the markers' skips; what tests share by name is in tests/helpers."""
import os

import pytest

from helpers.kt import kt_compat
from helpers.namespace import stray_modules


def pytest_collection_modifyitems(config, items):
    from kt_convert import kt_kernels
    import torch

    # KT_GPU_TEST_DEVICE=cpu with TRITON_INTERPRET=1: the Triton kernel tests run on the interpreter
    interpreted = os.environ.get("KT_GPU_TEST_DEVICE") == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_amx = pytest.mark.skip(reason="needs a CPU with AMX")
    no_kt = pytest.mark.skip(reason="needs kt-kernel: set KT_KERNEL_PATH (scripts/kt_compat.py)")
    kt_missing = None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available() and not interpreted:
            item.add_marker(no_gpu)
        if "amx" in item.keywords and kt_kernels.best_isa() != "amx":
            item.add_marker(no_amx)
        if item.get_closest_marker("kt") is not None:
            if kt_missing is None:
                kt_missing = kt_compat().find_kt(os.environ.get("KT_KERNEL_PATH")) is None
            if kt_missing:
                item.add_marker(no_kt)


@pytest.fixture(autouse=True)
def _outside_array_jobs(monkeypatch):
    """Tests run as plain processes even inside a SLURM array or a Kubernetes Indexed Job (whose index
    would otherwise make every conversion a --shard; tests/test_batch.py sets them where it means to)."""
    for name in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A v4-flash-tiny checkpoint (2 layers, 8 experts, H=384, I=512) with one MTP layer, 3 shards."""
    from kt_convert.synthetic.v4_flash import make_v4_flash_checkpoint

    return make_v4_flash_checkpoint(tmp_path_factory.mktemp("ckpt") / "v4", "v4-flash-tiny", mtp_layers=1, num_shards=3)


os.environ.setdefault("TQDM_DISABLE", "1")


def pytest_sessionfinish(session, exitstatus):
    """The suite fails if any test loaded a module of the package under an old or second name."""
    stray = stray_modules()
    if stray:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            "modules of the package loaded under another name than kt_convert.*: " + ", ".join(stray), red=True)
