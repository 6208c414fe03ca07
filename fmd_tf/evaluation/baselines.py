"""The baseline defenses next to a trained FM-Defense: MODEL/baselines, trained and loaded.

    MODEL/baselines/magnet/             detector_I.keras, detector_II.keras, magnet.json
    MODEL/baselines/feature_squeezing.json
    MODEL/baselines/defense_gan/        generator.keras, defense_gan.json

`train_baselines` trains MagNet's autoencoders (or reuses trained ones) and Defense-GAN's WGAN
on the paper's TRAIN split, calibrates MagNet, Feature Squeezing and Defense-GAN on VAL at a
clean false-positive rate and writes them there (never half-written; existing ones only with
overwrite=True); `load_baselines` gives them to `fmd_tf.evaluation.report.evaluate`.
`scripts/train_baselines.py` is the command line.

A fair comparison (`fm_defense_point`): by default every baseline is calibrated at the clean VAL
false-positive rate of the FM-Defense in MODEL (the share of VAL images its calibration flags),
and Feature Squeezing's squeezers are chosen on VAL (`choose_squeezers`) with the attacked VAL
images FM-Defense's operating point was chosen with, by the same max-min rule.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time

__all__ = ["OUTPUTS", "QUICK_DEFENSE_GAN", "SAVED", "baseline_config", "baseline_path",
           "check_outputs", "fm_defense_point", "load_baselines", "train_baselines"]

# Report name -> (the saved baseline under MODEL/baselines, its name in notes).
SAVED = {"magnet": ("magnet", "MagNet"),
         "feature_squeezing": ("feature_squeezing.json", "Feature Squeezing"),
         "defense_gan": ("defense_gan", "Defense-GAN")}
OUTPUTS = tuple(path for path, _ in SAVED.values())  # under MODEL/baselines
# Defense-GAN settings of a `quick` run (tests, CI): seconds instead of hours.
QUICK_DEFENSE_GAN = {"gan_epochs": 1, "rec_iters": 10, "rec_restarts": 2}


def load_baselines(model_dir: str, classifier) -> tuple[dict, list[str]]:
    """({"magnet": MagNet, "feature_squeezing": FeatureSqueezing, "defense_gan": DefenseGAN}
    around `classifier`, those found in `model_dir`/baselines; notes naming the missing ones)."""
    loaded, notes = {}, []
    try:
        from fmd_tf.baselines import DefenseGAN, FeatureSqueezing, MagNet
    except ImportError as e:  # pragma: no cover
        return loaded, [f"baselines unavailable: {e}"]
    classes = {"magnet": MagNet, "feature_squeezing": FeatureSqueezing, "defense_gan": DefenseGAN}
    for name, (_, title) in SAVED.items():
        path = baseline_path(model_dir, name)
        if os.path.exists(path):
            loaded[name] = classes[name].load(path, classifier)
        else:
            notes.append(f"{title} not found at {path} (run scripts/train_baselines.py)")
    return loaded, notes


def baseline_path(model_dir: str, name: str) -> str:
    """Where the baseline `name` (a key of `SAVED`) of the model in `model_dir` is saved."""
    return os.path.join(model_dir, "baselines", SAVED[name][0])


def baseline_config(dataset: str = "fmnist", quick: bool = False, model_dir: str | None = None):
    """The `ExperimentConfig` of `dataset` (its split sizes and ρ), shrunk by `quick`
    (`fmd_tf.config.quick_config`), with the split sizes of the model card in `model_dir` when
    it has them (the VAL and CLE images the FM-Defense there was calibrated and tested on).

    `dataset` is a name of `fmd_tf.data.DATASETS` or the path of a .npz file or an image
    directory (the Fashion-MNIST settings, sizes fitted to the data when it is loaded);
    ValueError for anything else.
    """
    from fmd_tf.config import ExperimentConfig, card_split_config, get_config, quick_config
    from fmd_tf.data import DATASETS

    try:
        cfg = get_config(dataset)
    except ValueError:
        if dataset not in DATASETS and not os.path.exists(os.path.expanduser(str(dataset))):
            raise ValueError(f"unknown dataset {dataset!r}: give one of "
                             f"{', '.join(sorted(DATASETS))} or the path of a .npz file or an "
                             "image directory") from None
        cfg = ExperimentConfig(dataset=str(dataset))
    cfg = quick_config(cfg) if quick else cfg
    sizes = card_split_config(model_dir) if model_dir else None
    return dataclasses.replace(cfg, splits=sizes) if sizes else cfg


def _card(model_dir: str) -> dict:
    """MODEL/model_card.json, or {} when there is none."""
    path = os.path.join(model_dir, "model_card.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def fm_defense_point(model_dir: str, quick: bool = False) -> dict:
    """What the baselines are matched to, from MODEL/model_card.json: {"val_false_positive_rate":
    the share of clean VAL the FM-Defense calibration flags (None without a calibrated card),
    "chosen_with": the attacks its operating point was chosen with (None when the card has
    none: "paper" / "config" points), "attacks": names, "n": first VAL images attacked, "seed"}
    (those of its operating-point table; `OperatingPointConfig`'s, or the fast preset's with
    `quick`, when it has none)."""
    from fmd_tf.operating_point import grid

    card = _card(model_dir)
    default = grid("auto", fast=quick)
    attacks = (card.get("operating_point") or {}).get("attacks") or {}
    return {"val_false_positive_rate": (card.get("calibration") or {}).get(
                "val_false_positive_rate"),
            "chosen_with": list(attacks["names"]) if attacks.get("names") else None,
            "attacks": list(attacks.get("names") or default.attacks),
            "n": int(attacks.get("n") or default.n_attack), "seed": int(attacks.get("seed", 0))}


def check_outputs(model_dir: str, overwrite: bool = False) -> tuple[str, str]:
    """(the classifier's path, MODEL/baselines); FileNotFoundError without the classifier,
    FileExistsError when baseline outputs exist and not `overwrite`. The classifier is
    MODEL/classifier.keras, or the user's own one named in the model card (`classifier_path`,
    train.py --classifier)."""
    classifier_path = os.path.join(model_dir, "classifier.keras")
    if not os.path.isfile(classifier_path):
        classifier_path = _card(model_dir).get("classifier_path") or classifier_path
    if not os.path.isfile(classifier_path):
        raise FileNotFoundError(f"{classifier_path} not found; train the classifier first "
                                "(python scripts/train.py --stages classifier) or pass --model")
    out_dir = os.path.join(model_dir, "baselines")
    existing = [f for f in OUTPUTS if os.path.exists(os.path.join(out_dir, f))]
    if existing and not overwrite:
        raise FileExistsError(
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


def _fit_magnet(classifier, splits, cfg, fpr, epochs, seed, magnet_from, verbose):
    """(MagNet trained or reused from `magnet_from` and calibrated at `fpr`, its report)."""
    from fmd_tf.baselines import MagNet

    if magnet_from is None:
        magnet = MagNet(classifier, image_shape=cfg.image_shape, epochs=epochs, seed=seed)
        return magnet, magnet.fit(splits.x_train, splits.x_val, fpr, verbose=verbose)
    magnet = MagNet.load(magnet_from, classifier)
    trained = magnet.report
    magnet.report = {k: trained[k] for k in ("history", "epochs", "num_train",
                                             "train_seconds") if k in trained}
    # Reused autoencoders that were themselves reused keep the command that trained them.
    magnet.report.update(autoencoders_from=magnet_from,
                         autoencoders_command=trained.get("autoencoders_command")
                         or trained.get("command"))
    report = magnet.calibrate(splits.x_val, fpr)
    report.update(magnet.report)
    return magnet, report


def _fit_feature_squeezing(classifier, splits, point, fpr, cache_dir):
    """Feature Squeezing with the squeezers `choose_squeezers` picks on VAL (the attacks of
    `point`, made from its first VAL images), calibrated at `fpr`; the choice in its report."""
    from fmd_tf.baselines import FeatureSqueezing, choose_squeezers
    from fmd_tf.evaluation import harness

    n = min(point["n"], len(splits.x_val))
    x_att, y_att = splits.x_val[:n], splits.y_val[:n]
    adversarial = {name: (harness.adversarial_set(name, classifier, x_att, y_att, cache_dir,
                                                  point["seed"])[0], y_att)
                   for name in point["attacks"]}
    index, rows = choose_squeezers(classifier, splits.x_val, splits.y_val, adversarial, fpr)
    squeezing = FeatureSqueezing(classifier, bit_depth=rows[index]["bit_depth"],
                                 median_size=rows[index]["median_size"])
    squeezing.calibrate(splits.x_val, fpr)
    squeezing.report["selection"] = {
        "rule": "max-min VAL defended accuracy over clean and the attacks (as FM-Defense's "
                "operating point)",
        "attacks": point["attacks"], "n": n, "seed": point["seed"], "chosen": index,
        "rows": rows}
    return squeezing


def _fit_defense_gan(classifier, splits, cfg, fpr, settings, seed, verbose):
    """(DefenseGAN with `settings` {"gan_epochs", "rec_iters", "rec_restarts"}, its WGAN trained
    on TRAIN and its threshold calibrated on VAL at `fpr`, its report)."""
    from fmd_tf.baselines import DefenseGAN

    dgan = DefenseGAN(classifier, image_shape=cfg.image_shape, epochs=settings["gan_epochs"],
                      rec_iters=settings["rec_iters"], rec_restarts=settings["rec_restarts"],
                      seed=seed)
    return dgan, dgan.fit(splits.x_train, splits.x_val, fpr, verbose=verbose)


def _cle_figures(defense, splits, common, started, verbose: int = 0) -> float:
    """Adds the CLE false-positive rate and accuracy (and `common`) to `defense.report`;
    returns the seconds since `started`. `verbose` shows a progress bar."""
    out = defense.defend(splits.x_cle, verbose=verbose)
    seconds = time.time() - started
    defense.report.update(common, seconds=seconds,
                          cle_false_positive_rate=float((out["verdict"] == 2).mean()),
                          cle_accuracy=float((out["label"] == splits.y_cle).mean()))
    return seconds


def train_baselines(model_dir: str, dataset: str = "fmnist", *, epochs: int | None = None,
                    fpr: float | None = None, seed: int = 0, overwrite: bool = False,
                    quick: bool = False, verbose: int = 0, magnet_from: str | None = None,
                    gan_epochs: int | None = None, rec_iters: int | None = None,
                    rec_restarts: int | None = None, command: str | None = None,
                    cache_dir: str | None = None, log=print) -> dict:
    """Train and calibrate MagNet, Feature Squeezing and Defense-GAN around
    MODEL/classifier.keras; write them to MODEL/baselines (see the module doc). Returns
    {"magnet": report, "feature_squeezing": report, "defense_gan": report}.

    Args:
        epochs: MagNet autoencoder epochs (default `fmd_tf.baselines.DEFAULT_EPOCHS`, 1 with
            `quick`); not with `magnet_from`.
        gan_epochs, rec_iters, rec_restarts: Defense-GAN's WGAN training epochs and its latent
            search's steps L and random restarts R (defaults `DEFAULT_GAN_EPOCHS`,
            `DEFAULT_REC_ITERS`, `DEFAULT_REC_RESTARTS` of `fmd_tf.baselines.defense_gan`;
            `QUICK_DEFENSE_GAN` with `quick`).
        fpr: target clean false-positive rate on VAL (default: the FM-Defense's in `model_dir`,
            `fm_defense_point`; 1 - ρ of the dataset's config when its card has none).
        quick: the tiny split of `fmd_tf.config.quick_config`.
        verbose: Keras verbosity of the autoencoder training.
        magnet_from: a MODEL/baselines/magnet directory whose autoencoders are reused (only
            the thresholds are re-calibrated).
        command: how the run was started, recorded in the reports.
        cache_dir: adversarial-set cache of the attacked VAL images (None: none).
        log: called with each progress line (None: silent).

    Raises FileNotFoundError / FileExistsError (`check_outputs`) and ValueError (unknown
    dataset) before anything is trained.
    """
    classifier_path, out_dir = check_outputs(model_dir, overwrite)
    cfg = baseline_config(dataset, quick, model_dir)
    log = log or (lambda line: None)

    import keras

    import fmd_tf  # noqa: F401  (registers the Keras classes)
    from fmd_tf.baselines import DEFAULT_EPOCHS
    from fmd_tf.baselines.defense_gan import (
        DEFAULT_GAN_EPOCHS,
        DEFAULT_REC_ITERS,
        DEFAULT_REC_RESTARTS,
    )
    from fmd_tf.data import fit_split_config, load_dataset, make_splits

    point = fm_defense_point(model_dir, quick)
    if fpr is not None:
        fpr_source = "given"
    elif point["val_false_positive_rate"] is not None:
        fpr, fpr_source = point["val_false_positive_rate"], "FM-Defense VAL FPR (model card)"
    else:
        fpr, fpr_source = 1.0 - cfg.defense.rho, "1 - rho (no calibrated FM-Defense card)"
    fpr = round(fpr, 12)  # 1 - 0.999 is 0.0010000000000000009
    epochs = epochs or (1 if quick else DEFAULT_EPOCHS)
    gan_defaults = QUICK_DEFENSE_GAN if quick else {
        "gan_epochs": DEFAULT_GAN_EPOCHS, "rec_iters": DEFAULT_REC_ITERS,
        "rec_restarts": DEFAULT_REC_RESTARTS}
    given = {"gan_epochs": gan_epochs, "rec_iters": rec_iters, "rec_restarts": rec_restarts}
    gan_settings = {k: gan_defaults[k] if v is None else int(v) for k, v in given.items()}
    if min(gan_settings["gan_epochs"], gan_settings["rec_restarts"]) < 1 or \
            gan_settings["rec_iters"] < 0:
        raise ValueError(f"Defense-GAN needs gan_epochs >= 1, rec_iters >= 0 and "
                         f"rec_restarts >= 1, got {gan_settings}")
    classifier = keras.models.load_model(classifier_path, compile=False)
    train, test = load_dataset(dataset)
    splits = make_splits(train, test, fit_split_config(cfg.splits, len(train[0]), len(test[0])),
                         seed)
    cfg = dataclasses.replace(cfg, image_shape=tuple(splits.x_train.shape[1:]))
    common = {"dataset": dataset, "seed": seed, "quick": quick, "command": command,
              "num_cle": int(len(splits.x_cle)), "fpr_source": fpr_source}
    log(f"{dataset}: TRAIN {len(splits.x_train)}, VAL {len(splits.x_val)}, "
        f"CLE {len(splits.x_cle)}; target VAL FPR {fpr:g} ({fpr_source})")

    started = time.time()
    keras.utils.set_random_seed(seed)
    magnet, report = _fit_magnet(classifier, splits, cfg, fpr, epochs, seed, magnet_from,
                                 verbose)
    epochs = magnet.epochs if magnet_from is not None else epochs
    magnet_seconds = _cle_figures(magnet, splits, common, started, verbose)
    last = {k: h["loss"][-1] for k, h in report["history"].items()}
    reused = " (reused)" if magnet_from else ""
    log(f"MagNet: {epochs} epochs{reused}, final train loss I {last['I']:.5f} "
        f"II {last['II']:.5f}; "
        f"thresholds I (L2) {report['thresholds']['I']:.6g}, II (L1) "
        f"{report['thresholds']['II']:.6g}")
    log(f"MagNet: VAL FPR {report['val_false_positive_rate']:.4f} (I "
        f"{report['val_false_positive_rate_per_detector']['I']:.4f}, II "
        f"{report['val_false_positive_rate_per_detector']['II']:.4f}), CLE FPR "
        f"{magnet.report['cle_false_positive_rate']:.4f}, CLE accuracy "
        f"{magnet.report['cle_accuracy']:.4f}; {magnet_seconds:.1f} s "
        f"(training {report['train_seconds']:.1f} s)")

    started = time.time()
    squeezing = _fit_feature_squeezing(classifier, splits, point, fpr, cache_dir)
    fs_seconds = _cle_figures(squeezing, splits, common, started, verbose)
    fs_report = squeezing.report
    selection = fs_report["selection"]
    log(f"Feature Squeezing: squeezers chosen on VAL ({len(selection['rows'])} candidates, "
        f"{', '.join(selection['attacks'])} on {selection['n']} VAL images): "
        f"{', '.join(squeezing.squeezer_names)}; threshold {fs_report['threshold']:.6g}, "
        f"VAL FPR {fs_report['val_false_positive_rate']:.4f}, "
        f"CLE FPR {fs_report['cle_false_positive_rate']:.4f}, CLE accuracy "
        f"{fs_report['cle_accuracy']:.4f}; {fs_seconds:.1f} s")

    started = time.time()
    dgan, gan_report = _fit_defense_gan(classifier, splits, cfg, fpr, gan_settings, seed,
                                        verbose)
    gan_seconds = _cle_figures(dgan, splits, common, started, verbose)
    history = gan_report["history"]
    log(f"Defense-GAN: {dgan.epochs} epochs ({history['generator_steps']} generator steps), "
        f"final Wasserstein estimate {history['wasserstein'][-1]:.4g}; latent search L "
        f"{dgan.rec_iters}, R {dgan.rec_restarts}; threshold (squared L2) "
        f"{gan_report['threshold']:.6g}")
    log(f"Defense-GAN: VAL FPR {gan_report['val_false_positive_rate']:.4f}, CLE FPR "
        f"{dgan.report['cle_false_positive_rate']:.4f}, CLE accuracy "
        f"{dgan.report['cle_accuracy']:.4f}; {gan_seconds:.1f} s "
        f"(training {gan_report['train_seconds']:.1f} s)")

    os.makedirs(model_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".baselines-", dir=model_dir)
    try:
        magnet.save(os.path.join(tmp_dir, "magnet"))
        squeezing.save(os.path.join(tmp_dir, "feature_squeezing.json"))
        dgan.save(os.path.join(tmp_dir, "defense_gan"))
        _install(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log(f"wrote {out_dir}: magnet/, feature_squeezing.json, defense_gan/ "
        f"({magnet_seconds + fs_seconds + gan_seconds:.1f} s)")
    return {"magnet": magnet.report, "feature_squeezing": squeezing.report,
            "defense_gan": dgan.report}
