"""convert-cpu-weights: the command line. A click group whose default command is the conversion with
kt's flags: `convert-cpu-weights -i X -o Y` (and `python -m kt_convert ...`, scripts/convert_cpu_weights.py)
run it exactly as kt's script, `convert-cpu-weights convert -i X -o Y` names it. Further subcommands
live in their own modules here and are added to COMMANDS. main() maps errors to exit codes once
(error_messages.py): 0 done, 2 a problem the user can fix (the message says how, in the words of the
command that ran), 1 a bug; 128 + N on signal N.
"""
from __future__ import annotations

import signal
import sys
import threading
import traceback

import click

from .conversion import convert_command
from .error_messages import EXIT_INTERNAL, EXIT_OK, EXIT_USER, interrupted_message, known_error
from .evaluate import eval_command
from .families import families_command
from .kt_flags import check_kt_flags
from .finalize import finalize_command
from .verbs import DefaultCommand, unknown_verb_problem
from .verify import verify_command

class DefaultCommandGroup(click.Group):
    """A group that runs its default command when the first argument names no subcommand, exactly as if
    that command were the program (its usage line and errors unchanged; its help lists the other commands).
    A first argument that is a word, not an option, must name a command."""

    def __init__(self, *args, default: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.default = default
        assert isinstance(self.commands[default], DefaultCommand)
        self.commands[default].group = self

    def main(self, args=None, prog_name=None, **extra):
        args = list(sys.argv[1:] if args is None else args)
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            raise click.UsageError(unknown_verb_problem(args[0], list(self.commands)))
        if not args or args[0] not in self.commands:
            check_kt_flags(args)
            return self.commands[self.default].main(args, prog_name=prog_name, **extra)
        if args[0] == self.default:
            check_kt_flags(args[1:])
        return super().main(args, prog_name=prog_name, **extra)


COMMANDS = (convert_command, verify_command, finalize_command, families_command, eval_command)
cli = DefaultCommandGroup(name="convert-cpu-weights", commands=COMMANDS, default=convert_command.name,
                          context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})


INTERRUPTED = interrupted_message(convert_command.name)  # what a stopped conversion says last


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: unwinds like Ctrl-C (the layer in progress is aborted, the lock released)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _SignalsUnwind:
    """Until restore(), SIGINT and SIGTERM raise Interrupted in the main thread, once: a second
    signal does not cut the clean-up short (it takes one batch write at most)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.previous = {}
        self.fired = False
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if not self.fired:
            self.fired = True
            raise Interrupted(signum)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _interrupted(e: BaseException, command: str) -> int:
    signum = getattr(e, "signum", signal.SIGINT)
    click.echo(interrupted_message(command), err=True)
    return 128 + signum


def command_of(argv: list[str] | None) -> str:
    """The subcommand argv runs (the conversion when it names none)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return args[0] if args and args[0] in cli.commands else convert_command.name


def main(argv: list[str] | None = None) -> int:
    signals = _SignalsUnwind()  # also covers the messages below: a second signal never prints a trace
    try:
        return _main(argv)
    finally:
        signals.restore()


def _main(argv: list[str] | None) -> int:
    command = command_of(argv)
    try:
        cli.main(args=argv, prog_name="convert-cpu-weights", standalone_mode=False)
        return EXIT_OK
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.UsageError as e:
        e.show()
        return EXIT_USER
    except click.Abort as e:  # click turns KeyboardInterrupt into Abort
        if isinstance(e.__cause__, KeyboardInterrupt):
            return _interrupted(e.__cause__, command)
        click.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt as e:
        return _interrupted(e, command)
    except Exception as e:
        message = known_error(e, command)
        if message is not None:
            click.echo(f"error: {message}", err=True)
            return EXIT_USER
        traceback.print_exc()
        click.echo("internal error: this is a bug in convert-cpu-weights; please report it with the trace above",
                   err=True)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
