"""The launcher thread: one persistent daemon thread per process that runs the GPU part's kernel
launches while the calling thread runs the CPU engine.

A lock and a SimpleQueue (both C-level, GIL released while blocked): the hand-off costs a thread
wake-up, not an executor's futures and conditions. Jobs run in submission order. A forked child starts
its own thread on first use.
"""
from __future__ import annotations

import os
import queue
import threading

import torch


class Job:
    """One call handed to the launcher thread; wait() returns its result or re-raises its error."""

    __slots__ = ("fn", "args", "result", "error", "_done")

    def __init__(self, fn, args):
        self.fn, self.args, self.result, self.error = fn, args, None, None
        self._done = threading.Lock()
        self._done.acquire()

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            self.error = e
        finally:
            self.fn = self.args = None
            self._done.release()

    def wait(self, reraise: bool = True):
        self._done.acquire()
        self._done.release()
        if self.error is not None and reraise:
            raise self.error
        return self.result


class Launcher:
    """A daemon thread running jobs in order."""

    def __init__(self, name: str = "kt-gpu-launch"):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        torch.set_grad_enabled(False)  # thread-local; the jobs build no autograd graph
        while True:
            job = self._q.get()
            if job is None:
                return
            job.run()

    def submit(self, fn, *args) -> Job:
        job = Job(fn, args)
        self._q.put(job)
        return job


_launcher: Launcher | None = None
_lock = threading.Lock()


def launcher() -> Launcher:
    """The process's launcher thread (started on first use)."""
    global _launcher
    obj = _launcher
    if obj is None or not obj.thread.is_alive():
        with _lock:
            if _launcher is None or not _launcher.thread.is_alive():
                _launcher = Launcher()
            obj = _launcher
    return obj


def _forget_launcher() -> None:  # a forked child has no launcher thread
    global _launcher, _lock
    _launcher = None
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_launcher)
