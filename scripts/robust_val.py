"""Compare classifiers' robustness on VAL images (never test images): clean accuracy, APGD-CE and
APGD-DLR accuracy (100 steps) and the worst case per image over both.

    python scripts/robust_val.py --classifiers A.keras,B.keras [--dataset fmnist]
        [--split-model saved_models/fmnist_robust] [--n 500] [--eps 0.1] [--norm linf]
        [--out FILE.json [--overwrite]]

The VAL images are the first --n of the split of --split-model's card (the paper's default
split without it), so every classifier is attacked on the same images. Used to pick the robust
mode's classifier (docs/results.md, "Robust mode"). Exit status 2 (no traceback) for a missing
file or a bad option.
"""

from __future__ import annotations

import argparse
import os
import sys

from fmd_tf.cli import UsageError, run_cli, usage_errors


def parse_args(argv):
    from fmd_tf.config import CHECK_IMAGES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--classifiers", required=True, help="comma-separated classifier .keras files")
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--split-model", default=None,
                   help="model directory whose card gives the split sizes (default: the paper's)")
    p.add_argument("--n", type=int, default=CHECK_IMAGES,
                   help="VAL images attacked (the first ones)")
    p.add_argument("--eps", type=float, default=0.1, help="attack budget")
    p.add_argument("--norm", choices=("linf", "l2"), default="linf")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)
    args.command = " ".join(["python", "scripts/robust_val.py",
                             *(sys.argv[1:] if argv is None else argv)])
    args.classifiers = [c.strip() for c in args.classifiers.split(",") if c.strip()]
    missing = [c for c in args.classifiers if not os.path.isfile(c)]
    if not args.classifiers or missing:
        raise UsageError(f"--classifiers: file not found: {', '.join(missing) or '(none given)'}")
    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    if args.eps <= 0:
        raise UsageError(f"--eps must be > 0, got {args.eps}")
    if args.out and os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"{args.out} exists; pass --overwrite to replace it")
    return args


def run(args) -> dict:
    import keras

    import fmd_tf  # noqa: F401  (registers the package's Keras classes)
    from fmd_tf.config import card_split_config
    from fmd_tf.data import paper_splits
    from fmd_tf.evaluation.robustness import val_robustness
    from fmd_tf.files import write_json

    with usage_errors():
        sizes = card_split_config(args.split_model) if args.split_model else None
        splits = paper_splits(args.dataset, args.seed, sizes)
    x, y = splits.x_val[:args.n], splits.y_val[:args.n]
    results = {}
    for path in args.classifiers:
        classifier = keras.models.load_model(path, compile=False)
        results[path] = val_robustness(classifier, x, y, eps=args.eps, norm=args.norm)
    steps = next(iter(results.values()))["nb_iter"]
    print(f"{len(x)} VAL images, APGD {args.norm} ε {args.eps:g}, {steps} steps (accuracy %):")
    print("| classifier | clean | APGD-CE | APGD-DLR | worst case per image |")
    print("|---|---|---|---|---|")
    for path, r in results.items():
        print(f"| {path} | " + " | ".join(f"{100 * r[k]:.1f}" for k in (
            "clean_accuracy", "apgd_ce_accuracy", "apgd_dlr_accuracy",
            "worst_case_accuracy")) + " |")
    if args.out:
        write_json(args.out, {"command": args.command, "classifiers": results})
    return results


if __name__ == "__main__":
    sys.exit(run_cli(run, parse_args))
