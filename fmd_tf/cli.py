"""Shared entry-point plumbing of `scripts/`: user errors end with a message and exit 2.

A script defines `parse_args(argv)` and `run(args)` and ends with
``sys.exit(run_cli(run, parse_args))``. `UsageError` (bad options, missing files) and
`fmd_tf.data.DataNotAvailableError` are printed as ``error: ...`` on stderr without a
traceback; anything else is a bug and propagates.
"""

from __future__ import annotations

import sys

__all__ = ["UsageError", "run_cli"]


class UsageError(Exception):
    """Bad command-line input: printed without a traceback, exit status 2."""


def run_cli(run, parse_args, argv=None) -> int:
    """`run(parse_args(argv))`; 0 on success, 2 (message on stderr) on a user error."""
    from fmd_tf.data import DataNotAvailableError

    try:
        run(parse_args(argv))
    except (UsageError, DataNotAvailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
