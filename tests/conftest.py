import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(config, items):
    import kt_kernels
    import torch

    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_amx = pytest.mark.skip(reason="needs a CPU with AMX")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "amx" in item.keywords and kt_kernels.best_isa() != "amx":
            item.add_marker(no_amx)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A v4-flash-tiny checkpoint (2 layers, 8 experts, H=384, I=512) with one MTP layer, 3 shards."""
    from convert.synthetic import make_v4_flash_checkpoint

    return make_v4_flash_checkpoint(tmp_path_factory.mktemp("ckpt") / "v4", "v4-flash-tiny", mtp_layers=1, num_shards=3)


def tree_hashes(path: Path) -> dict[str, str]:
    """sha256 of every file under path (except the lock), by relative name."""
    import hashlib

    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file() and p.name != ".kt_convert.lock":
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def random_bf16(n, k, seed, scale=1.0):
    """A random bf16 matrix with an all-zero row and an outlier (packer test input)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * scale).to(torch.bfloat16)
    w[0, :] = 0
    w[1, 5] = 40.0 * scale
    return w


def read_json(path):
    return json.loads(Path(path).read_text())


os.environ.setdefault("TQDM_DISABLE", "1")
