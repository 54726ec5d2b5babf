"""The project's exceptions: one tree, and the command line's exit code for each branch.

`exit_code` is set here and only here (tests/test_cli.py checks that no subclass elsewhere
overrides it), so `livemb` maps every failure it expects to a code in one place:

  LivembError   1  the command failed while running (a process it started died, a deadline passed)
  ConfigError   2  a setup mistake: flags, settings, options that do not go together
  DataError     2  an input the command was given cannot be used (log, item table, checkpoint, index,
                   a stored state row)
  Unavailable   3  a service the command needs (broker, Prometheus) cannot be reached or started:
                   the environment, not the command

ConfigError and DataError are also ValueErrors, and Unavailable a RuntimeError, as the ad-hoc
classes they replace were, so existing `except ValueError` callers keep working.
"""

from __future__ import annotations


class LivembError(Exception):
    exit_code = 1


class ConfigError(LivembError, ValueError):
    exit_code = 2


class DataError(LivembError, ValueError):
    exit_code = 2


class Unavailable(LivembError, RuntimeError):
    exit_code = 3


# What a command reports in one line with its exit code; anything else is a bug (a traceback).
# A missing file is an input the command cannot use: open() raises it before livemb code can.
EXPECTED: tuple[type[BaseException], ...] = (LivembError, FileNotFoundError)


def exit_code(exc: BaseException) -> int:
    """The exit code of an expected failure (1 for anything else)."""
    if isinstance(exc, LivembError):
        return exc.exit_code
    if isinstance(exc, FileNotFoundError):
        return DataError.exit_code
    return 1
