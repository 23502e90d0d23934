"""Progress: a tqdm bar (bytes, GB/s, ETA) on a terminal, one plain line per layer otherwise."""
from __future__ import annotations

import os
import sys
import time

from .units import rate, size

MIN_BAR_COLUMNS = 40  # narrower (or a terminal that reports 0 columns): plain lines, never an empty bar


def terminal_columns(stream) -> int:
    """The stream's terminal width; 0 where it reports none (a serial console, some CI runners)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


class Progress:
    """total_layers: the run's MoE layers; done_layers of them were already done (a resume): layers
    are counted as (done + this run's)/total, so the last one reads (total/total)."""

    def __init__(self, total_bytes: int, total_layers: int, enabled: bool | None = None, stream=None,
                 done_layers: int = 0):
        self.stream = stream or sys.stderr
        self.total_layers = total_layers
        self.tty = self.stream.isatty() if enabled is None else enabled
        self.bar = None
        narrow = self._isatty() and terminal_columns(self.stream) < MIN_BAR_COLUMNS  # (--progress into a pipe: a bar)
        if self.tty and total_bytes and not narrow:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, file=self.stream,
                            dynamic_ncols=True, smoothing=0.1)
        self._layer_start = time.perf_counter()
        self._done = done_layers

    def _isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def layer_start(self, layer: int) -> None:
        self._layer_start = time.perf_counter()
        if self.bar is not None:
            self.bar.set_description(f"layer {layer} ({self._done + 1}/{self.total_layers})")

    def advance(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)

    def layer_done(self, layer: int, nbytes: int) -> None:
        self._done += 1
        seconds = time.perf_counter() - self._layer_start
        if self.bar is None:
            print(f"layer {layer} done ({self._done}/{self.total_layers}): {size(nbytes)} in {seconds:.1f} s "
                  f"({rate(nbytes, seconds)})", file=self.stream, flush=True)

    def stage(self, what: str) -> None:
        """Work after the last byte was packed (the last layer's fsync, copies, the index): the bar
        says so instead of sitting at 100%; plain output stays one line per layer."""
        if self.bar is not None:
            self.bar.set_description(what)
            self.bar.refresh()

    def note(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:  # one write per line: lines of other threads never land inside it
            self.stream.write(message + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
