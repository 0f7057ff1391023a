"""The subcommand registry of the ``austeer`` command line: :class:`Command`, :data:`COMMANDS`,
:func:`register_command` and :class:`CommandError`.

Kept apart from ``cli/__init__.py`` (the parser and ``main``) so that the command modules can import it without an
import cycle through the package that imports them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, longer description, argument setup and runner.

    ``takes_extra_args``: arguments the subcommand does not define are handed to it as ``args.extra_args`` (for a
    command that passes them on to another tool, as ``lm-eval``) instead of being refused."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    takes_extra_args: bool = False


COMMANDS: dict[str, Command] = {}


def register_command(command: Command) -> Command:
    """Add a subcommand to ``austeer`` (later registrations of the same name replace earlier ones)."""
    COMMANDS[command.name] = command
    return command


class CommandError(Exception):
    """A problem the user can fix (bad path, wrong adapter): printed as one line, no traceback."""
