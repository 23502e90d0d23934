"""Host functions in CUDA stream order: cuLaunchHostFunc (the driver API, libcuda.so.1, which torch's CUDA
runtime already loaded) or cudaLaunchHostFunc (the libcudart torch loaded) through ctypes.

A host function queued on a stream runs on the CUDA runtime's callback thread once the work queued
before it is done, and the work queued after it waits for it to return; it is captured into a CUDA graph
as a host node (replayed with the same argument pointer). The functions queued here are the C++
engine's host_submit / host_wait (kt_kernels.host_functions), which call no CUDA.
"""
from __future__ import annotations

import ctypes
import os
import threading

import torch

from ..format.files import read_system_text, system_glob

_lock = threading.Lock()
_launch = None  # (name, function) once found


def _loaded_libraries(stem: str) -> list[str]:
    """Paths of already-mapped shared libraries named stem*.so* (Linux /proc/self/maps)."""
    maps = read_system_text("/proc/self/maps", 64 << 20) or ""
    paths = {line.split()[-1] for line in maps.splitlines() if stem in line and ".so" in line}
    return sorted(p for p in paths if os.path.basename(p).startswith(stem))


def _find_launch():
    """The first host-function launcher that loads: libcuda's cuLaunchHostFunc, else libcudart's."""
    candidates = [("cuLaunchHostFunc", p) for p in _loaded_libraries("libcuda.so") + ["libcuda.so.1"]]
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    cudart = _loaded_libraries("libcudart") + system_glob(os.path.join(torch_lib, "libcudart*.so*"))
    candidates += [("cudaLaunchHostFunc", p) for p in cudart]
    errors = []
    for name, path in candidates:
        try:
            lib = ctypes.CDLL(path)
            fn = getattr(lib, name)
        except (OSError, AttributeError) as e:
            errors.append(f"{path}: {e}")
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        return name, fn
    raise RuntimeError("no CUDA host-function launcher found (cuLaunchHostFunc in libcuda.so.1, "
                       "cudaLaunchHostFunc in libcudart): " + "; ".join(errors[:4]))


def launcher_name() -> str:
    """Which function queues the host functions ("cuLaunchHostFunc" or "cudaLaunchHostFunc")."""
    return _get()[0]


def _get():
    global _launch
    if _launch is None:
        with _lock:
            if _launch is None:
                _launch = _find_launch()
    return _launch


def launch_host_func(stream: torch.cuda.Stream, fn_address: int, arg_address: int) -> None:
    """Queue fn(arg) on `stream` (RuntimeError naming the CUDA error code on failure)."""
    name, fn = _get()
    err = fn(ctypes.c_void_p(stream.cuda_stream), ctypes.c_void_p(fn_address), ctypes.c_void_p(arg_address))
    if err != 0:
        raise RuntimeError(f"{name} failed with CUDA error {err} on stream {stream}")


def available() -> bool:
    """Whether host functions can be queued here (CUDA present and a launcher found)."""
    if not torch.cuda.is_available():
        return False
    try:
        _get()
    except RuntimeError:
        return False
    return True
