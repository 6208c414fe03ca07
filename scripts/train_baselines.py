"""Train and calibrate the baseline defenses (MagNet, Feature Squeezing) next to FM-Defense.

    python scripts/train_baselines.py --dataset fmnist [--model saved_models/fmnist]
        [--epochs N | --magnet-from DIR] [--fpr F] [--seed 0] [--overwrite] [--quick]
        [--verbose 0|1|2]

Needs MODEL/classifier.keras (from scripts/train.py). Trains MagNet's two autoencoders on the
paper's TRAIN split (20,000 images), calibrates MagNet and Feature Squeezing on VAL (2,000) at
the clean false-positive rate --fpr (default 1 - rho of the FM-Defense config, 0.001), reports
the rate reached on VAL and on the clean CLE images, and writes

    MODEL/baselines/magnet/             detector_I.keras, detector_II.keras, magnet.json
    MODEL/baselines/feature_squeezing.json

Existing outputs are never replaced without --overwrite (exit status 2, nothing written).
--magnet-from DIR reuses the MagNet autoencoders saved in DIR (they are trained on images only,
so a retrained classifier keeps them) and re-calibrates their thresholds; magnet.json records
where they came from and the command that trained them.
--quick: the tiny split of `fmd_tf.config.quick_config` (512 TRAIN, 128 VAL/CLE), 1 epoch and
its rho (fpr 0.05), for tests and CI.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time

OUTPUTS = ("magnet", "feature_squeezing.json")


class UsageError(Exception):
    """Bad command-line input: printed without a traceback, exit status 2."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--model", default=None,
                   help="directory holding classifier.keras (default saved_models/DATASET)")
    p.add_argument("--epochs", type=int, default=None,
                   help="MagNet AE epochs (default 20; MagNet used 100; --quick: 1)")
    p.add_argument("--fpr", type=float, default=None,
                   help="target clean false-positive rate on VAL (default 1 - rho)")
    p.add_argument("--seed", type=int, default=0, help="split and training seed")
    p.add_argument("--overwrite", action="store_true", help="replace existing baseline outputs")
    p.add_argument("--quick", action="store_true", help="tiny split and 1 epoch, for tests/CI")
    p.add_argument("--verbose", type=int, default=0, choices=[0, 1, 2], help="Keras verbosity")
    p.add_argument("--magnet-from", default=None, metavar="DIR",
                   help="reuse the trained MagNet autoencoders in DIR (a MODEL/baselines/magnet "
                        "directory) instead of training new ones; they depend on the images "
                        "only, so a new classifier keeps them. Thresholds are re-calibrated.")
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
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
    return args


def _config(args):
    from fmd_tf.config import get_config, quick_config

    try:
        cfg = get_config(args.dataset)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return quick_config(cfg) if args.quick else cfg


def _check_paths(args):
    classifier_path = os.path.join(args.model, "classifier.keras")
    if not os.path.isfile(classifier_path):
        raise UsageError(f"{classifier_path} not found; train the classifier first "
                         "(python scripts/train.py --stages classifier) or pass --model")
    out_dir = os.path.join(args.model, "baselines")
    existing = [f for f in OUTPUTS if os.path.exists(os.path.join(out_dir, f))]
    if existing and not args.overwrite:
        raise UsageError(
            f"{out_dir} already holds {', '.join(existing)}; pass --overwrite to replace them "
            "or choose another --model"
        )
    return classifier_path, out_dir


def _install(tmp_dir, out_dir):
    """Move the freshly written outputs from tmp_dir into out_dir, replacing old ones."""
    os.makedirs(out_dir, exist_ok=True)
    for name in OUTPUTS:
        target = os.path.join(out_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)
        os.replace(os.path.join(tmp_dir, name), target)


def run(args) -> dict:
    classifier_path, out_dir = _check_paths(args)  # before any TensorFlow import: fast refusals
    cfg = _config(args)

    import keras

    import fmd_tf  # noqa: F401  (registers the Keras classes)
    from fmd_tf.baselines import DEFAULT_EPOCHS, FeatureSqueezing, MagNet
    from fmd_tf.data import paper_splits

    fpr = args.fpr if args.fpr is not None else 1.0 - cfg.defense.rho
    fpr = round(fpr, 12)  # 1 - 0.999 is 0.0010000000000000009
    epochs = args.epochs or (1 if args.quick else DEFAULT_EPOCHS)
    classifier = keras.models.load_model(classifier_path, compile=False)
    splits = paper_splits(args.dataset, args.seed, cfg.splits)
    command = "python scripts/train_baselines.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    common = {"dataset": args.dataset, "seed": args.seed, "quick": args.quick,
              "command": command, "num_cle": int(len(splits.x_cle))}
    print(f"{args.dataset}: TRAIN {len(splits.x_train)}, VAL {len(splits.x_val)}, "
          f"CLE {len(splits.x_cle)}; target VAL FPR {fpr:g}")

    t = time.time()
    keras.utils.set_random_seed(args.seed)
    if args.magnet_from is None:
        magnet = MagNet(classifier, image_shape=cfg.image_shape, epochs=epochs, seed=args.seed)
        report = magnet.fit(splits.x_train, splits.x_val, fpr, verbose=args.verbose)
    else:
        magnet = MagNet.load(args.magnet_from, classifier)
        trained = magnet.report
        magnet.report = {k: trained[k] for k in ("history", "epochs", "num_train",
                                                 "train_seconds") if k in trained}
        magnet.report.update(autoencoders_from=args.magnet_from,
                             autoencoders_command=trained.get("command"))
        report = magnet.calibrate(splits.x_val, fpr)
        report.update(magnet.report)
        epochs = magnet.epochs
    magnet_out = magnet.defend(splits.x_cle)
    magnet_seconds = time.time() - t
    magnet.report.update(
        common, seconds=magnet_seconds,
        cle_false_positive_rate=float((magnet_out["verdict"] == 2).mean()),
        cle_accuracy=float((magnet_out["label"] == splits.y_cle).mean()),
    )
    last = {k: h["loss"][-1] for k, h in report["history"].items()}
    reused = " (reused)" if args.magnet_from else ""
    print(f"MagNet: {epochs} epochs{reused}, final train loss I {last['I']:.5f} "
          f"II {last['II']:.5f}; "
          f"thresholds I (L2) {report['thresholds']['I']:.6g}, II (L1) "
          f"{report['thresholds']['II']:.6g}")
    print(f"MagNet: VAL FPR {report['val_false_positive_rate']:.4f} (I "
          f"{report['val_false_positive_rate_per_detector']['I']:.4f}, II "
          f"{report['val_false_positive_rate_per_detector']['II']:.4f}), CLE FPR "
          f"{magnet.report['cle_false_positive_rate']:.4f}, CLE accuracy "
          f"{magnet.report['cle_accuracy']:.4f}; {magnet_seconds:.1f} s "
          f"(training {report['train_seconds']:.1f} s)")

    t = time.time()
    squeezing = FeatureSqueezing(classifier)
    fs_report = squeezing.calibrate(splits.x_val, fpr)
    fs_out = squeezing.defend(splits.x_cle)
    fs_seconds = time.time() - t
    squeezing.report.update(
        common, seconds=fs_seconds,
        cle_false_positive_rate=float((fs_out["verdict"] == 2).mean()),
        cle_accuracy=float((fs_out["label"] == splits.y_cle).mean()),
    )
    print(f"Feature Squeezing ({', '.join(squeezing.squeezer_names)}): threshold "
          f"{fs_report['threshold']:.6g}, VAL FPR {fs_report['val_false_positive_rate']:.4f}, "
          f"CLE FPR {squeezing.report['cle_false_positive_rate']:.4f}, CLE accuracy "
          f"{squeezing.report['cle_accuracy']:.4f}; {fs_seconds:.1f} s")

    os.makedirs(args.model, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".baselines-", dir=args.model)
    try:
        magnet.save(os.path.join(tmp_dir, "magnet"))
        squeezing.save(os.path.join(tmp_dir, "feature_squeezing.json"))
        _install(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"wrote {out_dir}: magnet/, feature_squeezing.json "
          f"({magnet_seconds + fs_seconds:.1f} s)")
    return {"magnet": magnet.report, "feature_squeezing": squeezing.report}


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001  (clean message for the known user-facing errors)
        from fmd_tf.data import DataNotAvailableError

        if isinstance(e, DataNotAvailableError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
