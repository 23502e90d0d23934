"""What the command line says when a command stops: one table from error type to message, each message
fitting the command that ran (a conversion keeps its completed layers; verify, eval and families change
nothing; finalize completes where it stopped). main() looks the error up here once; anything not in
the table is a bug (exit 1, with its trace)."""
from __future__ import annotations

import errno
from typing import Callable

from kt_convert.kt_runtime.format.errors import FixableError

EXIT_OK, EXIT_INTERNAL, EXIT_USER = 0, 1, 2

# what is left after a stop, and how to go on, by command
AFTER_A_STOP = {
    "convert": "completed layers are kept, re-run the same command to resume",
    "finalize": "nothing half-done is left: re-run finalize once it is fixed",
    "verify": "the output is as it was: re-run verify once it is fixed",
    "eval": "the output and the model are as they were and no report was written: re-run eval once it is fixed",
}
# what is left after Ctrl-C or SIGTERM, where it differs (nothing to fix: the user stopped it)
AFTER_AN_INTERRUPT = {
    "convert": "completed layers are kept; re-run the same command to resume",
    "eval": "no scores were reported and the output and the model are as they were; re-run eval to measure",
}
THREADS_OPTION = {"convert": "--cpuinfer-threads", "verify": "--threads", "eval": "--threads"}


def after_a_stop(command: str) -> str:
    return AFTER_A_STOP.get(command, "nothing was changed")


def interrupted_message(command: str) -> str:
    return "interrupted; " + AFTER_AN_INTERRUPT.get(command, after_a_stop(command))


def _os_error(e: OSError, command: str) -> str:
    where = f"{e.filename}: " if e.filename else ""
    what = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what += " (no space left: free some)"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what += " (choose a path you can " + ("write" if command in ("convert", "finalize") else "read and write") + ")"
    return f"{where}{what}; {after_a_stop(command)}"


def _thread_start(e: RuntimeError, command: str) -> str:
    option = THREADS_OPTION.get(command)
    fewer = f" or pass a smaller {option}" if option else ""
    return (f"cannot start a thread ({e}): the system limits threads per user (ulimit -u) or address space "
            f"(ulimit -v); raise the limit{fewer}, then re-run ({after_a_stop(command)})")


def _is_thread_start(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and "can't start new thread" in str(e)


# (type, message) in order: the first whose type matches gives the message
ERROR_MESSAGES: list[tuple[type[BaseException], Callable[[BaseException, str], str | None]]] = [
    (FixableError, lambda e, command: str(e)),  # the converter's and the format room's, already worded
    (OSError, _os_error),  # the machine's: a full disk, a path that cannot be written, ...
    (RuntimeError, lambda e, command: _thread_start(e, command) if _is_thread_start(e) else None),
]


def known_error(e: BaseException, command: str) -> str | None:
    """The message for an error a user can fix (exit 2), or None for a bug."""
    for kind, message in ERROR_MESSAGES:
        if isinstance(e, kind):
            return message(e, command)
    return None
