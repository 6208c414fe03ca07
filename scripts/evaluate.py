"""Reproduce the paper's evaluation (§IV: Table II, Fig. 1, 4, 5, 6) on the shipped model.

    python scripts/evaluate.py --dataset fmnist --model saved_models/fmnist \
        --attacks fgsm,pgd,cw,deepfool --n 1000 [--seed 0] [--out results/fmnist]
        [--cache results/cache] [--no-baselines]

Held-out attack families (the operating point is chosen with FGSM and PGD on VAL images):
PGD at other budgets (pgd_eps0.1, pgd_l2), MIM, black-box Square (scores) and HopSkipJump
(labels only), and transfer from an independently trained classifier:

    python scripts/train.py --dataset fmnist --stages classifier --seed 1 \
        --out saved_models/fmnist_surrogate
    python scripts/evaluate.py --attacks transfer_pgd,transfer_mim \
        --surrogate saved_models/fmnist_surrogate/classifier.keras

Security evaluation (adaptive white-box attacks on the whole defense, one run per budget):

    python scripts/evaluate.py --attacks adaptive_pgd,adaptive_resistance,cw_hiconf \
        --linf-eps 0.05,0.1,0.3 --l2-eps 1.5,3.0 --n 500 --out results/fmnist_adaptive

An attack too costly for the whole grid runs at one budget, named by its report name (APGD
through the whole defense: about 29–36 min per loss for 500 images on 2 CPU cores when the
resistance thresholds can flag; about 2 min on the robust mode, whose cannot):

    python scripts/evaluate.py --attacks adaptive_pgd,apgd_ce_linf_0.1,apgd_dlr_linf_0.1 \
        --linf-eps 0.1,0.3 --n 500 --no-baselines --out results/DIR

The randomized ensemble (`scripts/train.py --ensemble 3`), attacked with EOT over its members:

    python scripts/evaluate.py --defense fmd_ensemble.keras --attacks adaptive_pgd \
        --linf-eps 0.1 --n 500 --no-baselines --out results/fmnist_ensemble

Writes OUT/report.json, OUT/report.md and PNG figures. Adversarial sets are cached in --cache
(keyed by attack, parameters, images and classifier fingerprint), and so are the outputs of
every defense on every set (keyed by the defense's weights and settings and the images): a run
that was stopped starts again after the last set it finished. Baselines (MagNet, Feature
Squeezing, Defense-GAN) are loaded from MODEL/baselines (train them with
scripts/train_baselines.py).
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

# DefenseConfig options a trained defense can be evaluated with (`FMDefense.copy_with`): they
# change what it answers, not its calibration.
DEPLOYMENT_OPTIONS = ("suspicious",)


def _other_options():
    from fmd_tf.config import DefenseConfig
    from fmd_tf.options import cli_fields

    return DefenseConfig, [f for f in cli_fields(DefenseConfig) if f not in DEPLOYMENT_OPTIONS]


def parse_args(argv):
    from fmd_tf.evaluation.harness import ATTACK_NAMES, BUDGETED, TRANSFER, known_attack
    from fmd_tf.options import add_arguments, given_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_arguments(p, "directory of the trained model (train.py --out)")
    p.add_argument("--defense", default="fmd.keras",
                   help="defense file in --model: fmd.keras, or fmd_ensemble.keras for the "
                        "randomized ensemble (scripts/train.py --ensemble K)")
    p.add_argument("--attack-defense", default=None,
                   help="defense file in --model that the defense-aware attacks attack "
                        "(default: --defense); e.g. fmd.keras with --defense "
                        "fmd_ensemble.keras measures transfer from one member")
    p.add_argument("--attacks", default="fgsm,pgd,cw,deepfool",
                   help="comma-separated attacks (fmd_tf.evaluation.harness.ATTACKS); "
                        + ATTACK_NAMES)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--out", default=None, help="default results/DATASET")
    add_cache_argument(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--linf-eps", default="", help="comma-separated L-inf budgets for "
                   + ", ".join(BUDGETED) + " (one run each)")
    p.add_argument("--l2-eps", default="", help="comma-separated L2 budgets, as --linf-eps")
    p.add_argument("--surrogate", default=None, metavar="CLASSIFIER.keras",
                   help="an independently trained classifier that " + ", ".join(TRANSFER)
                        + " are made on (e.g. train.py --stages classifier --seed 1)")
    config, skip = _other_options()
    add_arguments(p.add_argument_group("deployment options of the evaluated defense (applied "
                                       "with FMDefense.copy_with)"), config, skip=skip)
    args = p.parse_args(argv)
    args.defense_options = given_arguments(args, config, skip=skip)
    args.attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = [a for a in args.attacks if not known_attack(a)]
    if unknown or not args.attacks:
        raise UsageError(f"--attacks: unknown {unknown}; {ATTACK_NAMES}")
    for flag in ("linf_eps", "l2_eps"):
        raw, option = getattr(args, flag), "--" + flag.replace("_", "-")
        try:
            values = [float(v) for v in raw.split(",") if v.strip()]
        except ValueError:
            raise UsageError(f"{option}: not a list of numbers: {raw!r}") from None
        if any(not v > 0 for v in values):
            raise UsageError(f"{option}: budgets must be > 0, got {raw!r}")
        setattr(args, flag, values)
    if args.n < 2:
        raise UsageError(f"--n must be >= 2, got {args.n}")
    check_model(args, args.defense, train="python scripts/train.py --dataset fmnist"
                + (" --ensemble 3" if "ensemble" in args.defense else ""))
    args.attack_defense = args.attack_defense or args.defense
    if not os.path.isfile(os.path.join(args.model, args.attack_defense)):
        raise UsageError(f"--attack-defense: {os.path.join(args.model, args.attack_defense)} "
                         "not found")
    if any(a in TRANSFER for a in args.attacks):
        if args.surrogate is None:
            raise UsageError(f"{', '.join(TRANSFER)} need --surrogate CLASSIFIER.keras (an "
                             "independently trained classifier: train.py --stages classifier "
                             "--seed 1)")
        if not os.path.isfile(args.surrogate):
            raise UsageError(f"--surrogate: {args.surrogate} not found")
    args.out = args.out or os.path.join("results", args.dataset)
    return args


def run(args) -> dict:
    from fmd_tf.evaluation.report import (
        DefenseOptionError,
        evaluate,
        model_splits,
        render_markdown,
    )
    from fmd_tf.loading import ModelFileError

    with usage_errors(ValueError):  # a malformed model card, too few CLE images
        splits = model_splits(args.model, args.dataset, args.seed, args.n)
    with usage_errors(ModelFileError, DefenseOptionError):  # a damaged or changed model
        # file; deployment options for an ensemble
        report = evaluate(
            args.model, args.dataset, args.attacks, args.n, args.seed, out_dir=args.out,
            cache_dir=args.cache, batch_size=args.batch_size, baselines=not args.no_baselines,
            linf_eps=args.linf_eps, l2_eps=args.l2_eps, defense=args.defense,
            attack_defense=args.attack_defense, splits=splits, surrogate=args.surrogate,
            defense_options=args.defense_options,
            command="python scripts/evaluate.py " + " ".join(sys.argv[1:]))
    print(render_markdown(report))
    return report


if __name__ == "__main__":
    sys.exit(run_cli(run, parse_args))
