"""The command line's verbs as a newcomer meets them: the conversion's --help lists the other commands
(the conversion is the default command, so its help is the program's), and a first word that names no
command is answered with the nearest one instead of the conversion's "Missing option '--input-path'"."""
from __future__ import annotations

import difflib

import click


class DefaultCommand(click.Command):
    """The group's default command. `group` (set by the group) is where the other commands are listed from."""

    group: click.Group | None = None

    def others(self) -> list[click.Command]:
        return [c for name, c in self.group.commands.items() if name != self.name] if self.group else []

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_usage(ctx, formatter)
        if self.others():
            formatter.write_usage(ctx.find_root().info_name, "COMMAND [ARGS]...", prefix="       ")

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_help_text(ctx, formatter)
        others = self.others()
        if others:  # as click.Group lists its commands
            limit = formatter.width - 6 - max(len(c.name) for c in others)
            rows = [(c.name, c.get_short_help_str(limit=limit)) for c in others]
            root = ctx.find_root().info_name
            with formatter.section(f"Commands ({root} COMMAND --help for each)"):
                formatter.write_dl(rows)


def unknown_verb_problem(word: str, names: list[str]) -> str:
    """What to say when the first argument is a bare word that names no command (the conversion takes
    options only)."""
    match = difflib.get_close_matches(word.lower(), names, n=1, cutoff=0.6)
    listed = ", ".join(names)
    if match:
        return f"no such command {word!r}; did you mean {match[0]!r}? (the commands: {listed})"
    hint = (f"to convert it, pass it with -i: convert-cpu-weights -i {word} -o OUT" if "/" in word or "." in word
            else "a conversion takes options only: convert-cpu-weights -i SRC -o OUT")
    return f"{word!r} is not a command (the commands: {listed}); {hint}; --help lists the options"
