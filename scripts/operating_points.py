"""Clean VAL figures of other operating points of a trained FMDefense (no test data, no morphs).

    python scripts/operating_points.py [--model saved_models/fmnist] [--dataset fmnist]
        [--rho 0.999,0.99,0.98,0.97,0.96,0.95,0.9,0.8] [--recon-fpr 0,0.01,0.05]
        [--modes per_code,unified] [--out FILE.json [--overwrite]]

For every (threshold mode, ρ, reconstruction-gate budget) it re-calibrates θr, θd and θe on the
model's stored clean VAL resistances (MODEL/val_resistance.npy, written by scripts/train.py) and
reconstruction errors, as `FMDefense.calibrate` would, and prints what they give on those same
VAL images: defended accuracy (final label right), flagged share, the largest θr and whether the
detector can fire at all (a θr below 0 flags nothing, since resistance is never negative). This
is the table an operating point is chosen from without looking at test images; apply the
choice with `scripts/train.py --stages defense --reuse-val-resistance --rho R --recon-fpr G`.
Exit status 2 (no traceback) for a missing model, data set or bad option.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fmd_tf.cli import UsageError, run_cli


def _floats(text: str, name: str, low: float, high: float, low_open: bool) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{name}: expected comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not (low < v if low_open else low <= v) or v > high]
    if not values or bad:
        interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise UsageError(f"--{name}: values must lie in {interval}, got {text!r}")
    return values


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="saved_models/fmnist",
                   help="directory holding fmd.keras and val_resistance.npy")
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--seed", type=int, default=0, help="split seed the model was trained with")
    p.add_argument("--rho", default="0.999,0.99,0.98,0.97,0.96,0.95,0.9,0.8")
    p.add_argument("--recon-fpr", default="0,0.01,0.05")
    p.add_argument("--modes", default="per_code,unified")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)
    if args.out and os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"{args.out} exists; pass --overwrite to replace it")
    args.rho = _floats(args.rho, "rho", 0.0, 1.0, low_open=True)
    args.recon_fpr = _floats(args.recon_fpr, "recon-fpr", 0.0, 0.5, low_open=False)
    from fmd_tf.defense.calibration import THRESHOLD_MODES

    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in THRESHOLD_MODES]
    if not args.modes or unknown:
        raise UsageError(f"--modes: choose from {', '.join(THRESHOLD_MODES)}, got {unknown}")
    for name in ("fmd.keras", "val_resistance.npy"):
        if not os.path.isfile(os.path.join(args.model, name)):
            raise UsageError(f"{os.path.join(args.model, name)} not found; train the model with "
                             "`python scripts/train.py` or pass --model")
    return args


def run(args) -> list[dict]:
    import itertools

    import keras
    import numpy as np

    import fmd_tf  # noqa: F401
    from fmd_tf.config import card_split_config
    from fmd_tf.data import paper_splits
    from fmd_tf.evaluation import harness

    fmd = keras.models.load_model(os.path.join(args.model, "fmd.keras"))
    if not fmd.is_calibrated:
        raise UsageError(f"{args.model}/fmd.keras is not calibrated")
    try:
        splits = paper_splits(args.dataset, args.seed, card_split_config(args.model))
    except ValueError as e:
        raise UsageError(str(e)) from None
    r_val = np.load(os.path.join(args.model, "val_resistance.npy"))
    if r_val.shape != (len(splits.x_val), fmd.num_codes):
        raise UsageError(f"{args.model}/val_resistance.npy has shape {r_val.shape}, expected "
                         f"({len(splits.x_val)}, {fmd.num_codes}) for this model's VAL split")
    e_val = fmd.reconstruction_error(splits.x_val)
    val_out = harness.val_outputs(fmd, splits.x_val, r_val, e_val)
    grid = list(itertools.product(args.modes, args.rho, args.recon_fpr))
    rows = harness.val_operating_points(fmd, val_out, splits.y_val, grid)
    clf_acc = float(np.mean(val_out["classifier_label"] == splits.y_val))
    print(f"{args.model}: {len(splits.x_val)} clean VAL images, classifier accuracy "
          f"{100 * clf_acc:.2f} %, share with resistance 0 on some code "
          f"{100 * float(np.mean(r_val.min(axis=1) == 0)):.2f} %; shipped: "
          f"{fmd.threshold_mode}, θr max {float(np.max(fmd.theta_r.numpy())):+.3f}")
    print("| mode | ρ | gate | θr max | detector fires | VAL defended accuracy | VAL flagged |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['threshold_mode']} | {row['rho']} | {row['recon_fpr']} | "
              f"{row['theta_r_max']:+.3f} | {'yes' if row['detector_fires'] else 'no'} | "
              f"{100 * row['val_clean_defended_accuracy']:.2f} % | "
              f"{100 * row['val_clean_flagged']:.2f} % |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "val_classifier_accuracy": clf_acc, "rows": rows},
                      f, indent=2)
            f.write("\n")
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(run, parse_args))
