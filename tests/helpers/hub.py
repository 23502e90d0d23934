"""A local hub in a test (synthetic.hub_server.LocalHub serving the module's `source` fixture as REPO), the
environment that points huggingface_hub at it, and the converter's command line against it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kt_convert.synthetic.hub_server import LocalHub

from . import ROOT

REPO = "org/tiny-v4"


@pytest.fixture
def served(source):
    hub = LocalHub(REPO, source)
    hub.start()
    yield hub
    hub.stop()


def base_env() -> dict:
    """This environment without huggingface_hub's settings, the project on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k not in ("TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def hub_env(endpoint: str, cache: Path, **extra) -> dict:
    env = base_env()
    env.update(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "hf-home"),
               HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_HUB_DISABLE_IMPLICIT_TOKEN="1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")
    env.update(extra)
    return env


def cli(env, *args, out=None):
    cmd = [sys.executable, "-m", "kt_convert", "-i", REPO, "--threadpool-count", "1", "--no-progress", *args]
    if out is not None:
        cmd += ["-o", str(out)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=240)
