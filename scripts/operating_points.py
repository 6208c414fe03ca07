"""Clean VAL figures of other operating points of a trained FMDefense (no test data, no morphs).

    python scripts/operating_points.py [--model saved_models/fmnist] [--dataset fmnist]
        [--rho 0.999,0.99,0.98,0.97,0.96,0.95,0.9,0.8] [--recon-fpr 0,0.01,0.05]
        [--modes per_code,unified] [--recon-metric mae,mse,pixel_share]
        [--recon-pixel-tol 0.1,0.15,0.2] [--margin-fpr 0,0.01,0.02]
        [--attacks fgsm,pgd --n-attack 500 [--cache results/cache] [--clean-cost 0.02]]
        [--grid auto|robust] [--out FILE.json [--overwrite]]

For every (threshold mode, ρ, reconstruction-gate budget, classifier-margin-gate budget) it
re-calibrates θr, θd, θe and θm on the model's stored clean VAL resistances
(MODEL/val_resistance.npy, written by scripts/train.py), reconstruction errors and logit
margins, as `FMDefense.calibrate` would, and prints what they give on those same
VAL images: defended accuracy (final label right), flagged share, the largest θr and whether the
detector can fire at all (a θr below 0 flags nothing, since resistance is never negative). This
is the table an operating point is chosen from without looking at test images; apply the
choice with `scripts/train.py --stages defense --reuse-val-resistance --operating-point config
--rho R --recon-fpr G --recon-metric M [--recon-pixel-tol T] [--margin-fpr F]` (the model's
other defense options stay as they are).

`--recon-metric` (default: the model's own) lists the gate's reconstruction errors to compare
(`FMDefense.recon_metric`); "pixel_share" gets one row set per `--recon-pixel-tol` value τ.
`--attacks` adds, per row, the defended accuracy (rejected or final label right) on adversarial
versions of the first `--n-attack` VAL images, made with the classifier-only attacks of
`fmd_tf.evaluation.harness.ATTACKS` (cached in --cache). These run the full defense once per image
(morphs included: about 4 images/s on 2 CPU cores), and the script names the max-min row: the one
whose smallest VAL defended accuracy over clean and the attacks is the largest (`max_min_row` in
--out), the rule the shipped operating point follows; with `--clean-cost C` only among the rows
whose clean VAL defended accuracy is at least the classifier's minus C (`choose_row`).

`--grid auto|robust` starts from the grid, attacks and clean cost that `scripts/train.py
--operating-point auto|robust` chooses from (`fmd_tf.operating_point.grid`, for the preset of
the model card's last run; "robust" at the radius of the classifier the card describes) and
prints the row that rule picks: the table behind the model's card entry `operating_point`,
without retraining. The flags above then change single settings of it; without --grid their
defaults are the wider lists shown.
Exit status 2 (no traceback) for a missing model, data set or bad option.
"""

from __future__ import annotations

import argparse
import os
import sys

from fmd_tf.cli import (
    UsageError,
    add_cache_argument,
    add_model_arguments,
    check_model,
    run_cli,
    usage_errors,
)


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


# The table's settings without --grid (with it, those of `fmd_tf.operating_point.grid`).
_WIDE = {"rho": "0.999,0.99,0.98,0.97,0.96,0.95,0.9,0.8", "recon_fpr": "0,0.01,0.05",
         "modes": "per_code,unified", "attacks": "", "n_attack": 500, "margin_fpr": "0"}


def parse_args(argv):
    from fmd_tf.operating_point import GRIDS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_arguments(p, "directory holding fmd.keras and val_resistance.npy")
    p.add_argument("--grid", default=None, choices=list(GRIDS),
                   help="start from the grid, attacks and clean cost scripts/train.py "
                        "--operating-point GRID chooses from; the flags below change it")
    p.add_argument("--rho", default=None, help=f"comma-separated ρ (default {_WIDE['rho']})")
    p.add_argument("--recon-fpr", default=None,
                   help=f"comma-separated clean budgets of the reconstruction gate (default "
                        f"{_WIDE['recon_fpr']})")
    p.add_argument("--modes", default=None, help=f"threshold modes (default {_WIDE['modes']})")
    p.add_argument("--recon-metric", default=None,
                   help="comma-separated gate metrics (mae, mse, pixel_share); default: the "
                        "model's own")
    p.add_argument("--recon-pixel-tol", default=None,
                   help="comma-separated per-pixel tolerances τ of the pixel_share metric "
                        "(default: the model's own)")
    p.add_argument("--attacks", default=None,
                   help="comma-separated classifier attacks on VAL images (e.g. fgsm,pgd; "
                        "default none)")
    p.add_argument("--n-attack", type=int, default=None,
                   help=f"VAL images attacked per attack, the first ones (default "
                        f"{_WIDE['n_attack']})")
    p.add_argument("--margin-fpr", default=None,
                   help="comma-separated clean budgets of the classifier-margin gate (0 = off, "
                        "the default)")
    p.add_argument("--clean-cost", type=float, default=None,
                   help="with --attacks: choose the max-min row among those within this much "
                        "(a share, e.g. 0.015) of the classifier's clean VAL accuracy")
    add_cache_argument(p)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)
    if args.out and os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"{args.out} exists; pass --overwrite to replace it")
    if args.grid is None:
        for name, value in _WIDE.items():
            setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    for name, low_open, high in (("rho", True, 1.0), ("recon_fpr", False, 0.5),
                                 ("margin_fpr", False, 0.5)):
        if getattr(args, name) is not None:
            setattr(args, name, _floats(getattr(args, name), name.replace("_", "-"), 0.0, high,
                                        low_open=low_open))
    if args.clean_cost is not None and not 0.0 <= args.clean_cost <= 1.0:
        raise UsageError(f"--clean-cost must be in [0, 1], got {args.clean_cost}")
    from fmd_tf.config import RECON_METRICS, THRESHOLD_MODES
    from fmd_tf.evaluation.harness import ATTACKS, DEFENSE_AWARE

    if args.modes is not None:
        args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = [m for m in args.modes if m not in THRESHOLD_MODES]
        if not args.modes or unknown:
            raise UsageError(f"--modes: choose from {', '.join(THRESHOLD_MODES)}, got {unknown}")
    if args.recon_metric is not None:
        args.recon_metric = [m.strip() for m in args.recon_metric.split(",") if m.strip()]
        unknown = [m for m in args.recon_metric if m not in RECON_METRICS]
        if not args.recon_metric or unknown:
            raise UsageError(f"--recon-metric: choose from {', '.join(RECON_METRICS)}, "
                             f"got {unknown}")
    if args.recon_pixel_tol is not None:
        args.recon_pixel_tol = _floats(args.recon_pixel_tol, "recon-pixel-tol", 0.0, 1.0,
                                       low_open=True)
        if 1.0 in args.recon_pixel_tol:
            raise UsageError("--recon-pixel-tol values must be < 1")
    if args.attacks is not None:
        args.attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
        usable = [a for a in ATTACKS if a not in DEFENSE_AWARE]
        unknown = [a for a in args.attacks if a not in usable]
        if unknown:
            raise UsageError(f"--attacks: choose from {', '.join(usable)}, got {unknown}")
    if args.n_attack is not None and args.n_attack < 1:
        raise UsageError(f"--n-attack must be >= 1, got {args.n_attack}")
    check_model(args, "fmd.keras", "val_resistance.npy")
    return args


def _metric_name(metric: str, pixel_tol) -> str:
    """"mae", "mse" or "pixel_share>τ" (the tolerance only where the metric uses it)."""
    return f"{metric}>{pixel_tol:g}" if metric == "pixel_share" else metric


def _table_config(args, fmd):
    """(the `OperatingPointConfig` of the table, the rule's clean cost or None): --grid's grid
    changed by the flags given, else the flags (`_WIDE` where not given)."""
    import dataclasses

    from fmd_tf.config import card_classifier_training, card_preset
    from fmd_tf.operating_point import OperatingPointConfig, grid

    gates = None
    if args.grid is None or args.recon_metric or args.recon_pixel_tol:
        gates = tuple((m, t) for m in args.recon_metric or [fmd.recon_metric] for t in (
            (args.recon_pixel_tol or [fmd.recon_pixel_tol]) if m == "pixel_share" else [None]))
    flags = {"attacks": args.attacks, "n_attack": args.n_attack, "modes": args.modes,
             "rhos": args.rho, "gate_metrics": gates, "gate_budgets": args.recon_fpr,
             "margin_budgets": args.margin_fpr}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in flags.items() if v is not None}
    if args.grid is None:
        return OperatingPointConfig(**given), args.clean_cost
    try:
        eps = (card_classifier_training(args.model) or (None, None))[1]
        fast = card_preset(args.model) == "fast"
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.clean_cost is not None:
        given["clean_cost"] = args.clean_cost
    cfg = dataclasses.replace(grid(args.grid, fast, robust_eps=eps), **given)
    return cfg, cfg.clean_cost


def run(args) -> list[dict]:
    import numpy as np

    from fmd_tf.config import card_split_config
    from fmd_tf.data import paper_splits
    from fmd_tf.loading import load_defense
    from fmd_tf.operating_point import choose_row, max_min_row, operating_point_table

    with usage_errors():
        fmd = load_defense(args.model)
    if not fmd.is_calibrated:
        raise UsageError(f"{args.model}/fmd.keras is not calibrated")
    # All morphs, as the stored VAL resistances and scripts/train.py's table have them.
    fmd = fmd.copy_with(adaptive_budget=False) if fmd.adaptive_budget else fmd
    try:
        splits = paper_splits(args.dataset, args.seed, card_split_config(args.model))
    except ValueError as e:
        raise UsageError(str(e)) from None
    r_val = np.load(os.path.join(args.model, "val_resistance.npy"))
    if r_val.shape != (len(splits.x_val), fmd.num_codes):
        raise UsageError(f"{args.model}/val_resistance.npy has shape {r_val.shape}, expected "
                         f"({len(splits.x_val)}, {fmd.num_codes}) for this model's VAL split")
    cfg, clean_cost = _table_config(args, fmd)
    table = operating_point_table(fmd, splits.x_val, splits.y_val, r_val, cfg, args.cache,
                                  args.seed)
    rows, adv = table["rows"], list(cfg.attacks)
    x_att = splits.x_val[: cfg.n_attack]
    clf_acc = table["classifier_val_accuracy"]
    print(f"{args.model}: {len(splits.x_val)} clean VAL images, classifier accuracy "
          f"{100 * clf_acc:.2f} %, share with resistance 0 on some code "
          f"{100 * float(np.mean(r_val.min(axis=1) == 0)):.2f} %; shipped: "
          f"{fmd.threshold_mode}, θr max {float(np.max(fmd.theta_r.numpy())):+.3f}, gate "
          f"{_metric_name(fmd.recon_metric, fmd.recon_pixel_tol)} {fmd.recon_fpr}, margin "
          f"gate {fmd.margin_fpr}"
          + (f"; attacks on the first {len(x_att)} VAL images" if adv else "")
          + ("" if cfg.attack_eps is None else f" at L∞ {cfg.attack_eps:g}"))
    print("| mode | ρ | gate | metric | margin gate | θm | θr max | detector fires | "
          "VAL defended accuracy | VAL flagged |" + "".join(f" VAL {a} defended |" for a in adv))
    print("|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(adv))
    for row in rows:
        theta_m = "off" if row["theta_m"] is None else f"{row['theta_m']:.3f}"
        print(f"| {row['threshold_mode']} | {row['rho']} | {row['recon_fpr']} | "
              f"{_metric_name(row['recon_metric'], row['recon_pixel_tol'])} | "
              f"{row['margin_fpr']} | {theta_m} | "
              f"{row['theta_r_max']:+.3f} | "
              f"{'yes' if row['detector_fires'] else 'no'} | "
              f"{100 * row['val_clean_defended_accuracy']:.2f} % | "
              f"{100 * row['val_clean_flagged']:.2f} % |"
              + "".join(f" {100 * row[f'val_{a}_defended_accuracy']:.2f} % |" for a in adv))
    best = None
    if adv:
        best = (max_min_row(rows, adv) if clean_cost is None
                else choose_row(rows, adv, clf_acc, clean_cost))
        row = rows[best]
        within = "" if clean_cost is None else \
            f", clean VAL defended >= classifier - {clean_cost:g}"
        print(f"max-min row (largest smallest VAL defended accuracy over clean and "
              f"{', '.join(adv)}{within}): row {best}, {row['threshold_mode']}, ρ {row['rho']}, "
              f"gate {row['recon_fpr']} "
              f"{_metric_name(row['recon_metric'], row['recon_pixel_tol'])}, margin gate "
              f"{row['margin_fpr']}")
    if args.out:
        from fmd_tf.files import write_json

        write_json(args.out, {"model": args.model, "val_classifier_accuracy": clf_acc,
                              "attacks": {"names": adv, "n": len(x_att) if adv else 0,
                                          "seed": args.seed, "eps": cfg.attack_eps},
                              "grid": args.grid, "clean_cost": clean_cost,
                              "max_min_row": best, "rows": rows})
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(run, parse_args))
