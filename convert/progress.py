"""Progress: a tqdm bar (bytes, GB/s, ETA) on a terminal, one plain line per layer otherwise."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total_bytes: int, total_layers: int, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.total_layers = total_layers
        self.tty = self.stream.isatty() if enabled is None else enabled
        self.bar = None
        if self.tty and total_bytes:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, file=self.stream,
                            dynamic_ncols=True, smoothing=0.1)
        self._layer_start = time.perf_counter()
        self._done = 0

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
            rate = nbytes / seconds / 1e9 if seconds > 0 else 0.0
            print(f"layer {layer} done ({self._done}/{self.total_layers}): {nbytes / 1e9:.2f} GB in {seconds:.1f} s "
                  f"({rate:.2f} GB/s)", file=self.stream, flush=True)

    def note(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
