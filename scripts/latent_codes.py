"""Which class-shared codes of a trained combo-VAE change the image: per-code KL, full-range
traversal pixel change, label kept, read-back slope, activity; and which clean VAL images have a
zero-resistance code, against those whose reconstruction changes the label
(`fmd_tf.evaluation.latent_codes`).

    python scripts/latent_codes.py [--model saved_models/fmnist] [--dataset fmnist] [--n 500]
        [--out results/fmnist/latent_codes.json] [--morph-scales 1,4,16 [--morph-n 200]
        [--morph-attacks fgsm,pgd] [--morph-bases reconstruction,input]]

--morph-scales also runs the detector with its morph offsets scaled by each factor on the first
--morph-n VAL images and their --morph-attacks versions (made against the classifier; default
FGSM / PGD at eps 0.3): morph pixel change, clean zero-resistance share and the resistance
score's ROC AUC per scale (`morph_strength_sweep`). --morph-bases input adds the same morphs
applied to the input instead of the reconstruction, clip(x + decoder(z') - decoder(z))
(`input_morph_resistance`).
"""

from __future__ import annotations

import argparse
import json
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


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--n", type=int, default=500, help="VAL images")
    p.add_argument("--morph-scales", default="", help="comma-separated factors of the morph "
                   "offsets to compare (e.g. 1,4,16); none by default")
    p.add_argument("--morph-n", type=int, default=200, help="VAL images of --morph-scales")
    p.add_argument("--morph-attacks", default="fgsm,pgd", help="attacks on the classifier for "
                   "--morph-scales (names of scripts/evaluate.py --attacks)")
    p.add_argument("--morph-bases", default="reconstruction", help="comma-separated: "
                   "reconstruction (the detector's morphs) and/or input (the morphs' change "
                   "added to the input)")
    add_cache_argument(p)
    p.add_argument("--out", default=None, help="JSON report (default: results/<model name>/"
                   "latent_codes.json)")
    args = p.parse_args(argv)
    if args.n < 1 or args.morph_n < 1:
        raise UsageError(f"--n and --morph-n must be >= 1, got {args.n}, {args.morph_n}")
    try:
        args.morph_scales = tuple(float(v) for v in args.morph_scales.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--morph-scales takes numbers like 1,4,16, got "
                         f"{args.morph_scales!r}") from None
    if any(k <= 0 for k in args.morph_scales):
        raise UsageError(f"--morph-scales must be > 0, got {args.morph_scales}")
    from fmd_tf.evaluation.harness import ATTACKS, DEFENSE_AWARE, QUERY_BASED, TRANSFER
    from fmd_tf.evaluation.latent_codes import MORPH_BASES
    args.morph_attacks = tuple(a.strip() for a in args.morph_attacks.split(",") if a.strip())
    args.morph_bases = tuple(b.strip() for b in args.morph_bases.split(",") if b.strip())
    usable = [a for a in ATTACKS if a not in DEFENSE_AWARE + TRANSFER + QUERY_BASED]
    if not args.morph_attacks or not set(args.morph_attacks) <= set(usable):
        raise UsageError(f"--morph-attacks takes some of {', '.join(usable)}, got "
                         f"{','.join(args.morph_attacks) or 'none'}")
    if not args.morph_bases or not set(args.morph_bases) <= set(MORPH_BASES):
        raise UsageError(f"--morph-bases takes some of {', '.join(MORPH_BASES)}, got "
                         f"{','.join(args.morph_bases) or 'none'}")
    check_model(args, "fmd.keras")
    args.out = args.out or os.path.join("results", os.path.basename(os.path.normpath(
        args.model)), "latent_codes.json")
    return args


def run(args):
    from fmd_tf.evaluation.latent_codes import defense_code_activity
    from fmd_tf.files import write_json
    from fmd_tf.loading import ModelFileError

    with usage_errors(ModelFileError):  # a damaged or changed model file
        report = defense_code_activity(args.model, args.dataset, args.n, args.seed,
                                       args.morph_scales, args.morph_n,
                                       morph_attacks=args.morph_attacks, cache_dir=args.cache,
                                       morph_bases=args.morph_bases)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_json(args.out, report, sort_keys=True)
    print(json.dumps({k: report[k] for k in ("num_active", "num_codes", "total_correlation")}))
    for i, (kl, change, kept, slope) in enumerate(zip(
            report["kl_nats"], report["sweep_pixel_change"], report["sweep_label_kept"],
            report["sweep_readback_slope"], strict=True)):
        print(f"z{i}: KL {kl:.3f} nats, sweep |dpixel| {change:.4f}, label kept {kept:.3f}, "
              f"read back {slope:.3f}")
    zero = report.get("zero_resistance")
    if zero:
        print(f"VAL ({zero['images']} images): a zero-resistance code on {zero['zero_code']:.4f}, "
              f"reconstruction label differs on {zero['recon_label_differs']:.4f}, both on "
              f"{zero['zero_code_and_recon_label_differs']:.4f}")
    for row in (report.get("morph_strength") or {}).get("rows", []):
        aucs = ", ".join(f"{k[4:]} {v:.3f}" for k, v in row.items() if k.startswith("auc_"))
        print(f"morph scale {row['scale']:g}, {row['base']} base: mean |dpixel| per code "
              f"{min(row['morph_pixel_change']):.4f}-{max(row['morph_pixel_change']):.4f}, "
              f"clean zero share {row['clean_zero_share']:.4f}, AUC {aucs}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(run, parse_args))
