"""The one argument parser every ``cdi-*`` command uses: usage errors are one line.

argparse's own parser prints the whole usage block before the error; ours prints
``<prog>: error: <message>`` and exits with status 2, or, for commands whose exit status or
prompts depend on the error, raises it instead (``raise_as``)::

    parser = OneLineArgumentParser(prog="cdi-report")            # one line, exit 2
    parser = OneLineArgumentParser(prog="cdi-matrix", raise_as=CliError, help_hint=True)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

EXIT_USAGE = 2


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, not the usage block plus the error.

    Args:
        *args: passed to :class:`argparse.ArgumentParser`.
        raise_as: when set, a usage error raises ``raise_as(message)`` instead of printing
            ``<prog>: error: <message>`` to stderr and exiting with status 2; the caller
            prints it and picks the exit status. ``--help`` still exits (status 0).
        help_hint: append ``; see '<prog> --help'`` to messages that do not already say how
            to go on (argparse's own messages hold no ``;``, ours always do).
        **kwargs: passed to :class:`argparse.ArgumentParser`.
    """

    def __init__(
        self,
        *args: Any,
        raise_as: type[Exception] | None = None,
        help_hint: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.raise_as = raise_as
        self.help_hint = help_hint

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        if self.help_hint and ";" not in message:
            message += f"; see '{self.prog} --help'"
        if self.raise_as is not None:
            raise self.raise_as(message)
        print(f"{self.prog}: error: {one_line(message)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) made one space.

    >>> one_line("no such file:\\n  'x.npy'")
    "no such file: 'x.npy'"
    """
    return " ".join(str(text).split())


def print_error(prog: str, error: object) -> None:
    """Print ``<prog>: error: <error>`` as one line to stderr (the command-line edge)."""
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr)


__all__ = ["EXIT_USAGE", "OneLineArgumentParser", "one_line", "print_error"]
