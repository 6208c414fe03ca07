"""Shared entry-point plumbing of `scripts/`: user errors end with a message and exit 2.

A script defines `parse_args(argv)` and `run(args)` and ends with
``sys.exit(run_cli(run, parse_args))``. `UsageError` (bad options, missing files) and
`fmd_tf.data.DataNotAvailableError` are printed as ``error: ...`` on stderr without a
traceback; anything else is a bug and propagates. Library code raises `ValueError` /
`FileNotFoundError` / `FileExistsError`; a script turns those of the calls that check the
user's input into `UsageError` with ``with usage_errors(): ...``.
"""

from __future__ import annotations

import contextlib
import os
import sys

__all__ = ["DEFAULT_CACHE", "DEFAULT_MODEL", "USER_ERRORS", "UsageError", "add_cache_argument",
           "add_model_arguments", "add_seed_argument", "check_model", "resolve_seed", "run_cli",
           "usage_errors"]

DEFAULT_MODEL = "saved_models/fmnist"  # the shipped model, the scripts' default --model
DEFAULT_CACHE = "results/cache"  # where the scripts share attacked images and defense outputs

# What library calls raise for bad input (a value out of range, a missing or existing file).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


class UsageError(Exception):
    """Bad command-line input: printed without a traceback, exit status 2."""


@contextlib.contextmanager
def usage_errors(*types: type[BaseException]):
    """Inside the block, `types` (default `USER_ERRORS`) become `UsageError` (same message)."""
    caught = types or USER_ERRORS
    try:
        yield
    except caught as e:
        raise UsageError(str(e)) from None


def add_seed_argument(parser, what: str = "the data splits") -> None:
    """`--seed` of a script that works on a trained model; its default, None, stands for the
    model's own splits (`resolve_seed`)."""
    parser.add_argument("--seed", type=int, default=None,
                        help=f"seed of {what} (default: the model card's seed, train.py --seed; "
                             "0 without a card)")


def add_cache_argument(parser, default: str | None = DEFAULT_CACHE) -> None:
    """`--cache DIR` of a script that attacks images: the directory of the adversarial sets
    and defense outputs (`fmd_tf.evaluation.harness`, keyed by what made them), shared by
    the scripts; `none` for no cache (None)."""
    parser.add_argument(
        "--cache", default=default, metavar="DIR",
        type=lambda value: None if value.lower() == "none" else value,
        help="cache of the adversarial sets (keyed by attack, parameters, images and "
             "classifier) and of the defenses' outputs on them, shared with the other scripts; "
             f"none: no cache (default: {default or 'none'})")


def add_model_arguments(parser, model_help: str = "directory holding fmd.keras") -> None:
    """`--model` (a trained model's directory), `--dataset` (the data it was trained on) and
    `--seed` (`add_seed_argument`) of a script that works on a trained model; `check_model`
    checks them."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    parser.add_argument("--dataset", default="fmnist",
                        help="the model's data: a dataset name, or the .npz / image directory "
                             "given to train.py --data")
    add_seed_argument(parser)


def check_model(args, *files: str, train: str = "python scripts/train.py --dataset fmnist"):
    """`UsageError` naming the first of `files` that `args.model` lacks (and the `train`
    command that makes it); then `resolve_seed`."""
    for name in files:
        path = os.path.join(args.model, name)
        if not os.path.isfile(path):
            raise UsageError(f"{path} not found; train it with `{train}` or pass --model")
    resolve_seed(args, args.model)


def resolve_seed(args, model_dir: str) -> int:
    """`args.seed` set to `fmd_tf.config.split_seed(model_dir, args.seed)`: as given, else the
    seed of the splits the model in `model_dir` was calibrated on. A malformed card is a
    `UsageError`."""
    from fmd_tf.config import split_seed

    with usage_errors(ValueError):
        args.seed = split_seed(model_dir, args.seed)
    return args.seed


def run_cli(run, parse_args, argv=None) -> int:
    """`run(parse_args(argv))`; 0 on success, 2 (message on stderr) on a user error."""
    from fmd_tf.data import DataNotAvailableError

    try:
        run(parse_args(argv))
    except (UsageError, DataNotAvailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
