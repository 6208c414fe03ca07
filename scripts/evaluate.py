"""Reproduce the paper's evaluation (§IV: Table II, Fig. 1, 4, 5, 6) on the shipped model.

    python scripts/evaluate.py --dataset fmnist --model saved_models/fmnist \
        --attacks fgsm,pgd,cw,deepfool --n 1000 [--seed 0] [--out results/fmnist]
        [--cache results/cache] [--no-baselines]

Security evaluation (adaptive white-box attacks on the whole defense, one run per budget):

    python scripts/evaluate.py --attacks adaptive_pgd,adaptive_resistance,cw_hiconf \
        --linf-eps 0.05,0.1,0.3 --l2-eps 1.5,3.0 --n 500 --out results/fmnist_adaptive

The randomized ensemble (`scripts/train.py --ensemble 3`), attacked with EOT over its members:

    python scripts/evaluate.py --defense fmd_ensemble.keras --attacks adaptive_pgd \
        --linf-eps 0.1 --n 500 --no-baselines --out results/fmnist_ensemble

Writes OUT/report.json, OUT/report.md and PNG figures. Adversarial sets are cached in --cache
(keyed by attack, parameters, images and classifier fingerprint). Baselines (MagNet, Feature
Squeezing) are loaded from MODEL/baselines (train them with scripts/train_baselines.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


class UsageError(Exception):
    """Printed without a traceback; exit status 2."""


def parse_args(argv):
    from fmd_tf.evaluation.harness import ATTACKS, BUDGETED, expand_budgets

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--model", default="saved_models/fmnist")
    p.add_argument("--defense", default="fmd.keras",
                   help="defense file in --model: fmd.keras, or fmd_ensemble.keras for the "
                        "randomized ensemble (scripts/train.py --ensemble K)")
    p.add_argument("--attack-defense", default=None,
                   help="defense file in --model that the defense-aware attacks attack "
                        "(default: --defense); e.g. fmd.keras with --defense "
                        "fmd_ensemble.keras measures transfer from one member")
    p.add_argument("--attacks", default="fgsm,pgd,cw,deepfool")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default results/DATASET")
    p.add_argument("--cache", default="results/cache")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--linf-eps", default="", help="comma-separated L-inf budgets for "
                   + ", ".join(BUDGETED) + " (one run each)")
    p.add_argument("--l2-eps", default="", help="comma-separated L2 budgets, as --linf-eps")
    args = p.parse_args(argv)
    args.attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = [a for a in args.attacks if a not in ATTACKS]
    if unknown or not args.attacks:
        raise UsageError(f"--attacks: unknown {unknown}; known: {', '.join(ATTACKS)}")
    for flag in ("linf_eps", "l2_eps"):
        raw, option = getattr(args, flag), "--" + flag.replace("_", "-")
        try:
            values = [float(v) for v in raw.split(",") if v.strip()]
        except ValueError:
            raise UsageError(f"{option}: not a list of numbers: {raw!r}") from None
        if any(not v > 0 for v in values):
            raise UsageError(f"{option}: budgets must be > 0, got {raw!r}")
        setattr(args, flag, values)
    args.runs = expand_budgets(args.attacks, args.linf_eps, args.l2_eps)
    if args.n < 2:
        raise UsageError(f"--n must be >= 2, got {args.n}")
    if not os.path.isfile(os.path.join(args.model, args.defense)):
        hint = " --ensemble 3" if "ensemble" in args.defense else ""
        raise UsageError(f"{os.path.join(args.model, args.defense)} not found; run "
                         f"`python scripts/train.py --dataset fmnist{hint}` or pass --model")
    args.attack_defense = args.attack_defense or args.defense
    if not os.path.isfile(os.path.join(args.model, args.attack_defense)):
        raise UsageError(f"--attack-defense: {os.path.join(args.model, args.attack_defense)} "
                         "not found")
    args.out = args.out or os.path.join("results", args.dataset)
    return args


def _run_fm(fmd, x, batch_size):
    from fmd_tf.evaluation.harness import fm_scores, purified_labels

    out = fmd.defend(x, batch_size=batch_size)
    out["purified_label"] = purified_labels(fmd, x)
    out["score"] = fm_scores(out, _thresholds(fmd, out))
    return out


def _thresholds(fmd, out):
    """θr [m], or [n, m] for an ensemble (each row's member)."""
    if hasattr(fmd, "theta_r_rows"):
        return fmd.theta_r_rows(out["member"])
    return fmd.theta_r.numpy()


def _load_baselines(model_dir, classifier):
    base = os.path.join(model_dir, "baselines")
    loaded, notes = {}, []
    try:
        from fmd_tf.baselines import FeatureSqueezing, MagNet
    except ImportError as e:  # pragma: no cover
        return loaded, [f"baselines unavailable: {e}"]
    magnet_dir = os.path.join(base, "magnet")
    fs_path = os.path.join(base, "feature_squeezing.json")
    if os.path.isdir(magnet_dir):
        loaded["magnet"] = MagNet.load(magnet_dir, classifier)
    else:
        notes.append(f"MagNet not found in {magnet_dir} (run scripts/train_baselines.py)")
    if os.path.isfile(fs_path):
        loaded["feature_squeezing"] = FeatureSqueezing.load(fs_path, classifier)
    else:
        notes.append(f"Feature Squeezing not found at {fs_path} (run scripts/train_baselines.py)")
    return loaded, notes


def _eta_curves(fmd, r_val, clean, adv, y, etas):
    theta_e = float(fmd.theta_e.numpy())
    from fmd_tf.defense import calibration
    from fmd_tf.evaluation import harness, metrics

    theta_r = fmd.theta_r.numpy()
    curve = {"eta": list(etas), "adversarial_recall": [], "clean_recall": [],
             "paper_final_accuracy": []}
    for eta in etas:
        theta_d, _ = calibration.distance_threshold(
            r_val, theta_r, eta, fmd.threshold_mode, fmd.num_morphs, fmd.min_suspicious,
            fmd.eta_reference_rho)
        c = {**clean, **harness.reverdict(clean, theta_r, theta_d, theta_e)}
        a = {**adv, **harness.reverdict(adv, theta_r, theta_d, theta_e)}
        curve["adversarial_recall"].append(metrics.purification_recall(a["label"], a["verdict"], y))
        curve["clean_recall"].append(metrics.purification_recall(c["label"], c["verdict"], y))
        curve["paper_final_accuracy"].append(metrics.paper_final_accuracy(c, a, y, y))
    return curve


def _trained_split_sizes(model_dir):
    """`config.card_split_config` of the model; a malformed card is a usage error."""
    from fmd_tf.config import card_split_config

    try:
        return card_split_config(model_dir)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _operating_points(fmd, r_val, e_val, clean, adv_out, y, val_out=None, y_val=None):
    """Defended accuracies if the thresholds were calibrated at other ρ / modes / reconstruction
    gate budgets (same VAL). With `val_out` (`harness.val_outputs`) each row also gives the
    clean VAL defended accuracy, i.e. what an operating point chosen on VAL alone would see."""
    import itertools

    import numpy as np

    from fmd_tf.evaluation import harness, metrics

    rows = []
    grid = list(itertools.product(("per_code", "unified"), (0.999, 0.99, 0.95, 0.9, 0.8),
                                  (0.0, 0.01, 0.05)))
    val_rows = (harness.val_operating_points(fmd, val_out, y_val, grid) if val_out is not None
                else [{} for _ in grid])
    for (mode, rho, recon_fpr), val_row in zip(grid, val_rows, strict=True):
        theta_r, theta_d, theta_e = harness.operating_point_thresholds(
            fmd, r_val, e_val, mode, rho, recon_fpr)
        c = harness.reverdict(clean, theta_r, theta_d, theta_e)
        row = {"threshold_mode": mode, "rho": rho, "recon_fpr": recon_fpr,
               "theta_d": theta_d,
               "clean_defended_accuracy": metrics.defended_accuracy(
                   c["label"], c["verdict"], y, False),
               "clean_flagged": float(np.mean(c["verdict"] != 0))}
        for key in ("val_clean_defended_accuracy", "val_clean_flagged"):
            if key in val_row:
                row[key] = val_row[key]
        for name, out in adv_out.items():
            a = harness.reverdict(out, theta_r, theta_d, theta_e)
            row[f"{name}_defended_accuracy"] = metrics.defended_accuracy(
                a["label"], a["verdict"], y, True)
        rows.append(row)
    return rows


def _markdown(report) -> str:
    from fmd_tf.evaluation.harness import PAPER_TABLE_II_MNIST

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    lines = [
        f"# FM-Defense evaluation: {report['dataset']}, n = {report['n']}",
        "",
        f"Model `{report['model']}`, defense `{report.get('defense', 'fmd.keras')}` "
        f"(defense-aware attacks target `{report.get('attack_defense', 'fmd.keras')}`); "
        f"command: `{report['command']}`; {report['seconds']:.0f} s. Purified inputs get the "
        f"`{report.get('purify_label', 'reconstruction')}` label (`FMDefense.purify_label`).",
        "",
        "## Clean",
        "",
        "| classifier accuracy | defended accuracy | rejected | purified |",
        "|---|---|---|---|",
        "| {} | {} | {} | {} |".format(*(pct(report["clean"][k]) for k in (
            "classifier_accuracy", "defended_accuracy", "rejected_rate", "purified_rate"))),
        "",
        "## Table II: accuracy (%) under attack",
        "",
        "Defended accuracy: an adversarial input counts if rejected or its final label is right. "
        "Paper columns are the paper's MNIST numbers (it reports no Fashion-MNIST table).",
        "",
        "| attack | no defense | FM-Defense | MagNet | Feature Squeezing | paper MNIST: no "
        "defense / FM-Defense / MagNet |",
        "|---|---|---|---|---|---|",
    ]
    paper_attacks = {k: v for k, v in report["attacks"].items() if not k.startswith("adaptive")}
    adaptive = {k: v for k, v in report["attacks"].items() if k.startswith("adaptive")}
    for name, a in paper_attacks.items():
        paper = PAPER_TABLE_II_MNIST.get(name, {})
        paper_s = " / ".join("n/a" if paper.get(k) is None else f"{paper[k]}"
                             for k in ("no_defense", "fm_defense", "magnet")) if paper else "n/a"
        cols = [pct(a["undefended_accuracy"])]
        for d in ("fm_defense", "magnet", "feature_squeezing"):
            cols.append(pct(a[d]["defended_accuracy"]) if d in a else "n/a")
        lines.append(f"| {name} | " + " | ".join(cols) + f" | {paper_s} |")
    if adaptive:
        lines += ["", "## Security evaluation: adaptive attacks", "",
                  "White-box attacks on the whole defense (fmd_tf.attacks.adaptive). Defended "
                  "accuracy: rejected or final label right. MagNet / Feature Squeezing: first "
                  "the same examples (crafted against FM-Defense, transferred), then, for "
                  "adaptive_pgd, PGD adapted to that baseline at the same budget "
                  "(fmd_tf.attacks.adaptive_detector_pgd).", "",
                  "| attack | norm | ε | no defense | FM-Defense | verdicts (pass/purify/reject) "
                  "| MagNet (transfer / adaptive) | Feature Squeezing (transfer / adaptive) |",
                  "|---|---|---|---|---|---|---|---|"]
        for a in adaptive.values():
            fm = a["fm_defense"]
            cols = [" / ".join(pct(a[k]["defended_accuracy"]) if k in a else "n/a"
                               for k in (d, f"{d}_adaptive"))
                    for d in ("magnet", "feature_squeezing")]
            lines.append(f"| {a['method']} | {a['params'].get('norm', 'l2')} | "
                         f"{a['params'].get('eps', 'none')} | {pct(a['undefended_accuracy'])} | "
                         f"{pct(fm['defended_accuracy'])} | "
                         f"{'/'.join(str(c) for c in fm['verdict_counts'])} | "
                         + " | ".join(cols) + " |")
    lines += ["", "## Detection", "",
              "| attack | defense | TPR | FPR (clean) | AUC | purification recall | "
              "paper final accuracy |", "|---|---|---|---|---|---|---|"]
    for name, a in report["attacks"].items():
        for d in ("fm_defense", "magnet", "feature_squeezing"):
            if d in a:
                m = a[d]
                lines.append(f"| {name} | {d} | {pct(m['detection_tpr'])} | "
                             f"{pct(m['detection_fpr'])} | {m['auc']:.4f} | "
                             f"{pct(m['purification_recall'])} | "
                             f"{pct(m['paper_final_accuracy'])} |")
    lines += ["", "Attack success rate (share of clean-correct images misclassified) and "
              "generation time:", ""]
    for name, a in report["attacks"].items():
        lines.append(f"- {name} {json.dumps(a['params'])}: success "
                     f"{pct(a['attack_success_rate'])} %, {a['attack_seconds']:.0f} s"
                     + (" (cached)" if a.get("attack_cached") else ""))
    ops = report.get("operating_points")
    if ops:
        attacks = list(paper_attacks)
        lines += ["", "## Operating points (same VAL resistances, thresholds re-calibrated)", "",
                  "Reconstruction gate budget 0 is the paper's rule. VAL columns: the clean "
                  "VAL images the thresholds are calibrated on.", "",
                  "| mode | ρ | recon gate budget | θd | VAL clean flagged | VAL clean defended | "
                  "clean flagged | clean defended | "
                  + " | ".join(f"{a} defended" for a in attacks) + " |",
                  "|---|---|---|---|---|---|---|---|" + "---|" * len(attacks)]
        for r in ops:
            lines.append(f"| {r['threshold_mode']} | {r['rho']} | {r['recon_fpr']} | "
                         f"{r['theta_d']:.3f} | {pct(r.get('val_clean_flagged'))} | "
                         f"{pct(r.get('val_clean_defended_accuracy'))} | "
                         f"{pct(r['clean_flagged'])} | {pct(r['clean_defended_accuracy'])} | "
                         + " | ".join(pct(r[f"{a}_defended_accuracy"]) for a in attacks) + " |")
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", "Figures: " + ", ".join(f"`{f}`" for f in report["figures"]), ""]
    return "\n".join(lines)


def run(args) -> dict:
    import keras
    import numpy as np

    import fmd_tf  # noqa: F401
    from fmd_tf.attacks import adaptive_detector_pgd
    from fmd_tf.data import paper_splits
    from fmd_tf.evaluation import figures, harness

    started = time.time()
    os.makedirs(args.out, exist_ok=True)
    fmd = keras.models.load_model(os.path.join(args.model, args.defense))
    target = fmd if args.attack_defense == args.defense else keras.models.load_model(
        os.path.join(args.model, args.attack_defense))
    splits = paper_splits(args.dataset, args.seed, _trained_split_sizes(args.model))
    if args.n > len(splits.x_cle):
        raise UsageError(f"--n {args.n} > {len(splits.x_cle)} CLE images")
    x, y = splits.x_cle[: args.n], splits.y_cle[: args.n]
    baselines, notes = ({}, ["baselines skipped (--no-baselines)"]) if args.no_baselines \
        else _load_baselines(args.model, fmd.classifier)
    steps = 1 + len(args.runs)
    bar = keras.utils.Progbar(steps, stateful_metrics=["stage"], unit_name="set")
    print(f"evaluating {args.model} on {args.n} CLE images: clean + "
          f"{', '.join(name for name, _, _ in args.runs)}")
    clean = _run_fm(fmd, x, args.batch_size)
    clean_base = {name: b.defend(x) for name, b in baselines.items()}
    bar.update(1)
    report = {"dataset": args.dataset, "n": args.n, "model": args.model,
              "defense": args.defense, "attack_defense": args.attack_defense,
              "purify_label": (fmd.members[0] if hasattr(fmd, "members") else fmd).purify_label,
              "seed": args.seed,
              "command": "python scripts/evaluate.py " + " ".join(sys.argv[1:]),
              "clean": harness.clean_metrics(clean, y), "attacks": {}, "notes": notes}
    for name, b in clean_base.items():
        report["clean"][name] = harness.clean_metrics(b, y)
    classifier_correct = clean["classifier_label"] == y
    r_val_path = os.path.join(args.model, "val_resistance.npy")
    r_val = np.load(r_val_path) if os.path.exists(r_val_path) else None
    if r_val is not None and len(r_val) != len(splits.x_val):
        notes.append(f"{r_val_path} has {len(r_val)} rows but VAL has {len(splits.x_val)} "
                     "images: no ρ / η figures or operating points")
        r_val = None
    if hasattr(fmd, "members"):  # each member has its own θr: the single-θr analyses do not apply
        r_val = None
        notes.append(f"{args.defense}: ensemble of {fmd.num_members} members, one per image "
                     "(key + input); no ρ / η figures or operating points (per-member θr)")
    adv_out, eta_curves, grid_rows, roc = {}, {}, {"clean": (x, clean["purified"])}, {}
    for k, (attack, method, overrides) in enumerate(args.runs):
        x_adv, info = harness.adversarial_set(method, fmd.classifier, x, y, args.cache, args.seed,
                                              params=overrides, defense=target)
        adv = _run_fm(fmd, x_adv, args.batch_size)
        adv_out[attack] = adv
        entry = {
            "method": method,
            "params": info["params"],
            "attack_seconds": info["seconds"],
            "attack_cached": info["cached"],
            "attack_success_rate": float(np.mean(adv["classifier_label"][classifier_correct]
                                                 != y[classifier_correct])),
            "undefended_accuracy": float(np.mean(adv["classifier_label"] == y)),
            "linf_median": float(np.median(np.abs(x_adv - x).reshape(len(x), -1).max(1))),
            "l2_median": float(np.median(np.linalg.norm((x_adv - x).reshape(len(x), -1), axis=1))),
            "fm_defense": harness.defense_metrics(clean, adv, y, y),
        }
        roc[attack] = {"FM-Defense": (clean["score"], adv["score"])}
        for bname, b in baselines.items():
            bout = b.defend(x_adv)
            entry[bname] = harness.defense_metrics(clean_base[bname], bout, y, y)
            roc[attack][bname] = (clean_base[bname]["score"], bout["score"])
            if method == "adaptive_pgd":  # the same budget, adapted to this baseline
                x_b = adaptive_detector_pgd(b, x, y, eps=info["params"]["eps"],
                                            norm=info["params"]["norm"],
                                            nb_iter=info["params"]["nb_iter"], seed=args.seed)
                entry[f"{bname}_adaptive"] = harness.defense_metrics(
                    clean_base[bname], b.defend(x_b), y, y)
        report["attacks"][attack] = entry
        bar.update(k + 2)
        if attack.startswith("adaptive"):  # the paper's figures cover the paper's attacks
            continue
        grid_rows[attack] = (x_adv, adv["purified"])
        if r_val is not None:
            eta_curves[attack] = _eta_curves(fmd, r_val, clean, adv, y,
                                             [0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
    report["attacks_eta_curves"] = eta_curves
    paper_out = {a: o for a, o in adv_out.items() if not a.startswith("adaptive")}
    fig = lambda name: os.path.join(args.out, name)  # noqa: E731
    figures.resistance_histograms(
        {"clean": clean["resistance"].mean(1),
         **{a: o["resistance"].mean(1) for a, o in adv_out.items()}}, fig("fig1_resistance.png"))
    names = ["fig1_resistance.png"]
    if paper_out:  # the paper's figures need at least one of the paper's attacks
        figures.detection_vs_unified_threshold(
            clean["resistance"], {a: o["resistance"] for a, o in paper_out.items()},
            fig("fig4_detection_vs_threshold.png"))
        names.append("fig4_detection_vs_threshold.png")
        if r_val is not None:
            figures.detection_vs_rho(r_val, clean["resistance"],
                                     {a: o["resistance"] for a, o in paper_out.items()},
                                     fmd.num_morphs, fmd.threshold_mode,
                                     fig("fig4_detection_vs_rho.png"))
            figures.purification_vs_eta(eta_curves, fig("fig5_purification_vs_eta.png"))
            names += ["fig4_detection_vs_rho.png", "fig5_purification_vs_eta.png"]
            e_val = fmd.reconstruction_error(splits.x_val)
            val_out = harness.val_outputs(fmd, splits.x_val, r_val, e_val)
            report["operating_points"] = _operating_points(fmd, r_val, e_val, clean, paper_out,
                                                           y, val_out, splits.y_val)
        elif not hasattr(fmd, "members"):
            notes.append(f"{r_val_path} missing: no ρ / η figures")
        figures.purified_grid(grid_rows, fig("fig6_purified.png"))
        figures.roc_curves({a: r for a, r in roc.items() if a in paper_out}, fig("roc.png"))
        names += ["fig6_purified.png", "roc.png"]
    report["figures"] = names
    report["seconds"] = time.time() - started
    with open(fig("report.json.tmp"), "w") as f:
        json.dump(report, f, indent=2)
    os.replace(fig("report.json.tmp"), fig("report.json"))
    with open(fig("report.md"), "w") as f:
        f.write(_markdown(report))
    print(_markdown(report))
    return report


def main(argv=None) -> int:
    try:
        run(parse_args(argv))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001
        from fmd_tf.data import DataNotAvailableError

        if isinstance(e, DataNotAvailableError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
