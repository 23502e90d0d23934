"""The deadline of the hostile-input tests: a test that blocks (a FIFO opened, a lock never released) fails
after DEADLINE_S instead of hanging the run. Imported by a test module, the fixture is autouse there."""
from __future__ import annotations

import signal

import pytest

DEADLINE_S = 60


class Hung(BaseException):
    """Raised by the deadline: a BaseException so that no `except Exception` in the CLI hides it."""


@pytest.fixture(autouse=True)
def deadline():
    def on_alarm(signum, frame):
        raise Hung(f"still running after {DEADLINE_S} s: something blocked")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(DEADLINE_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
