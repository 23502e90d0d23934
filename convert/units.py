"""How counts, sizes and rates read in messages: "1 layer", "2 layers"; the unit that keeps 3
significant digits ("28.7 MB", "512 kB", never "0.00 GB")."""
from __future__ import annotations

_DECIMAL = (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3))
_BINARY = (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10))


def plural(n: int, word: str, words: str | None = None) -> str:
    """'1 layer', '0 layers', '2 layers' (words: an irregular plural)."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def _scaled(n: float, units) -> str:
    for name, size in units:
        if abs(n) >= size:
            v = n / size
            return f"{v:.3g} {name}" if v < 1000 else f"{v:.0f} {name}"
    return f"{n:.0f} B"


def size(n: float) -> str:
    """Bytes in decimal units (disk sizes and throughput, as df and the hub show them)."""
    return _scaled(n, _DECIMAL)


def memory(n: float) -> str:
    """Bytes in binary units (memory, as free and /proc/meminfo show it)."""
    return _scaled(n, _BINARY)


def rate(nbytes: float, seconds: float) -> str:
    return f"{size(nbytes / seconds)}/s" if seconds > 0 else "-"
