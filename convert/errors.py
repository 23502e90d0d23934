"""Errors a user can cause and fix: the CLI prints them without a traceback and exits 2."""


class UserError(Exception):
    """A problem with the input, the arguments or the machine, with what to do about it."""


class NonFiniteError(UserError):
    pass
