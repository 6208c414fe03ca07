"""The evaluation report of a trained FM-Defense (paper §IV: Table II, Fig. 1, 4, 5, 6).

    from fmd_tf.evaluation.report import evaluate, render_markdown
    report = evaluate("saved_models/fmnist", attacks=["fgsm", "pgd"], n=1000,
                      out_dir="results/fmnist", cache_dir="results/cache")
    print(render_markdown(report))

`evaluate` attacks the first `n` CLE images (classifier attacks, or the adaptive white-box
attacks on the whole defense, one run per budget), runs FM-Defense and the baselines (MagNet,
Feature Squeezing, from MODEL/baselines) on the clean and adversarial sets and returns the
report dict; with `out_dir` it also writes OUT/report.json, OUT/report.md and the PNG figures.
The pieces are callable alone: `eta_curve` (Fig. 5), `operating_point_rows` (the report's
operating-point table), `render_markdown` and `write_report`. `scripts/evaluate.py` is the
command line.
"""

from __future__ import annotations

import itertools
import json
import os
import time

import numpy as np

from fmd_tf.files import write_json, write_text
from fmd_tf.loading import load_defense

__all__ = [
    "ETAS", "OPERATING_POINT_GRID", "REPORT_FILES", "eta_curve", "evaluate", "model_splits",
    "operating_point_rows", "render_markdown", "results_table", "write_report",
]

ETAS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)  # Fig. 5
# (threshold mode, ρ, reconstruction-gate budget) of the report's operating-point table.
OPERATING_POINT_GRID = tuple(itertools.product(
    ("per_code", "unified"), (0.999, 0.99, 0.95, 0.9, 0.8), (0.0, 0.01, 0.05)))
# report keys, in table order
DEFENSES = ("fm_defense", "magnet", "feature_squeezing", "defense_gan")
REPORT_FILES = ("report.json", "report.md")


def model_splits(model_dir: str, dataset: str = "fmnist", seed: int = 0, n: int | None = None):
    """`fmd_tf.data.paper_splits` at the split sizes the model in `model_dir` was trained with
    (its model card, `fmd_tf.config.card_split_config`). ValueError for a malformed card,
    fewer than `n` CLE images, or a `seed` other than the one of the splits the model was
    calibrated on (the card's `seed`): other splits' CLE images overlap its VAL images."""
    from fmd_tf.config import card_split_config, card_split_seed
    from fmd_tf.data import paper_splits

    calibrated = card_split_seed(model_dir)
    if calibrated is not None and calibrated != seed:
        raise ValueError(
            f"{model_dir} was calibrated on the VAL images of the splits of seed {calibrated}; "
            f"the CLE images of seed {seed} overlap them: use --seed {calibrated}")
    return _enough_cle(paper_splits(dataset, seed, card_split_config(model_dir)), n)


def _enough_cle(splits, n: int | None):
    if n is not None and n > len(splits.x_cle):
        raise ValueError(f"--n {n} > {len(splits.x_cle)} CLE images")
    return splits


def _run_fm(fmd, x, batch_size, verbose=0, cache_dir=None):
    """`fmd.defend(x)` with the purifier's labels and the continuous detection score; the
    defense pass is read from `cache_dir` when stored there (`harness.defense_outputs`)."""
    from fmd_tf.evaluation.harness import (
        defense_fingerprint,
        defense_outputs,
        fm_scores,
        purified_labels,
    )

    def run(images):
        out = fmd.defend(images, batch_size=batch_size, verbose=verbose)
        out["purified_label"] = purified_labels(fmd, images)
        out["margin"] = fmd.logit_margins(images)
        return out

    out, _ = defense_outputs("fm_defense", f"{defense_fingerprint(fmd)} batch {batch_size}",
                             run, x, cache_dir)
    out["score"] = fm_scores(out, _thresholds(fmd, out))
    return out


def _thresholds(fmd, out):
    """θr [m], or [n, m] for an ensemble (each row's member)."""
    if hasattr(fmd, "theta_r_rows"):
        return fmd.theta_r_rows(out["member"])
    return np.asarray(fmd.theta_r)


def eta_curve(fmd, r_val, clean: dict, adv: dict, y, etas=ETAS) -> dict:
    """Fig. 5: purification recall (clean and adversarial) and the paper's final accuracy when
    θd is re-calibrated at each η of `etas` on the VAL resistances `r_val` [n_val, m] (θr, θe
    and the morphs stay `fmd`'s).

    `clean`, `adv`: stored outputs on the clean images and their adversarial versions (true
    labels `y`) with `resistance`, `classifier_label`, `purified_label` (and `recon_error` when
    θe is finite, `margin` when θm is). `fmd` needs only `theta_r`, `theta_e`, `theta_m`,
    `threshold_mode`, `num_morphs`,
    `min_suspicious` and `eta_reference_rho`. Recalls are None where nothing is purified.
    """
    from fmd_tf.defense import calibration
    from fmd_tf.evaluation import harness, metrics

    theta_r, theta_e = np.asarray(fmd.theta_r), float(np.asarray(fmd.theta_e))
    theta_m = float(np.asarray(fmd.theta_m))
    curve = {"eta": list(etas), "adversarial_recall": [], "clean_recall": [],
             "paper_final_accuracy": []}
    for eta in etas:
        theta_d, _ = calibration.distance_threshold(
            r_val, theta_r, eta, fmd.threshold_mode, fmd.num_morphs, fmd.min_suspicious,
            fmd.eta_reference_rho)
        c = {**clean, **harness.reverdict(clean, theta_r, theta_d, theta_e, theta_m)}
        a = {**adv, **harness.reverdict(adv, theta_r, theta_d, theta_e, theta_m)}
        curve["adversarial_recall"].append(metrics.purification_recall(a["label"], a["verdict"], y))
        curve["clean_recall"].append(metrics.purification_recall(c["label"], c["verdict"], y))
        curve["paper_final_accuracy"].append(metrics.paper_final_accuracy(c, a, y, y))
    return curve


def operating_point_rows(fmd, r_val, e_val, clean: dict, adv_out: dict, y, val_out=None,
                         y_val=None, grid=OPERATING_POINT_GRID) -> list[dict]:
    """Defended accuracies if the thresholds were calibrated at the other (mode, ρ,
    reconstruction-gate budget) of `grid` (and at the model's own, appended when missing) on
    the same VAL resistances `r_val` and errors `e_val`: on the clean images (`clean`, labels
    `y`) and each attack of `adv_out` {name: stored outputs}. With `val_out`
    (`harness.val_outputs`, labels `y_val`) each row also gives the clean VAL defended
    accuracy, i.e. what an operating point chosen on VAL alone would see. The
    classifier-margin gate stays the model's own (θm)."""
    from fmd_tf.evaluation import harness, metrics

    grid = list(grid)
    own = (fmd.threshold_mode, fmd.rho, fmd.recon_fpr)  # the model's own point is always a row
    theta_m = float(np.asarray(fmd.theta_m))
    if own not in grid:
        grid.append(own)
    val_rows = (harness.val_operating_points(fmd, val_out, y_val, grid) if val_out is not None
                else [{} for _ in grid])
    rows = []
    for (mode, rho, recon_fpr), val_row in zip(grid, val_rows, strict=True):
        theta_r, theta_d, theta_e = harness.operating_point_thresholds(
            fmd, r_val, e_val, mode, rho, recon_fpr)
        c = harness.reverdict(clean, theta_r, theta_d, theta_e, theta_m)
        row = {"threshold_mode": mode, "rho": rho, "recon_fpr": recon_fpr,
               "theta_d": harness.theta_d_entry(theta_d),
               "clean_defended_accuracy": metrics.defended_accuracy(
                   c["label"], c["verdict"], y, False),
               "clean_flagged": float(np.mean(c["verdict"] != 0))}
        for key in ("val_clean_defended_accuracy", "val_clean_flagged"):
            if key in val_row:
                row[key] = val_row[key]
        for name, out in adv_out.items():
            a = harness.reverdict(out, theta_r, theta_d, theta_e, theta_m)
            row[f"{name}_defended_accuracy"] = metrics.defended_accuracy(
                a["label"], a["verdict"], y, True)
        rows.append(row)
    return rows


def _check_runs(attacks, linf_eps, l2_eps, n):
    """[(report name, attack, overrides)] of `harness.expand_budgets`; ValueError for bad input."""
    from fmd_tf.evaluation.harness import expand_budgets

    if not list(attacks):
        raise ValueError("no attacks given")
    if any(not float(e) > 0 for e in (*linf_eps, *l2_eps)):
        raise ValueError(f"budgets must be > 0, got {list(linf_eps)} / {list(l2_eps)}")
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    return expand_budgets(attacks, linf_eps, l2_eps)


class DefenseOptionError(ValueError):
    """`evaluate(defense_options=)` given for a defense that cannot take them (an ensemble)."""


def _with_options(fmd, options):
    """`fmd` with the DefenseConfig `options` (none: itself); DefenseOptionError for an
    ensemble."""
    if not options:
        return fmd
    if not hasattr(fmd, "copy_with"):
        raise DefenseOptionError(f"{', '.join(options)}: an ensemble is evaluated with its "
                                 "members' own options (train it with them)")
    return fmd.copy_with(**options)


def _attack_entry(method, info, x, x_adv, y, clean, adv) -> dict:
    """The report entry of one adversarial set (FM-Defense only; baselines are added)."""
    from fmd_tf.evaluation import harness

    correct = clean["classifier_label"] == y
    diff = (x_adv - x).reshape(len(x), -1)
    entry = {
        "method": method,
        "params": info["params"],
        "attack_seconds": info["seconds"],
        "attack_cached": info["cached"],
        "attack_success_rate": float(np.mean(adv["classifier_label"][correct] != y[correct])),
        "undefended_accuracy": float(np.mean(adv["classifier_label"] == y)),
        "linf_median": float(np.median(np.abs(diff).max(1))),
        "l2_median": float(np.median(np.linalg.norm(diff, axis=1))),
        "fm_defense": harness.defense_metrics(clean, adv, y, y),
    }
    if "record" in info:  # a query-based attack: what it spent, and what it saw succeed
        queries = np.asarray(info["record"]["queries"])
        entry["queries"] = {"budget": info["params"].get("max_queries"),
                            "mean": float(queries.mean()), "median": float(np.median(queries)),
                            "max": int(queries.max())}
        entry["query_success_rate"] = float(np.mean(info["record"]["success"]))
        if "monitor_flagged" in info["record"]:  # behind a query monitor: what it rejected
            flagged = np.asarray(info["record"]["monitor_flagged"])
            entry["monitor"] = {"flagged_share": float(flagged.sum() / max(queries.sum(), 1)),
                                "images_flagged": float(np.mean(flagged > 0))}
        if "corner" in info["record"]:  # api_corners: which corner fooled how many images
            corner = np.asarray(info["record"]["corner"])
            entry["corner_hits"] = {"plus_eps": int(np.sum(corner == 0)),
                                    "minus_eps": int(np.sum(corner == 1)),
                                    "random_signs": int(np.sum(corner >= 2))}
    return entry


def _load_val_resistance(model_dir, fmd, defense, num_val, notes):
    """MODEL/val_resistance.npy when the single-θr analyses apply to it, else None (a note
    says why, except for a missing file: see `evaluate`)."""
    path = os.path.join(model_dir, "val_resistance.npy")
    r_val = np.load(path) if os.path.exists(path) else None
    if r_val is not None and len(r_val) != num_val:
        notes.append(f"{path} has {len(r_val)} rows but VAL has {num_val} "
                     "images: no ρ / η figures or operating points")
        r_val = None
    if hasattr(fmd, "members"):  # each member has its own θr: the single-θr analyses do not apply
        r_val = None
        notes.append(f"{defense}: ensemble of {fmd.num_members} members, one per image "
                     "(key + input); no ρ / η figures or operating points (per-member θr)")
    return r_val, path


def _calibration(model_dir, loaded) -> dict:
    """The clean VAL false-positive rate each defense was calibrated at (FM-Defense: its model
    card's, with the attacks its operating point was chosen with; baselines: their own
    reports), for the report's fairness line and held-out marks."""
    from fmd_tf.evaluation.baselines import fm_defense_point

    point = fm_defense_point(model_dir)
    out = {"fm_defense": {"val_false_positive_rate": point["val_false_positive_rate"],
                          "operating_point_attacks": point["chosen_with"]}}
    for name, b in loaded.items():
        out[name] = {"fpr_target": b.fpr,
                     "val_false_positive_rate": b.report.get("val_false_positive_rate"),
                     "fpr_source": b.report.get("fpr_source")}
        if hasattr(b, "squeezer_names"):
            out[name]["squeezers"] = list(b.squeezer_names)
    return out


def _figures(out_dir, fmd, clean, adv_out, paper_out, r_val, eta_curves, grid_rows, roc):
    """Writes the PNG figures into `out_dir`; returns their file names."""
    from fmd_tf.evaluation import figures

    def fig(name):
        return os.path.join(out_dir, name)

    figures.resistance_histograms(
        {"clean": clean["resistance"].mean(1),
         **{a: o["resistance"].mean(1) for a, o in adv_out.items()}}, fig("fig1_resistance.png"))
    names = ["fig1_resistance.png"]
    if not paper_out:  # the paper's figures need at least one of the paper's attacks
        return names
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
    figures.purified_grid(grid_rows, fig("fig6_purified.png"))
    figures.roc_curves({a: r for a, r in roc.items() if a in paper_out}, fig("roc.png"))
    return names + ["fig6_purified.png", "roc.png"]


def evaluate(model_dir: str, dataset: str = "fmnist", attacks=("fgsm", "pgd", "cw", "deepfool"),
             n: int = 1000, seed: int = 0, out_dir: str | None = None,
             cache_dir: str | None = None, batch_size: int = 64, baselines: bool = True,
             linf_eps=(), l2_eps=(), defense: str = "fmd.keras",
             attack_defense: str | None = None, splits=None, command: str | None = None,
             surrogate: str | None = None, verbose: int = 1,
             defense_options: dict | None = None) -> dict:
    """The evaluation report of the defense `model_dir`/`defense` on the first `n` CLE images.

    Args:
        attacks: names of `fmd_tf.evaluation.harness.ATTACKS`; those of `harness.BUDGETED` run
            once per budget of `linf_eps` / `l2_eps` when given, or at the one budget their
            name pins (e.g. apgd_ce_linf_0.1; `harness.expand_budgets`).
        out_dir: where report.json, report.md and the figures go (None: nothing is written,
            no figures).
        cache_dir: cache of the adversarial sets and of each defense's outputs on every set
            (`harness.defense_outputs`: a stopped run resumes there; None: no cache); of a
            baseline, its threshold-free `measure` pass, so calibrating it again costs no pass.
        baselines: also run MagNet and Feature Squeezing from `model_dir`/baselines.
        defense: the defense file in `model_dir` (fmd.keras, or fmd_ensemble.keras).
        attack_defense: the defense file the defense-aware attacks attack (default `defense`).
        splits: the data's `paper_splits` (default `model_splits(model_dir, dataset, seed)`).
        command: how the run was started, recorded in the report.
        surrogate: a .keras classifier trained independently of the defended one (e.g. with
            another seed: `train.py --stages classifier --seed 1`), needed by the attacks of
            `harness.TRANSFER`, which are made on it and transferred.
        verbose: 0 silent, else a start line and a progress bar.
        defense_options: DefenseConfig options the loaded defenses are evaluated with
            (`FMDefense.copy_with`, e.g. {"suspicious": "reject"}); recorded in the report.

    Raises ValueError (unknown attack, budget <= 0, n < 2 or above the CLE images, malformed
    model card) and FileNotFoundError (a defense file missing) before any attack runs.
    """
    import keras

    import fmd_tf  # noqa: F401  (registers the Keras classes)
    from fmd_tf.attacks import adaptive_detector_pgd
    from fmd_tf.evaluation import harness
    from fmd_tf.evaluation.baselines import load_baselines

    started = time.time()
    runs = _check_runs(attacks, linf_eps, l2_eps, n)
    attack_defense = attack_defense or defense
    for name in dict.fromkeys((defense, attack_defense)):
        if not os.path.isfile(os.path.join(model_dir, name)):
            raise FileNotFoundError(f"{os.path.join(model_dir, name)} not found")
    if any(method in harness.TRANSFER for _, method, _ in runs):
        if surrogate is None:
            raise ValueError(f"{', '.join(harness.TRANSFER)} need a surrogate classifier "
                             "(surrogate= / --surrogate)")
        if not os.path.isfile(surrogate):
            raise FileNotFoundError(f"surrogate classifier {surrogate} not found")
    splits = model_splits(model_dir, dataset, seed, n) if splits is None \
        else _enough_cle(splits, n)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    fmd = _with_options(load_defense(model_dir, name=defense), defense_options)
    target = fmd if attack_defense == defense else _with_options(
        load_defense(model_dir, name=attack_defense), defense_options)
    x, y = splits.x_cle[:n], splits.y_cle[:n]
    surrogate_model = None if surrogate is None else keras.models.load_model(surrogate,
                                                                              compile=False)
    loaded, notes = ({}, ["baselines skipped (--no-baselines)"]) if not baselines \
        else load_baselines(model_dir, fmd.classifier)
    bar = keras.utils.Progbar(1 + len(runs), stateful_metrics=["stage"], unit_name="set",
                              verbose=verbose)
    if verbose:
        print(f"evaluating {model_dir} on {n} CLE images: clean + "
              f"{', '.join(name for name, _, _ in runs)}")
    clean = _run_fm(fmd, x, batch_size, verbose, cache_dir)
    classifier_hash = harness.classifier_fingerprint(fmd.classifier)
    base_hash = {name: f"{b.measurement_fingerprint()} {classifier_hash}"
                 for name, b in loaded.items()}

    def defend_base(name, images):
        """A baseline's outputs: its threshold-free pass is read from the cache when stored
        (so calibrating it at another false-positive rate costs no new pass)."""
        measured = harness.defense_outputs(name, base_hash[name], lambda v: loaded[name].measure(
            v, verbose=verbose), images, cache_dir)[0]
        return loaded[name].decide(measured)

    def adapted_set(name, baseline, params):
        """Adaptive PGD at `params` against the baseline itself, read from the cache when
        stored (keyed by its weights, thresholds and the budget): against Defense-GAN every
        step runs its latent search."""
        key = (f"{base_hash[name]} {baseline.calibration_key()} "
               f"{json.dumps(params, sort_keys=True, default=str)} seed {seed}")
        return harness.defense_outputs(f"adaptive_pgd_{name}", key, lambda v: {
            "x_adv": adaptive_detector_pgd(baseline, v, y, eps=params["eps"], norm=params["norm"],
                                           nb_iter=params["nb_iter"], seed=seed)},
            x, cache_dir)[0]["x_adv"]

    clean_base = {name: defend_base(name, x) for name in loaded}
    bar.update(1)
    report = {"dataset": dataset, "n": n, "model": model_dir,
              "defense": defense, "attack_defense": attack_defense,
              "purify_label": (fmd.members[0] if hasattr(fmd, "members") else fmd).purify_label,
              "seed": seed,
              "command": command if command is not None
              else f"evaluate({model_dir!r}, attacks={list(attacks)!r}, n={n}, seed={seed})",
              "clean": harness.clean_metrics(clean, y), "attacks": {}, "notes": notes}
    if defense_options:
        report["defense_options"] = dict(defense_options)
    if surrogate_model is not None:
        report["surrogate"] = {"path": surrogate, "clean_accuracy": float(np.mean(
            np.argmax(surrogate_model.predict(x, verbose=0), axis=-1) == y))}
    for name, b in clean_base.items():
        report["clean"][name] = harness.clean_metrics(b, y)
    report["calibration"] = _calibration(model_dir, loaded)
    r_val, r_val_path = _load_val_resistance(model_dir, fmd, defense, len(splits.x_val), notes)
    adv_out, eta_curves, grid_rows, roc = {}, {}, {"clean": (x, clean["purified"])}, {}
    for k, (attack, method, overrides) in enumerate(runs):
        x_adv, info = harness.adversarial_set(method, fmd.classifier, x, y, cache_dir, seed,
                                              params=overrides, defense=target,
                                              surrogate=surrogate_model, verbose=verbose)
        adv = adv_out[attack] = _run_fm(fmd, x_adv, batch_size, verbose, cache_dir)
        entry = _attack_entry(method, info, x, x_adv, y, clean, adv)
        roc[attack] = {"FM-Defense": (clean["score"], adv["score"])}
        for bname, b in loaded.items():
            bout = defend_base(bname, x_adv)
            entry[bname] = harness.defense_metrics(clean_base[bname], bout, y, y)
            roc[attack][bname] = (clean_base[bname]["score"], bout["score"])
            if method == "adaptive_pgd":  # the same budget, adapted to this baseline
                x_b = adapted_set(bname, b, info["params"])
                entry[f"{bname}_adaptive"] = harness.defense_metrics(
                    clean_base[bname], defend_base(bname, x_b), y, y)
        report["attacks"][attack] = entry
        bar.update(k + 2)
        if attack.startswith("adaptive"):  # the paper's figures cover the paper's attacks
            continue
        grid_rows[attack] = (x_adv, adv["purified"])
        if r_val is not None:
            eta_curves[attack] = eta_curve(fmd, r_val, clean, adv, y)
    report["worst_case"] = worst_case(clean, adv_out, y, {
        a: e.get("params") for a, e in report["attacks"].items()})
    report["attacks_eta_curves"] = eta_curves
    paper_out = {a: o for a, o in adv_out.items() if not a.startswith("adaptive")}
    if paper_out and r_val is not None:
        e_val = fmd.reconstruction_error(splits.x_val)
        val_out = harness.val_outputs(fmd, splits.x_val, r_val, e_val)
        report["operating_points"] = operating_point_rows(fmd, r_val, e_val, clean, paper_out,
                                                          y, val_out, splits.y_val)
    elif paper_out and not hasattr(fmd, "members"):
        notes.append(f"{r_val_path} missing: no ρ / η figures")
    report["figures"] = _figures(out_dir, fmd, clean, adv_out, paper_out, r_val, eta_curves,
                                 grid_rows, roc) if out_dir else []
    report["seconds"] = time.time() - started
    if out_dir:
        write_report(report, out_dir)
    return report


def budget_group(name: str, params: dict | None = None) -> str | None:
    """The threat model ``<norm>_<eps>`` of attack `name`: from its parameters `params`
    ("eps", "norm"; L∞ when no norm is given) when they bound the perturbation, else from a
    name ending in _<norm>_<eps>; None for an unbounded attack (C&W, DeepFool)."""
    if params and "eps" in params and params.get("norm", "linf") in ("linf", "l2"):
        return f"{params.get('norm', 'linf')}_{float(params['eps']):g}"
    parts = name.rsplit("_", 2)
    if len(parts) == 3 and parts[1] in ("linf", "l2"):
        return f"{parts[1]}_{parts[2]}"
    return None


def _undefended(out: dict) -> dict:
    """The classifier alone's outputs: its label, every input passed."""
    label = np.asarray(out["classifier_label"])
    return {"label": label, "verdict": np.zeros_like(label)}


def worst_case(clean: dict, adv_out: dict, y, params: dict | None = None) -> dict:
    """FM-Defense's per-image worst case (`metrics.worst_case_accuracy`) over all attacks of
    the run ("all") and over the attacks of each threat model ("linf_0.1", ...:
    `budget_group` of each attack, with its parameters `params[name]` when given: e.g.
    classifier_apgd_ce joins the budget grid's linf_0.1 attacks). Where the outputs hold the
    classifier's labels (`classifier_label`), each group also gets the classifier alone's
    worst case on the same images (`undefended_accuracy`): what the defense adds."""
    from fmd_tf.evaluation.metrics import worst_case_accuracy

    params = params or {}
    groups = {"all": list(adv_out)} if adv_out else {}
    for name in adv_out:
        group = budget_group(name, params.get(name))
        if group is not None:
            groups.setdefault(group, []).append(name)
    outs = [clean, *adv_out.values()]
    undefended = all("classifier_label" in out for out in outs)
    worst = {}
    for key, names in groups.items():
        entry = {"attacks": names, "defended_accuracy": worst_case_accuracy(
            clean, {n: adv_out[n] for n in names}, y)}
        if undefended:
            entry["undefended_accuracy"] = worst_case_accuracy(
                _undefended(clean), {n: _undefended(adv_out[n]) for n in names}, y)
        worst[key] = entry
    return worst


def write_report(report: dict, out_dir: str) -> None:
    """OUT/report.json and OUT/report.md (`render_markdown`), each written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "report.json"), report)
    write_text(os.path.join(out_dir, "report.md"), render_markdown(report))


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _chosen_with(report) -> list[str] | None:
    """The attacks FM-Defense's operating point was chosen with (None: not recorded)."""
    calibration = report.get("calibration") or {}
    return (calibration.get("fm_defense") or {}).get("operating_point_attacks")


def _clean_cols(report) -> list[str]:
    """Clean accuracy (%): the classifier's, then each defense's (`DEFENSES`)."""
    clean = report["clean"]
    return [_pct(clean.get("classifier_accuracy"))] + [
        _pct((clean if d == "fm_defense" else clean.get(d, {})).get("defended_accuracy"))
        for d in DEFENSES]


def _attack_cols(entry) -> list[str]:
    """Accuracy (%) under one attack: undefended, then each defense's defended accuracy."""
    return [_pct(entry["undefended_accuracy"])] + [
        _pct(entry[d]["defended_accuracy"]) if d in entry else "n/a" for d in DEFENSES]


def _paper_attacks(report) -> dict:
    """The report's attacks on the classifier or a surrogate (not the adaptive ones)."""
    return {k: v for k, v in report["attacks"].items() if not k.startswith("adaptive")}


def results_table(report: dict) -> list[str]:
    """Lines of the README's results table: accuracy (%) without a defense and defended by each
    of `DEFENSES`, on the clean images and under each attack of `_paper_attacks`, named by
    `harness.attack_label`; the attacks FM-Defense's operating point was chosen with first,
    then the held-out ones, the first of them marked."""
    from fmd_tf.evaluation.harness import attack_label

    chosen_with = _chosen_with(report) or []
    attacks = _paper_attacks(report)
    order = sorted(attacks, key=lambda name: name not in chosen_with)
    lines = ["| | no defense | FM-Defense | MagNet | Feature Squeezing | Defense-GAN |",
             "|---|---|---|---|---|---|",
             "| clean | " + " | ".join(_clean_cols(report)) + " |"]
    first_held_out = next((name for name in order if name not in chosen_with), None)
    for name in order:
        label = attack_label(name, attacks[name].get("params"))
        if name == first_held_out and chosen_with:
            label = f"*held out:* {label}"
        lines.append(f"| {label} | " + " | ".join(_attack_cols(attacks[name])) + " |")
    return lines


def _table_ii(paper_attacks, report) -> list[str]:
    from fmd_tf.evaluation.harness import PAPER_TABLE_II_MNIST

    lines = [
        "## Table II: accuracy (%) under attack",
        "",
        "Defended accuracy: an adversarial input counts if rejected or its final label is right; "
        "a clean one only if its final label is right (row \"clean\": what each defense costs). "
        "Paper columns are the paper's MNIST numbers (it reports no Fashion-MNIST table). Last "
        "column: whether FM-Defense's operating point was chosen with that attack (made from VAL "
        "images) or the attack is held out.",
        "",
        "| attack | no defense | FM-Defense | MagNet | Feature Squeezing | Defense-GAN | paper "
        "MNIST: no defense / FM-Defense / MagNet | FM-Defense operating point |",
        "|---|---|---|---|---|---|---|---|",
    ]
    calibration = report.get("calibration")
    chosen_with = _chosen_with(report)
    lines.append("| clean | " + " | ".join(_clean_cols(report)) + " | n/a | chosen with (VAL) |")
    for name, a in paper_attacks.items():
        paper = PAPER_TABLE_II_MNIST.get(name, {})
        paper_s = " / ".join("n/a" if paper.get(k) is None else f"{paper[k]}"
                             for k in ("no_defense", "fm_defense", "magnet")) if paper else "n/a"
        role = "n/a" if chosen_with is None else (
            "chosen with (VAL)" if name in chosen_with else "held out")
        lines.append(f"| {name} | " + " | ".join(_attack_cols(a)) + f" | {paper_s} | {role} |")
    if calibration:
        def rate(v):
            return "n/a" if v is None else f"{100 * v:.2f} %"

        parts = [f"FM-Defense {rate(calibration['fm_defense']['val_false_positive_rate'])}"]
        parts += [f"{d} {rate(c.get('val_false_positive_rate'))}"
                  + (f" (squeezers {', '.join(c['squeezers'])}, chosen on VAL)"
                     if c.get("squeezers") else "")
                  for d, c in calibration.items() if d != "fm_defense"]
        lines += ["", "Share of clean VAL images each defense flags at its calibrated "
                  "thresholds: " + "; ".join(parts) + "."]
    return lines


def _adaptive_table(adaptive) -> list[str]:
    lines = ["", "## Security evaluation: adaptive attacks", "",
             "White-box attacks on the whole defense (fmd_tf.attacks.adaptive). Defended "
             "accuracy: rejected or final label right. MagNet / Feature Squeezing: first "
             "the same examples (crafted against FM-Defense, transferred), then, for "
             "adaptive_pgd, PGD adapted to that baseline at the same budget "
             "(fmd_tf.attacks.adaptive_detector_pgd).", "",
             "| attack | norm | ε | no defense | FM-Defense | verdicts (pass/purify/reject) "
             "| MagNet (transfer / adaptive) | Feature Squeezing (transfer / adaptive) "
             "| Defense-GAN (transfer / adaptive) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a in adaptive.values():
        fm = a["fm_defense"]
        cols = [" / ".join(_pct(a[k]["defended_accuracy"]) if k in a else "n/a"
                           for k in (d, f"{d}_adaptive"))
                for d in DEFENSES[1:]]
        lines.append(f"| {a['method']} | {a['params'].get('norm', 'l2')} | "
                     f"{a['params'].get('eps', 'none')} | {_pct(a['undefended_accuracy'])} | "
                     f"{_pct(fm['defended_accuracy'])} | "
                     f"{'/'.join(str(c) for c in fm['verdict_counts'])} | "
                     + " | ".join(cols) + " |")
    return lines


def _detection_table(report) -> list[str]:
    from fmd_tf.evaluation.harness import DETECTION_FPRS, tpr_key

    at = [f for f in DETECTION_FPRS if all(tpr_key(f) in a[d] for a in report["attacks"].values()
                                           for d in DEFENSES if d in a)]
    lines = ["", "## Detection", "",
             "TPR / FPR: the defense's own verdicts (flagged = not passed). AUC and TPR at a "
             "clean FPR: its continuous score (FM-Defense: the resistance score max_i θr(i) - "
             "r(i), without the reconstruction gate), thresholds set on these clean images.",
             "", "| attack | defense | TPR | FPR (clean) | AUC | "
             + "".join(f"TPR at {100 * f:g} % FPR | " for f in at)
             + "purification recall | paper final accuracy |",
             "|---|---|---|---|---|" + "---|" * len(at) + "---|---|"]
    for name, a in report["attacks"].items():
        for d in DEFENSES:
            if d in a:
                m = a[d]
                lines.append(f"| {name} | {d} | {_pct(m['detection_tpr'])} | "
                             f"{_pct(m['detection_fpr'])} | {m['auc']:.4f} | "
                             + "".join(f"{_pct(m[tpr_key(f)])} | " for f in at)
                             + f"{_pct(m['purification_recall'])} | "
                             f"{_pct(m['paper_final_accuracy'])} |")
    lines += ["", "Attack success rate (share of clean-correct images misclassified) and "
              "generation time:", ""]
    for name, a in report["attacks"].items():
        lines.append(f"- {name} {json.dumps(a['params'])}: success "
                     f"{_pct(a['attack_success_rate'])} %, {a['attack_seconds']:.0f} s"
                     + (" (cached)" if a.get("attack_cached") else ""))
    return lines


def _operating_point_table(ops, attacks) -> list[str]:
    lines = ["", "## Operating points (same VAL resistances, thresholds re-calibrated)", "",
             "Reconstruction gate budget 0 is the paper's rule. VAL columns: the clean "
             "VAL images the thresholds are calibrated on.", "",
             "| mode | ρ | recon gate budget | θd | VAL clean flagged | VAL clean defended | "
             "clean flagged | clean defended | "
             + " | ".join(f"{a} defended" for a in attacks) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(attacks)]
    for r in ops:
        # θd is None where suspicious inputs are rejected (no purification distance)
        theta_d = "reject" if r["theta_d"] is None else f"{r['theta_d']:.3f}"
        lines.append(f"| {r['threshold_mode']} | {r['rho']} | {r['recon_fpr']} | "
                     f"{theta_d} | {_pct(r.get('val_clean_flagged'))} | "
                     f"{_pct(r.get('val_clean_defended_accuracy'))} | "
                     f"{_pct(r['clean_flagged'])} | {_pct(r['clean_defended_accuracy'])} | "
                     + " | ".join(_pct(r[f"{a}_defended_accuracy"]) for a in attacks) + " |")
    return lines


def _worst_case_lines(worst: dict) -> list[str]:
    if not worst:
        return []
    lines = ["", "## Worst case per image", "",
             "FM-Defense's defended accuracy when an image counts only if its clean input and "
             "every attacked version of it are defended (rejected or final label right); "
             "no defense: the classifier alone's label right on all of them.", "",
             "| attacks | no defense | defended accuracy |", "|---|---|---|"]
    for key, entry in worst.items():
        lines.append(f"| {key}: {', '.join(entry['attacks'])} | "
                     f"{_pct(entry.get('undefended_accuracy'))} | "
                     f"{_pct(entry['defended_accuracy'])} |")
    return lines


def render_markdown(report: dict) -> str:
    """report.md: the clean figures, Table II, the adaptive attacks, detection, the operating
    points and the notes of an `evaluate` report."""
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
        "| {} | {} | {} | {} |".format(*(_pct(report["clean"][k]) for k in (
            "classifier_accuracy", "defended_accuracy", "rejected_rate", "purified_rate"))),
        "",
    ]
    paper_attacks = _paper_attacks(report)
    adaptive = {k: v for k, v in report["attacks"].items() if k.startswith("adaptive")}
    if paper_attacks:
        lines += ["## Summary: accuracy (%)", "",
                  "Defended accuracy as in Table II below, attacks by name (the README's "
                  "results table).", ""] + results_table(report) + [""]
    lines += _table_ii(paper_attacks, report)
    if adaptive:
        lines += _adaptive_table(adaptive)
    lines += _worst_case_lines(report.get("worst_case") or {})
    lines += _detection_table(report)
    if report.get("operating_points"):
        lines += _operating_point_table(report["operating_points"], list(paper_attacks))
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", "Figures: " + ", ".join(f"`{f}`" for f in report["figures"]), ""]
    return "\n".join(lines)
