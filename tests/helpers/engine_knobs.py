"""The engine's tuning knobs for tests (kt_kernels._testing.knob): set for the length of a block, restored after.
No knob changes a result, so tests set them to reach every schedule and kernel path."""
from __future__ import annotations

from contextlib import contextmanager

from kt_convert.kt_kernels import _testing


@contextmanager
def knobs(**values):
    """with knobs(prefill_min_avg_rows=0): ... sets each knob, and restores every one named here on exit (also those
    the block changes itself with _testing.knob)."""
    old = {}
    try:
        for name, value in values.items():
            old[name] = _testing.knob(name, value)
        yield
    finally:
        for name, value in old.items():
            _testing.knob(name, value)
