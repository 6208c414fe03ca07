"""The main job: FM-Defense on clean Fashion-MNIST test images and their FGSM versions.

    python scripts/demo.py [--model saved_models/fmnist] [--n 200] [--eps 0.3]
        [--figure results/demo.png] [--seed 0] [--budget default|full] [--verbose 1]

Loads the shipped `fmd.keras`, takes the first --n CLE images of the paper split, attacks the
classifier with FGSM (L∞ eps; the attacker does not know the defense, as in the paper), runs the
defense on both sets (with a progress bar), prints verdict counts and accuracies, and writes a
PNG with input / morphs of one code / purified image. `--budget full` draws all N morphs of
every code in float32 (the paper's path) instead of the model's own morph budget (to compare).
"""

from __future__ import annotations

import argparse
import sys

from fmd_tf.cli import UsageError, add_model_arguments, check_model, run_cli, usage_errors
from fmd_tf.evaluation.demo import BUDGETS


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--figure", default="results/demo.png")
    p.add_argument("--budget", default=BUDGETS[0], choices=BUDGETS,
                   help="the model's morph budget (default) or all morphs in float32 (full)")
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1), help="progress bars")
    args = p.parse_args(argv)
    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    if not 0.0 < args.eps <= 1.0:
        raise UsageError(f"--eps must be in (0, 1], got {args.eps}")
    check_model(args, "fmd.keras")
    return args


def run(args) -> dict:
    from fmd_tf.evaluation.demo import format_rows, run_demo
    from fmd_tf.loading import ModelFileError

    with usage_errors(ModelFileError):  # a damaged or changed model file
        rows = run_demo(args.model, args.dataset, args.n, args.eps, args.seed,
                        figure=args.figure, budget=args.budget, verbose=args.verbose)
    print(format_rows(rows, args.n, args.model))
    print(f"wrote {args.figure}")
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(run, parse_args))
