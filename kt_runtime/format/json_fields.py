"""Typed reads of fields from parsed JSON (config.json, indexes, manifests): a value of the wrong
type or out of range raises FieldError naming the file and the field, instead of a TypeError,
an OverflowError or a silently ignored value later on.

    get_int(cfg, "hidden_size", where, lo=1, hi=1 << 20)
    get_number(cfg, "swiglu_limit", where, positive=True, default=None)
"""
from __future__ import annotations

import math
from typing import Any

from .errors import FieldError

REQUIRED = object()


def describe(value: Any) -> str:
    """A short, safe description of a JSON value (no 5,000-digit reprs)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if value.bit_length() > 64:
            return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, list):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, dict):
        return f"an object with {len(value)} key{'' if len(value) == 1 else 's'}"
    return type(value).__name__


def _field(obj: Any, key: str, where: str, path: str, default: Any):
    if not isinstance(obj, dict):
        raise FieldError(f"{where}: {path.rstrip('.') or 'the file'} must be a JSON object, found {describe(obj)}")
    if key in obj and obj[key] is not None:
        return obj[key], True
    if default is REQUIRED:
        raise FieldError(f"{where}: {path}{key} is {'null' if key in obj else 'missing'}")
    return default, False


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _range_text(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" between {lo} and {hi}"
    return f" >= {lo}" if lo is not None else (f" <= {hi}" if hi is not None else "")


def check_int(value: Any, name: str, where: str, lo: int | None = None, hi: int | None = None) -> int:
    if not is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise FieldError(f"{where}: {name} must be an integer{_range_text(lo, hi)}, found {describe(value)}")
    return value


def get_int(obj: Any, key: str, where: str, *, lo: int | None = None, hi: int | None = None,
            default: Any = REQUIRED, path: str = "") -> Any:
    value, present = _field(obj, key, where, path, default)
    return check_int(value, path + key, where, lo, hi) if present else value


def get_number(obj: Any, key: str, where: str, *, positive: bool = False, default: Any = REQUIRED,
               path: str = "") -> Any:
    """A finite int or float (positive: > 0), returned as float."""
    value, present = _field(obj, key, where, path, default)
    if not present:
        return value
    ok = (is_int(value) and value.bit_length() <= 1024) or isinstance(value, float)
    if ok:
        value = float(value)
        ok = math.isfinite(value) and (not positive or value > 0)
    if not ok:
        what = "a finite number" + (" > 0" if positive else "")
        raise FieldError(f"{where}: {path}{key} must be {what}, found {describe(obj[key])}")
    return value


def get_str(obj: Any, key: str, where: str, *, choices: tuple[str, ...] | None = None,
            default: Any = REQUIRED, path: str = "") -> Any:
    value, present = _field(obj, key, where, path, default)
    if present and (not isinstance(value, str) or (choices is not None and value not in choices)):
        allowed = f" (one of {', '.join(choices)})" if choices else ""
        raise FieldError(f"{where}: {path}{key} must be a string{allowed}, found {describe(value)}")
    return value


def get_dict(obj: Any, key: str, where: str, *, default: Any = REQUIRED, path: str = "") -> Any:
    value, present = _field(obj, key, where, path, default)
    if present and not isinstance(value, dict):
        raise FieldError(f"{where}: {path}{key} must be a JSON object, found {describe(value)}")
    return value


def get_int_list(obj: Any, key: str, where: str, *, lo: int | None = None, hi: int | None = None,
                 length: int | None = None, default: Any = REQUIRED, path: str = "") -> Any:
    value, present = _field(obj, key, where, path, default)
    if not present:
        return value
    if not isinstance(value, list) or (length is not None and len(value) != length):
        shape = f"a list of {length} integers" if length is not None else "a list of integers"
        raise FieldError(f"{where}: {path}{key} must be {shape}, found {describe(value)}")
    for i, item in enumerate(value):
        check_int(item, f"{path}{key}[{i}]", where, lo, hi)
    return list(value)
