"""Train and calibrate the baseline defenses (MagNet, Feature Squeezing, Defense-GAN) next to
FM-Defense.

    python scripts/train_baselines.py --dataset fmnist [--model saved_models/fmnist]
        [--epochs N | --magnet-from DIR] [--gan-epochs N] [--rec-iters L] [--rec-restarts R]
        [--fpr F] [--cache DIR] [--seed 0] [--overwrite] [--quick] [--verbose 0|1|2]

Needs MODEL/classifier.keras (from scripts/train.py). Trains MagNet's two autoencoders and
Defense-GAN's WGAN on the paper's TRAIN split (20,000 images), calibrates MagNet, Feature
Squeezing and Defense-GAN on VAL (2,000) at the clean false-positive rate --fpr, reports the
rate reached on VAL and on the clean CLE images, and writes

    MODEL/baselines/magnet/             detector_I.keras, detector_II.keras, magnet.json
    MODEL/baselines/feature_squeezing.json
    MODEL/baselines/defense_gan/        generator.keras, defense_gan.json

Same footing as FM-Defense: --fpr defaults to the share of clean VAL images the FM-Defense in
MODEL flags (its model card; 1 - rho of the config without one), and Feature Squeezing's
squeezers are chosen on VAL with the attacked VAL images its operating point was chosen with
(FGSM and PGD on the first 500 VAL images by default; --cache DIR keeps them).
Existing outputs are never replaced without --overwrite (exit status 2, nothing written).
--magnet-from DIR reuses the MagNet autoencoders saved in DIR (they are trained on images only,
so a retrained classifier keeps them) and re-calibrates their thresholds; magnet.json records
where they came from and the command that trained them.
Defense-GAN purifies every VAL and CLE image by a latent search of --rec-iters gradient steps
from --rec-restarts random starts (the paper's 200 and 10): R·L generator passes per image, the
slowest part of this script (minutes per 1,000 images on a CPU); lower them for a quick look.
--quick: the tiny split of `fmd_tf.config.quick_config` (512 TRAIN, 128 VAL/CLE), 1 epoch, a
tiny latent search (`fmd_tf.evaluation.baselines.QUICK_DEFENSE_GAN`) and its rho (fpr 0.05),
for tests and CI.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from fmd_tf.cli import (
    UsageError,
    add_cache_argument,
    add_seed_argument,
    resolve_seed,
    run_cli,
    usage_errors,
)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="fmnist",
                   help="a dataset name or the .npz / image directory the model was trained on "
                        "(train.py --data)")
    p.add_argument("--model", default=None,
                   help="directory holding classifier.keras (default saved_models/DATASET)")
    p.add_argument("--epochs", type=int, default=None,
                   help="MagNet AE epochs (default 20; MagNet used 100; --quick: 1)")
    p.add_argument("--gan-epochs", type=int, default=None,
                   help="Defense-GAN WGAN epochs, one critic pass over TRAIN each (default 30; "
                        "--quick: 1)")
    p.add_argument("--rec-iters", type=int, default=None,
                   help="Defense-GAN latent-search gradient steps L per restart (default 200, "
                        "the paper's; --quick: 10)")
    p.add_argument("--rec-restarts", type=int, default=None,
                   help="Defense-GAN latent-search random restarts R per image (default 10, the "
                        "paper's; --quick: 2)")
    p.add_argument("--fpr", type=float, default=None,
                   help="target clean false-positive rate on VAL (default: the FM-Defense's "
                        "VAL FPR from MODEL/model_card.json, else 1 - rho)")
    add_cache_argument(p, default=None)
    add_seed_argument(p, "the data splits and of the training")
    p.add_argument("--overwrite", action="store_true", help="replace existing baseline outputs")
    p.add_argument("--quick", action="store_true",
                   help="tiny split, 1 epoch and a tiny latent search, for tests/CI")
    p.add_argument("--verbose", type=int, default=0, choices=[0, 1, 2], help="Keras verbosity")
    p.add_argument("--magnet-from", default=None, metavar="DIR",
                   help="reuse the trained MagNet autoencoders in DIR (a MODEL/baselines/magnet "
                        "directory) instead of training new ones; they depend on the images "
                        "only, so a new classifier keeps them. Thresholds are re-calibrated.")
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    for flag, value, least in (("--gan-epochs", args.gan_epochs, 1),
                               ("--rec-iters", args.rec_iters, 0),
                               ("--rec-restarts", args.rec_restarts, 1)):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be >= {least}, got {value}")
    if args.fpr is not None and not 0.0 <= args.fpr < 1.0:
        raise UsageError(f"--fpr must be in [0, 1), got {args.fpr}")
    args.model = args.model or os.path.join("saved_models", args.dataset)
    if args.magnet_from is not None:
        if args.epochs is not None:
            raise UsageError("--epochs trains MagNet; it cannot go with --magnet-from")
        if not os.path.isfile(os.path.join(args.magnet_from, "magnet.json")):
            raise UsageError(f"--magnet-from: {args.magnet_from} holds no magnet.json "
                             "(expected a MODEL/baselines/magnet directory)")
        if os.path.realpath(args.magnet_from) == os.path.realpath(
                os.path.join(args.model, "baselines", "magnet")):
            raise UsageError("--magnet-from must not be the MagNet this run replaces")
    resolve_seed(args, args.model)
    return args


def run(args) -> dict:
    from fmd_tf.evaluation import baselines

    with usage_errors():  # no classifier, outputs present without --overwrite, unknown dataset
        baselines.check_outputs(args.model, args.overwrite)
        baselines.baseline_config(args.dataset, args.quick, args.model)
    return baselines.train_baselines(
        args.model, args.dataset, epochs=args.epochs, fpr=args.fpr, seed=args.seed,
        overwrite=args.overwrite, quick=args.quick, verbose=args.verbose,
        magnet_from=args.magnet_from, gan_epochs=args.gan_epochs, rec_iters=args.rec_iters,
        rec_restarts=args.rec_restarts, cache_dir=args.cache,
        command="python scripts/train_baselines.py " + shlex.join(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(run_cli(run, parse_args))
