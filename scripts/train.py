"""Train the FM-Defense stack: classifier -> DGMM -> combo-VAE -> calibrated FMDefense.

    python scripts/train.py --dataset fmnist|mnist|digits [--data FILE.npz|DIR]
        [--classifier PATH.keras] [--out saved_models/NAME] [--seed S] [--preset full|fast]
        [--operating-point auto|robust|paper|config]
        [--stages classifier,dgmm,vae,defense,ensemble]
        [--ensemble K] [--epochs N] [--strategy default|mirrored|multiworker] [--overwrite]
        [--rho R] [--eta E] [--threshold-mode per_code|unified] [--radius-step S] [--num-morphs N]

With no option but --dataset it trains the whole stack and picks the operating point on VAL
(`--operating-point auto`, `fmd_tf.operating_point`): ρ, threshold mode and the reconstruction
gate with the best worst case over clean VAL and FGSM / PGD examples made from VAL images,
within 2 points of the classifier's clean VAL accuracy. For an adversarially trained classifier
(`--classifier-training pgd_at|trades`, or the one OUT's card describes) the default is
`--operating-point robust`: the same rule against APGD at the classifier's training radius
(`--classifier-adversarial-eps`, L∞ 0.1 by default) with a classifier-margin gate, within 1
point. `--operating-point paper` keeps the paper's ρ 0.999 and no gate; `config` uses the defense
flags as given.

`--data` brings your own images: a .npz with x_train, y_train, x_test, y_test, or a directory
with one sub-folder per class (`fmd_tf.data.load_dataset`); `--classifier` protects an existing
Keras classifier (the classifier stage is skipped).

Writes into --out: classifier.keras, combo_vae.keras, fmd.keras, the TF Serving SavedModel
serving/1/, model_card.json (figures, hyperparameters, the command), latent_traversals.png,
val_resistance.npy and TensorBoard logs in logs/. Stages not selected load their model from
--out. Existing models are never replaced without --overwrite.

With --ensemble K (the randomized defense of the paper's conclusion) the ensemble stage
trains members 1..K-1 into OUT/members/I (DGMM, combo-VAE and calibration as above, on the same
splits and classifier; model and morph seeds offset by I), reuses members already there unless
--overwrite, and writes OUT/fmd_ensemble.keras (OUT/fmd.keras is member 0) and its SavedModel
OUT/serving_ensemble/1/.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shlex
import shutil
import sys
import time

from fmd_tf.cli import UsageError, add_cache_argument, resolve_seed, run_cli

STAGES = ("classifier", "dgmm", "vae", "defense", "ensemble")
OUTPUTS = {
    "classifier": ["classifier.keras"],
    "dgmm": ["combo_vae.keras"],
    "vae": ["combo_vae.keras", "latent_traversals.png"],
    "defense": ["fmd.keras", "val_resistance.npy", "serving"],
    "ensemble": ["fmd_ensemble.keras", "serving_ensemble"],
}
MEMBER_STAGES = ("dgmm", "vae", "defense")


def parse_args(argv):
    from fmd_tf.config import ClassifierConfig, ComboVAEConfig, DefenseConfig
    from fmd_tf.data import DATASETS
    from fmd_tf.operating_point import POINT_KEYS, STAGE_POINTS
    from fmd_tf.options import OptionError, add_arguments, apply_arguments
    from fmd_tf.pipeline import PRESETS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="fmnist", choices=list(DATASETS),
                   help="named dataset (ignored with --data)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help=".npz (x_train, y_train, x_test, y_test) or a directory with one "
                        "sub-folder of images per class")
    p.add_argument("--out", default=None,
                   help="output directory (default saved_models/DATASET or saved_models/<data "
                        "file name>)")
    p.add_argument("--preset", default="full", choices=list(PRESETS),
                   help="full (paper scale) or fast (tiny: trials, tests and CI)")
    p.add_argument("--operating-point", default=None, choices=list(STAGE_POINTS),
                   help="auto: chosen on VAL (clean, FGSM, PGD); robust: chosen on VAL "
                        "(clean, APGD-CE/-DLR/-margin at the classifier's training radius, "
                        "--classifier-adversarial-eps, with a classifier-margin gate) for a "
                        "classifier trained to hold there; paper: rho 0.999, no "
                        "gate; config: the defense flags below as given (default: robust for "
                        "an adversarially trained classifier, this run's or OUT's, else auto)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the data splits and of the models (default: with stages that "
                        "continue OUT's model, no classifier stage, the seed in its card; else 0)")
    add_cache_argument(p)
    p.add_argument("--stages", default=None, help="comma-separated subset of "
                   + ",".join(STAGES) + " (default: all; ensemble only with --ensemble K > 1)")
    p.add_argument("--ensemble", type=int, default=1, metavar="K",
                   help="randomized defense of K combo-VAEs: members 1..K-1 are trained into "
                        "OUT/members/I (same splits and classifier, seeds offset by I; existing "
                        "ones are reused unless --overwrite) and OUT/fmd_ensemble.keras is "
                        "assembled with OUT/fmd.keras as member 0")
    p.add_argument("--ensemble-key", default=None, metavar="A,B",
                   help="two non-negative ints, the secret key of the per-image member draw "
                        "(default: SEED,K; a published key is public: re-key what you serve)")
    p.add_argument("--epochs", type=int, default=None, help="override the epochs of every stage")
    p.add_argument("--quick", action="store_true", help="same as --preset fast")
    p.add_argument("--strategy", default="default", choices=["default", "mirrored", "multiworker"])
    p.add_argument("--overwrite", action="store_true", help="replace existing models in --out")
    p.add_argument("--verbose", default="auto", help="Keras verbosity: auto, 0, 1 or 2")
    p.add_argument("--classifier", default=None,
                   help="an existing Keras classifier to defend (images in [0, 1] -> logits); "
                        "the classifier stage is skipped")
    p.add_argument("--combo-vae", default=None, metavar="PATH",
                   help="an existing combo_vae.keras to calibrate on (the dgmm and vae stages "
                        "are skipped), e.g. another model's, to defend a retrained classifier "
                        "without training the VAE again; its label-consistency term followed "
                        "the classifier it was trained with, so the card reports its "
                        "reconstruction label agreement with this one")
    p.add_argument("--member-index", type=int, default=0,
                   help="train ensemble member I: model and morph seeds offset by I, the same "
                        "data splits (those of --seed); used by --ensemble")
    p.add_argument("--reuse-val-resistance", action="store_true",
                   help="with --stages defense: re-threshold from OUT/val_resistance.npy "
                        "(verified on 32 VAL images) instead of recomputing all morphs; the "
                        "defense options are OUT's (its card's), those given here override "
                        "them")
    add_arguments(p.add_argument_group(
        "defense options (fmd_tf.config.DefenseConfig; recorded in the card)"), DefenseConfig)
    add_arguments(p.add_argument_group(
        "combo-VAE options (fmd_tf.config.ComboVAEConfig; --vae-epochs wins over --epochs)"),
        ComboVAEConfig)
    add_arguments(p.add_argument_group(
        "classifier options (fmd_tf.config.ClassifierConfig; --classifier-epochs wins over "
        "--epochs)"), ClassifierConfig, prefix="classifier_")
    args = p.parse_args(argv)
    if args.quick:
        args.preset = "fast"
    if args.data is not None:
        if not os.path.exists(args.data):
            raise UsageError(f"--data {args.data} not found")
        args.dataset = os.path.splitext(os.path.basename(os.path.normpath(args.data)))[0]
    given = {"classifier": ("classifier",) if args.classifier else (),
             "combo_vae": ("dgmm", "vae") if args.combo_vae else ()}
    if args.stages is None and any(given.values()):
        args.stages = ",".join(s for s in STAGES if s not in sum(given.values(), ())
                               and (s != "ensemble" or args.ensemble > 1))
    if args.ensemble < 1:
        raise UsageError(f"--ensemble must be >= 1, got {args.ensemble}")
    if args.stages is None:
        args.stages = ",".join(s for s in STAGES if s != "ensemble" or args.ensemble > 1)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise UsageError(f"--stages: unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    args.stages = [s for s in STAGES if s in stages]
    if "ensemble" in args.stages and args.ensemble < 2:
        raise UsageError("the ensemble stage needs --ensemble K with K >= 2")
    for name, skipped in given.items():
        flag = "--" + name.replace("_", "-")
        if set(skipped) & set(args.stages):
            raise UsageError(f"{flag} names an existing model: drop the "
                             f"{' and '.join(skipped)} stage(s)")
        if skipped and not os.path.isfile(getattr(args, name)):
            raise UsageError(f"{flag} {getattr(args, name)} not found")
    if args.combo_vae and args.ensemble > 1:
        raise UsageError("--combo-vae cannot be used with --ensemble: every member trains its "
                         "own combo-VAE")
    if args.member_index < 0:
        raise UsageError(f"--member-index must be >= 0, got {args.member_index}")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    try:  # check the given option values now, before any data is loaded
        apply_arguments(DefenseConfig(), _with_search_steps(args, DefenseConfig()))
        apply_arguments(ComboVAEConfig(), args)
    except OptionError as e:
        raise UsageError(str(e)) from None
    point_flags = [f"--{k.replace('_', '-')}" for k in POINT_KEYS if getattr(args, k) is not None]
    if point_flags and args.operating_point != "config":
        raise UsageError(f"{', '.join(point_flags)} set the operating point by hand: add "
                         "--operating-point config (the default chooses it on VAL)")
    args.out = args.out or os.path.join("saved_models", args.dataset)
    if args.seed is None:  # stages that continue OUT's model: the splits it was made with
        args.seed = 0 if "classifier" in args.stages else resolve_seed(args, args.out)
    key = args.ensemble_key or f"{args.seed},{args.ensemble}"
    try:
        args.ensemble_key = tuple(int(k) for k in key.split(","))
    except ValueError:
        args.ensemble_key = ()
    if len(args.ensemble_key) != 2 or min(args.ensemble_key) < 0:
        raise UsageError(f"--ensemble-key must be two non-negative ints A,B, got {key!r}")
    args.verbose = args.verbose if args.verbose == "auto" else int(args.verbose)
    return args


def _config(args, image_shape, num_classes, n_train, n_test):
    from fmd_tf.config import get_config
    from fmd_tf.data import fit_split_config
    from fmd_tf.options import OptionError, apply_arguments
    from fmd_tf.pipeline import experiment_config

    try:
        base = get_config(args.dataset)
    except ValueError:  # digits, --data: the Fashion-MNIST settings, sized for the data
        base = None
    from fmd_tf.config import ClassifierConfig, ComboVAEConfig, card_defense_config
    from fmd_tf.options import given_arguments

    # --latent feature_map brings its own defaults (gamma 0, map side); flags given override them
    latent = given_arguments(args, ComboVAEConfig).get("latent")
    # so does --classifier-training pgd_at / trades (no dropout, more epochs)
    training = given_arguments(args, ClassifierConfig, prefix="classifier_").get("training")
    cfg = experiment_config(image_shape, num_classes, args.preset, args.dataset, base, latent,
                            training)
    cfg = dataclasses.replace(cfg, splits=fit_split_config(cfg.splits, n_train, n_test))
    if args.epochs is not None:
        cfg = dataclasses.replace(
            cfg,
            classifier=dataclasses.replace(cfg.classifier, epochs=args.epochs),
            combo=dataclasses.replace(cfg.combo, dgmm_epochs=args.epochs, vae_epochs=args.epochs),
        )
    defense = cfg.defense
    if args.reuse_val_resistance:  # a re-threshold of OUT's defense: its options, unless given
        try:
            defense = card_defense_config(args.out) or defense
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.member_index:
        defense = dataclasses.replace(defense, seed=defense.seed + args.member_index)
    try:
        return dataclasses.replace(
            cfg, defense=apply_arguments(defense, _with_search_steps(args, defense)),
            combo=apply_arguments(cfg.combo, args),
            classifier=apply_arguments(cfg.classifier, args, prefix="classifier_"))
    except OptionError as e:
        raise UsageError(str(e)) from None


def _operating_point(args, cfg) -> tuple[str, float]:
    """(--operating-point or its default, the L∞ radius the robust rule attacks at).

    The default is "robust" when the classifier was adversarially trained (this run's
    classifier stage, else the one OUT's card describes; a user's own --classifier is not known
    to be), else "auto". The radius is that classifier's training radius (this run's, or the
    card's unless --classifier-adversarial-eps is given), else --classifier-adversarial-eps."""
    from fmd_tf.config import card_classifier_training

    training, eps = cfg.classifier.training, cfg.classifier.adversarial_eps
    # OUT's card is read only for what it can decide: the default point or the robust radius.
    needs_card = args.operating_point is None or (
        args.operating_point == "robust" and args.classifier_adversarial_eps is None)
    if args.classifier is not None:
        training = None
    elif "classifier" not in args.stages and needs_card:
        try:
            training, card_eps = card_classifier_training(args.out) or (None, None)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if args.classifier_adversarial_eps is None and card_eps is not None:
            eps = card_eps
    point = args.operating_point or ("auto" if training in (None, "standard") else "robust")
    return point, eps


def _with_search_steps(args, defense):
    """`args` with --max-steps raised so that the search draws --num-morphs candidates."""
    from fmd_tf.options import given_arguments

    given = given_arguments(args, type(defense))
    num_morphs = given.get("num_morphs", defense.num_morphs)
    per_step = given.get("candidates_per_step", defense.candidates_per_step)
    if "max_steps" in given or not isinstance(num_morphs, int) or per_step * defense.max_steps \
            >= num_morphs or per_step < 1:
        return args
    return argparse.Namespace(**{**vars(args), "max_steps": -(-num_morphs // per_step)})


def _source_record(path: str) -> dict:
    """{"path", "sha256", "bytes"} of an input model file that is not among OUT's artifacts."""
    from fmd_tf.loading import artifact_records

    return {"path": path, **artifact_records(os.path.dirname(path),
                                             [os.path.basename(path)])[os.path.basename(path)]}


def _check_outputs(args):
    init = getattr(args, "classifier_init", None)
    if init is not None and "classifier" not in args.stages:
        raise UsageError("--classifier-init starts the classifier stage: add it to --stages")
    if init is not None and not os.path.isfile(init):
        raise UsageError(f"--classifier-init {init}: no such file; give a saved classifier "
                         "(.keras)")
    existing = sorted({
        f for s in args.stages for f in OUTPUTS[s] if os.path.exists(os.path.join(args.out, f))
    })
    if existing and not args.overwrite:
        raise UsageError(
            f"{args.out} already holds {', '.join(existing)}; pass --overwrite to replace them "
            "or choose another --out"
        )
    if "ensemble" in args.stages and "defense" not in args.stages and not os.path.exists(
            os.path.join(args.out, "fmd.keras")):
        raise UsageError(f"the ensemble stage needs {os.path.join(args.out, 'fmd.keras')} "
                         "(member 0): add the defense stage")
    for stage, needed in (("classifier", "classifier.keras"), ("vae", "combo_vae.keras")):
        needs_it = any(STAGES.index(s) > STAGES.index(stage) for s in args.stages
                       if s != "ensemble" or stage == "classifier")
        path = ({"classifier": args.classifier, "vae": args.combo_vae}[stage]
                or os.path.join(args.out, needed))
        if needs_it and stage not in args.stages and not (
            stage == "vae" and "dgmm" in args.stages
        ) and not os.path.exists(path):
            raise UsageError(f"stage {stage!r} not selected and {path} does not exist")


def run(args) -> dict:
    """Train the selected stages into a staging directory inside --out and move the results
    into place at the end (`fmd_tf.files.StagedOutputs`): a run that fails or is killed leaves
    --out as it was."""
    from fmd_tf.files import StagedOutputs

    _check_outputs(args)  # before the imports: a refusal answers at once
    try:
        return _run(args)
    except BaseException:
        shutil.rmtree(os.path.join(args.out, StagedOutputs.STAGING), ignore_errors=True)
        raise


def _run(args) -> dict:
    import keras
    import numpy as np

    import fmd_tf  # noqa: F401  (registers the Keras classes)
    from fmd_tf import plots, training
    from fmd_tf.config import to_dict
    from fmd_tf.data import load_dataset, make_splits
    from fmd_tf.evaluation.bench import matmul_peak_flops
    from fmd_tf.evaluation.latent_codes import code_activity
    from fmd_tf.evaluation.robustness import robust_training_check, robustness_summary
    from fmd_tf.export import export_after_training
    from fmd_tf.files import StagedOutputs, write_json
    from fmd_tf.loading import artifact_records, model_artifacts
    from fmd_tf.pipeline import calibrate_defense, check_data, operating_point_config

    try:
        (x_train_full, y_train_full), (x_test, y_test) = load_dataset(args.data or args.dataset)
    except ValueError as e:
        raise UsageError(str(e)) from None
    num_classes = int(max(y_train_full.max(), y_test.max())) + 1
    cfg = _config(args, x_train_full.shape[1:], num_classes, len(x_train_full), len(x_test))
    os.makedirs(args.out, exist_ok=True)
    stage = StagedOutputs(args.out)  # nothing in OUT changes before the run has finished
    model_seed = args.seed + args.member_index  # the data splits always follow --seed
    keras.utils.set_random_seed(model_seed)
    strategy = training.get_strategy(args.strategy)
    log_dir = os.path.join(args.out, "logs")
    card_path = os.path.join(args.out, "model_card.json")
    card = {}
    if os.path.exists(card_path) and "classifier" not in args.stages:  # a new model: new card
        with open(card_path) as f:
            card = json.load(f)
    splits = make_splits((x_train_full, y_train_full), (x_test, y_test), cfg.splits, args.seed)
    # Times in the card are read against this machine's speed; a fast-preset run (--quick:
    # tests, smoke checks) takes a rough figure from a smaller matmul (0.1 s instead of 1.4 s
    # on a 108 GFLOP/s machine).
    peak = functools.partial(matmul_peak_flops, 1024, 2) if args.preset == "fast" \
        else matmul_peak_flops
    peak_before = peak()
    started = time.time()
    seconds = dict(card.get("stage_seconds", {}))
    seconds_before = dict(seconds)
    path = stage.find  # this run's copy of an output, else the one in OUT

    t = time.time()
    if "classifier" in args.stages:
        if cfg.classifier.init is not None:  # a mismatch answers before the training
            try:
                training.start_from(training.new_classifier(cfg, 1), cfg.classifier.init)
            except ValueError as e:
                raise UsageError(str(e)) from None
        classifier = training.train_classifier(
            cfg, x_train_full, y_train_full, strategy, log_dir, args.verbose
        )
        if cfg.classifier.init is not None:  # which weights the training started from
            card["classifier_init_source"] = _source_record(cfg.classifier.init)
        card["classifier_precision"] = training.training_precision(cfg.classifier.precision)
        classifier = training.inference_copy(classifier)
        classifier.save(stage.path("classifier.keras"))
        seconds["classifier"] = time.time() - t
        if cfg.classifier.training != "standard":  # APGD on VAL catches a masked training
            check = robust_training_check(classifier, splits.x_val, splits.y_val,
                                          cfg.classifier.adversarial_eps)
            card["classifier_val_robustness"] = check
            print(robustness_summary(check), flush=True)
    else:
        classifier = keras.models.load_model(args.classifier or path("classifier.keras"))
        try:
            check_data(classifier, (splits.x_train, splits.y_train), (splits.x_val, splits.y_val))
        except ValueError as e:
            raise UsageError(f"{args.classifier or path('classifier.keras')}: {e}") from None
    x_test, y_test = x_test[: cfg.splits.test_size], y_test[: cfg.splits.test_size]
    card["classifier_test_accuracy"] = training.accuracy(classifier, x_test, y_test)
    print(f"classifier test accuracy: {card['classifier_test_accuracy']:.4f}")

    if "dgmm" in args.stages or "vae" in args.stages:
        if "dgmm" in args.stages:
            t = time.time()
            combo = training.new_combo_vae(cfg, strategy, model_seed)
            x_dgmm, y_dgmm = training.dgmm_training_data(
                cfg.combo, (splits.x_train, splits.y_train), (x_train_full, y_train_full))
            training.train_dgmm(cfg, combo, x_dgmm, y_dgmm, log_dir, args.verbose)
            seconds["dgmm"] = time.time() - t
        else:
            # Fresh Es + decoder + D_tc on top of the saved, trained DGMM.
            saved = keras.models.load_model(path("combo_vae.keras"))
            combo = training.new_combo_vae(cfg, strategy, model_seed)
            combo.dgmm.set_weights(saved.dgmm.get_weights())
        if "vae" in args.stages:
            t = time.time()
            x_vae = training.vae_training_images(cfg.combo, splits.x_train, x_train_full)
            training.train_vae(cfg, combo, x_vae, log_dir, args.verbose, classifier)
            seconds["vae"] = time.time() - t
        combo = training.inference_copy(combo)
        combo.save(stage.path("combo_vae.keras"))
    elif "defense" in args.stages:
        combo = keras.models.load_model(args.combo_vae or path("combo_vae.keras"))
        if args.combo_vae:  # not among OUT's artifacts: the card says which file it was
            card["combo_vae_source"] = _source_record(args.combo_vae)
    else:
        combo = None
    if "dgmm" in args.stages or "vae" in args.stages:
        card.pop("combo_vae_source", None)
    if combo is not None:
        card.update(training.combo_vae_metrics(classifier, combo, x_test, y_test))
        print(f"DGMM test accuracy {card['dgmm_test_accuracy']:.4f}, reconstruction MSE "
              f"{card['recon_mse']:.4f}, label agreement {card['recon_label_agreement']:.4f}")
        card["latent_dims"] = {"shared": combo.shared_dim, "unique": combo.unique_dim}
    if "vae" in args.stages:
        means = combo.code_values(combo.shared_encoder(splits.x_train[:2000])[0]).numpy()
        low, high = np.percentile(means, 1, axis=0), np.percentile(means, 99, axis=0)
        plots.latent_traversals(combo, splits.x_cle[:3], low, high,
                                stage.path("latent_traversals.png"))
        # A quarter of VAL: 500 images of the paper's 2,000.
        card["latent_codes"] = code_activity(combo, classifier,
                                             splits.x_val[: max(1, len(splits.x_val) // 4)],
                                             low, high)
        print(f"latent codes: {card['latent_codes']['num_active']} of {combo.num_codes} "
              f"class-shared codes change the image (full-range sweep)")

    if "defense" in args.stages:
        t = time.time()
        reuse = None
        if args.reuse_val_resistance:
            if "vae" in args.stages or "dgmm" in args.stages or "classifier" in args.stages:
                raise UsageError("--reuse-val-resistance needs models trained by an earlier run "
                                 "(use it with --stages defense)")
            if not os.path.exists(path("val_resistance.npy")):
                raise UsageError(f"{path('val_resistance.npy')} not found")
            reuse = np.load(path("val_resistance.npy"))
        try:
            point, robust_eps = _operating_point(args, cfg)
            fmd, report, card["operating_point"] = calibrate_defense(
                classifier, combo, cfg.defense, splits.x_val, splits.y_val, point,
                operating_point_config(args.preset, point, robust_eps), val_resistance=reuse,
                cache_dir=args.cache, seed=args.seed,
                verbose=int(args.verbose != 0))
        except ValueError as e:
            raise UsageError(str(e)) from None
        cfg = dataclasses.replace(cfg, defense=fmd.config)  # the card records what is used
        np.save(stage.path("val_resistance.npy"), report.pop("val_resistance"))
        fmd.save(stage.path("fmd.keras"))
        seconds["defense_rethreshold" if reuse is not None else "defense"] = time.time() - t
        if reuse is None:  # a fresh calibration replaces any re-threshold of the previous one
            seconds.pop("defense_rethreshold", None)
        # Members of an ensemble are served through OUT/serving_ensemble, not on their own.
        card["serving_export"] = (stage.final(export_after_training(fmd, stage.dir))
                                  if args.member_index == 0 else None)
        card["calibration"] = report
        print(f"calibrated on {report['num_val']} VAL images: operating point "
              f"{card['operating_point']['options']}, theta_r {report['theta_r']}, theta_d "
              f"{report['theta_d']:.4f}, VAL FPR {report['val_false_positive_rate']:.4f}")
        if "budget" in card["operating_point"]:
            print(f"morph budget: {card['operating_point']['budget']['options'] or 'full'}")

    if "ensemble" in args.stages:
        t = time.time()
        card["ensemble"] = _train_ensemble(args, stage, classifier_path=args.classifier
                                           or os.path.join(args.out, "classifier.keras"))
        seconds["ensemble"] = time.time() - t

    command = "python scripts/train.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    runs = list(card.get("runs", []))
    runs.append({"command": command, "stages": args.stages,
                 "stage_seconds": {k: v for k, v in seconds.items()
                                   if seconds_before.get(k) != v},
                 "matmul_peak_flops": {"before": peak_before, "after": peak()},
                 "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    card.update(
        runs=runs,
        dataset=args.dataset,
        seed=args.seed,
        member_index=args.member_index,
        classifier_path=args.classifier or os.path.join(args.out, "classifier.keras"),
        command=command,
        stages_run=args.stages,
        quick=args.preset == "fast",
        preset=args.preset,
        data=args.data,
        strategy=args.strategy,
        num_replicas=strategy.num_replicas_in_sync,
        stage_seconds=seconds,
        training_seconds=sum(seconds.values()),
        last_run_seconds=time.time() - started,
        hyperparameters=training.card_hyperparameters(to_dict(cfg), card.get("hyperparameters"),
                                                      args.stages),
        splits={"train": len(splits.x_train), "val": len(splits.x_val), "cle": len(splits.x_cle),
                "test_figures": len(x_test),
                "source": "TRAIN from the official training set; VAL, CLE from the test set; "
                          "the test figures from the first test_figures test images"},
    )
    # SHA-256 of what the card describes: this run's files, the earlier records of the others
    # (files a card written before checksums existed does not record: as they are now).
    written = artifact_records(stage.dir, model_artifacts(stage.dir))
    recorded = card.get("artifacts", {})
    unrecorded = [n for n in model_artifacts(args.out) if n not in written and n not in recorded]
    card["artifacts"] = {**recorded, **artifact_records(args.out, unrecorded), **written}
    write_json(stage.path("model_card.json"), card, sort_keys=True)
    stage.commit(last="model_card.json")
    print(f"wrote {args.out}: training_seconds {card['training_seconds']:.0f}")
    return card


def _member_args(args, index, reference) -> argparse.Namespace:
    """Arguments of ensemble member `index`: member 0's (`reference`) operating point."""
    member = argparse.Namespace(**vars(args))
    member.operating_point = "config"
    from fmd_tf.operating_point import POINT_KEYS

    for key in POINT_KEYS + ("purify_label",):
        setattr(member, key, getattr(reference, key))
    member.out = os.path.join(args.out, "members", str(index))
    member.member_index = index
    member.stages = list(MEMBER_STAGES)
    member.ensemble, member.reuse_val_resistance = 1, False
    return member


def _train_ensemble(args, stage, classifier_path) -> dict:
    """Members 1..K-1 (trained, or reused when present) + OUT/fmd_ensemble.keras."""
    import keras

    from fmd_tf.config import DefenseConfig
    from fmd_tf.defense import FMDefenseEnsemble
    from fmd_tf.export import export_serving
    from fmd_tf.options import member_shared_fields

    members, reused = [keras.models.load_model(stage.find("fmd.keras"))], []
    for index in range(1, args.ensemble):
        margs = _member_args(args, index, members[0])
        margs.classifier = classifier_path
        existing = os.path.join(margs.out, "fmd.keras")
        if os.path.exists(existing) and not args.overwrite:
            reused.append(index)
        else:
            print(f"--- ensemble member {index} -> {margs.out}", flush=True)
            run(margs)
        members.append(keras.models.load_model(existing))
    for index, member in enumerate(members[1:], start=1):
        config, reference = member.get_config(), members[0].get_config()
        differ = [k for k in member_shared_fields(DefenseConfig) if config[k] != reference[k]]
        if differ:
            raise UsageError(f"ensemble member {index} ({args.out}/members/{index}) was "
                             f"calibrated with other {', '.join(differ)} than member 0; "
                             "retrain it with --overwrite")
    try:
        ensemble = FMDefenseEnsemble(members, selection_key=args.ensemble_key, name="fmd_ensemble")
    except ValueError as e:
        raise UsageError(f"cannot assemble the ensemble: {e}") from None
    ensemble.save(stage.path("fmd_ensemble.keras"))
    serving = stage.final(export_serving(ensemble, stage.path("serving_ensemble"), version=1,
                                         overwrite=True))
    cards = []
    for index in range(1, args.ensemble):
        with open(os.path.join(args.out, "members", str(index), "model_card.json")) as f:
            member_card = json.load(f)
        cards.append({k: member_card.get(k) for k in (
            "command", "dgmm_test_accuracy", "recon_mse", "recon_label_agreement",
            "stage_seconds")} | {"theta_r": member_card["calibration"]["theta_r"],
                                 "theta_e": member_card["calibration"]["theta_e"]})
    print(f"ensemble of {args.ensemble} members -> {args.out}/fmd_ensemble.keras "
          f"(reused members {reused or 'none'})")
    return {"num_members": args.ensemble, "selection_key": list(args.ensemble_key),
            "members": ["fmd.keras"] + [f"members/{i}/fmd.keras" for i in range(1, args.ensemble)],
            "reused_members": reused, "member_cards": cards, "serving_export": serving}


if __name__ == "__main__":
    sys.exit(run_cli(run, parse_args))
