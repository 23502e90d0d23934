"""Option values checked completely when the command line is parsed, so that no value a user typed fails
later as an internal error: paths (no NUL character; `~` and `~user` expanded, an unknown user named)
and numbers (finite, in range). Each refusal names the option."""
from __future__ import annotations

import math
import os
from pathlib import Path

import click


def path_problem(text: str) -> str | None:
    """Why `text` cannot be a path of this machine (None: it can)."""
    if "\0" in text:
        return "contains a NUL character"
    if not text:
        return "is empty"
    if text.startswith("~"):
        user = text[1:].split("/", 1)[0]
        if os.path.expanduser(text) == text:
            return f"starts with ~{user}, but there is no user {user or '(home directory unknown)'} here"
    return None


def user_path(text: str) -> Path:
    """A path the user typed, `~` expanded (ValueError with path_problem's reason)."""
    problem = path_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return Path(os.path.expanduser(text))


class PathType(click.ParamType):
    """A file or folder path: refused with the option named when it cannot be one; `-` kept as is
    where allow_dash (standard output)."""

    name = "path"

    def __init__(self, allow_dash: bool = False):
        self.allow_dash = allow_dash

    def get_metavar(self, param, ctx=None):
        return None if getattr(param, "param_type_name", "") == "argument" else "PATH"  # an argument: its name

    def convert(self, value, param, ctx):
        if isinstance(value, Path):
            value = str(value)
        if self.allow_dash and value == "-":
            return Path("-")
        try:
            return user_path(value)
        except ValueError as e:
            self.fail(f"{value!r} {e}", param, ctx)


class SourceSpec(click.ParamType):
    """A checkpoint: a local path or a hub id ORG/NAME[@REV] (kept as text; a path's `~` expanded later)."""

    name = "text"

    def convert(self, value, param, ctx):
        problem = path_problem(value)
        if problem is not None:
            self.fail(f"{value!r} {problem}", param, ctx)
        return value


class FiniteFloat(click.ParamType):
    """A finite number, > 0 (positive) or >= 0."""

    name = "number"

    def __init__(self, positive: bool):
        self.positive = positive

    def convert(self, value, param, ctx):
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x) or x < 0 or (self.positive and x == 0):
            self.fail(f"{value!r}: must be a finite number {'> 0' if self.positive else '>= 0'}", param, ctx)
        return x


PATH = PathType()
REPORT = PathType(allow_dash=True)
SOURCE = SourceSpec()
POSITIVE = FiniteFloat(positive=True)
NON_NEGATIVE = FiniteFloat(positive=False)
