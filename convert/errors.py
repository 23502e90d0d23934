"""Errors a user can cause and fix: the CLI prints them without a traceback and exits 2 (the format
room's FixableError is their root, so that errors of either side are mapped once)."""
from kt_convert.kt_runtime.format.errors import FixableError


class UserError(FixableError):
    """A problem with the input, the arguments or the machine, with what to do about it."""


class NonFiniteError(UserError):
    pass
