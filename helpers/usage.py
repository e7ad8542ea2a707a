"""How every command line of the book reports a mistake: one ``error:`` line, exit code 2, no usage dump."""

from __future__ import annotations

import argparse
from typing import NoReturn


class UsageError(ValueError):
    """A mistake in a command's arguments or input: printed as one ``error:`` line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose mistakes raise :class:`UsageError` (one line naming the option and what is valid)
    instead of printing the usage text; sub-parsers made by ``add_subparsers`` inherit the class."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")
