"""Choosing FM-Defense's operating point on clean VAL data and VAL-made attacks (no test data).

An operating point is the part of the calibration that does not change the morphs: the
threshold mode and ρ of the resistance thresholds, the reconstruction gate's metric,
per-pixel tolerance τ and clean budget, and the classifier-margin gate's clean budget. All of
them are re-thresholds of the same stored VAL resistances, errors and logit margins, so a
whole grid costs one pass of the defense over VAL (for the calibration) and one over the
adversarial VAL images.

Rule (`choose_row`): among the rows whose clean VAL defended accuracy is at least the
classifier's VAL accuracy minus `clean_cost`, the one whose *smallest* defended accuracy over
clean VAL and every attack is the largest (the best worst case, `max_min_row`); the first such
row on ties. When no row meets the clean budget, the row with the best clean defended accuracy.

The attacks (`fmd_tf.evaluation.harness.ATTACKS`, FGSM and PGD at ε 0.3 by default) are made
from the first `n_attack` VAL images against the classifier alone (an attacker who does not
know the defense); an adversarial image counts as defended when it is rejected or its final
label is right. "robust" (`GRIDS`) is the same rule for a classifier trained to hold at an L∞
radius (TRADES, PGD-AT): APGD-CE, APGD-DLR and APGD with a wrong-class margin loss at that
radius (`attack_eps`; the harness's 0.1 by default), at most 1 point of clean VAL below the
classifier, with the classifier-margin gate in the grid (the rule the shipped robust mode was
chosen with, at L∞ 0.1).

Morph budget (`select_budget`): once the point is chosen, the defense is run on the same clean
and attacked VAL images with each candidate of `budgets` (the adaptive budget of
`fmd_tf.defense.adaptive_budget`, which stops drawing a code's morphs once its side of θr is
clear), and the first whose verdicts agree with the full budget's on at least
`min_budget_agreement` of the images and whose clean-vs-attack ROC AUC of the resistance score
moves by at most `max_budget_auc_change` is kept: that is the model's default inference path.
The AUC change must hold with a margin for the VAL sample: the farther end from 0 of its paired
bootstrap interval at `budget_auc_level` (`metrics.paired_auc_change_interval`) is what is
compared, so that a budget that passes on 500 VAL images per attack is not one whose change on
other images is larger. When no code's θr can flag (all below 0), the verdicts cannot depend on
the budget, and agreement alone decides.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np

__all__ = [
    "OPERATING_POINTS",
    "PAPER_POINT",
    "STAGE_POINTS",
    "OperatingPointConfig",
    "apply_point",
    "budget_row",
    "choose_row",
    "grid",
    "max_min_row",
    "operating_point_table",
    "resistance_can_flag",
    "decides_without_morphs",
    "select_budget",
    "select_operating_point",
]

OPERATING_POINTS = ("auto", "robust", "paper")
# ... and, for the training stage, "config": the DefenseConfig's own thresholds as given.
STAGE_POINTS = (*OPERATING_POINTS, "config")
# The paper's rule (§IV-A): ρ = 99.9 % per code, no reconstruction gate, the purified image's
# own label.
PAPER_POINT = {"threshold_mode": "per_code", "rho": 0.999, "recon_fpr": 0.0,
               "purify_label": "reconstruction"}
# The keys of a table row that set an FMDefense option.
POINT_KEYS = ("threshold_mode", "rho", "recon_fpr", "recon_metric", "recon_pixel_tol",
              "margin_fpr")


@dataclass(frozen=True)
class OperatingPointConfig:
    """The grid and the attacks `operating_point="auto"` chooses from (see the module doc)."""

    attacks: tuple[str, ...] = ("fgsm", "pgd")
    # L∞ radius of every attack (None: each one's own in the harness table); L∞ attacks only.
    attack_eps: float | None = None
    n_attack: int = 500  # first VAL images attacked per attack
    clean_cost: float = 0.02  # clean VAL defended accuracy >= classifier VAL accuracy - this
    modes: tuple[str, ...] = ("per_code", "unified")
    rhos: tuple[float, ...] = (0.999, 0.99, 0.98, 0.97, 0.96, 0.95, 0.9)
    # (metric, τ) of the reconstruction gate; τ only for "pixel_share". With budget 0 (gate
    # off) the metric changes nothing: those rows repeat, and ties go to the first.
    gate_metrics: tuple[tuple[str, float | None], ...] = (
        ("mae", None), ("mse", None), ("pixel_share", 0.1), ("pixel_share", 0.15),
        ("pixel_share", 0.2))
    gate_budgets: tuple[float, ...] = (0.0, 0.0025, 0.005, 0.01, 0.02)
    # Clean budgets of the classifier-margin gate (`margin_fpr`; 0 = off). Off only by
    # default: against attacks on a standard classifier's decision boundary (FGSM, PGD) it
    # adds little; a robust classifier's operating point is chosen with APGD and the margin
    # attack (classifier_apgd_margin), e.g. (0.0, 0.01, 0.02, 0.03).
    margin_budgets: tuple[float, ...] = (0.0,)
    # Morph budgets for inference (`select_budget`), cheapest expected first: the adaptive
    # budget (fmd_tf.defense.adaptive_budget) in rounds of 10 or 5 morphs, then with each
    # image's lowest 1 or 2 codes finished to all N morphs. () keeps the full budget.
    budgets: tuple[dict, ...] = (
        {"adaptive_budget": True, "adaptive_round": 10, "adaptive_refine_codes": 0},
        {"adaptive_budget": True, "adaptive_round": 5, "adaptive_refine_codes": 1},
        {"adaptive_budget": True, "adaptive_round": 10, "adaptive_refine_codes": 1},
        {"adaptive_budget": True, "adaptive_round": 5, "adaptive_refine_codes": 2},
        {"adaptive_budget": True, "adaptive_round": 10, "adaptive_refine_codes": 2})
    min_budget_agreement: float = 0.995
    max_budget_auc_change: float = 0.005
    # Confidence of the paired-bootstrap interval of the AUC change (0: the point estimate).
    budget_auc_level: float = 0.95

    def __post_init__(self):
        if self.n_attack < 1:
            raise ValueError(f"n_attack must be >= 1, got {self.n_attack}")
        if self.attack_eps is not None and not 0.0 < self.attack_eps <= 1.0:
            raise ValueError(f"attack_eps must be in (0, 1], got {self.attack_eps}")
        if not 0.0 <= self.clean_cost <= 1.0:
            raise ValueError(f"clean_cost must be in [0, 1], got {self.clean_cost}")
        if not all(0.0 < r <= 1.0 for r in self.rhos) or not self.rhos:
            raise ValueError(f"rhos must lie in (0, 1], got {self.rhos}")
        for name in ("gate_budgets", "margin_budgets"):
            budgets = getattr(self, name)
            if not budgets or not all(0.0 <= b < 1.0 for b in budgets):
                raise ValueError(f"{name} must lie in [0, 1), got {budgets}")
        if not 0.0 <= self.min_budget_agreement <= 1.0:
            raise ValueError(f"min_budget_agreement must be in [0, 1], got "
                             f"{self.min_budget_agreement}")
        if not 0.0 <= self.budget_auc_level < 1.0:
            raise ValueError(f"budget_auc_level must be in [0, 1), got {self.budget_auc_level}")
        if self.max_budget_auc_change < 0.0:
            raise ValueError(f"max_budget_auc_change must be >= 0, got "
                             f"{self.max_budget_auc_change}")


# The fast preset: fewer attacked VAL images, and one budget candidate (its N = 8 morphs per
# code leave little to save).
FAST_OPERATING_POINT = OperatingPointConfig(
    n_attack=64, budgets=({"adaptive_budget": True, "adaptive_round": 4,
                           "adaptive_refine_codes": 1},))
# For a classifier robust at L∞ 0.1: attacks that find its errors inside that ball, a tighter
# clean budget (its clean accuracy is already lower) and the classifier-margin gate.
ROBUST_OPERATING_POINT = OperatingPointConfig(
    attacks=("classifier_apgd_ce", "classifier_apgd_dlr", "classifier_apgd_margin"),
    clean_cost=0.01, margin_budgets=(0.0, 0.005, 0.01, 0.02, 0.03, 0.05))
# The grid of each table-chosen operating point, full and fast preset.
GRIDS = {"auto": (OperatingPointConfig(), FAST_OPERATING_POINT),
         "robust": (ROBUST_OPERATING_POINT,
                    dataclasses.replace(ROBUST_OPERATING_POINT,
                                        n_attack=FAST_OPERATING_POINT.n_attack,
                                        budgets=FAST_OPERATING_POINT.budgets))}


def grid(operating_point: str = "auto", fast: bool = False,
         robust_eps: float | None = None) -> OperatingPointConfig:
    """The grid and attacks a table-chosen operating point ("auto", "robust") chooses from,
    for the full or the fast preset; "robust" attacks at L∞ `robust_eps` (the radius the
    classifier was trained to hold; None: the harness's 0.1)."""
    if operating_point not in GRIDS:
        raise ValueError(f"operating points chosen from a table: {tuple(GRIDS)}, "
                         f"got {operating_point!r}")
    cfg = GRIDS[operating_point][bool(fast)]
    if operating_point == "robust" and robust_eps is not None:
        cfg = dataclasses.replace(cfg, attack_eps=float(robust_eps))
    return cfg


def max_min_row(rows: list[dict], attacks, eligible=None) -> int:
    """Index of the row whose smallest VAL defended accuracy over clean and `attacks` is the
    largest, among `eligible` indices (default all); the first such row on ties."""
    keys = ["val_clean_defended_accuracy"] + [f"val_{a}_defended_accuracy" for a in attacks]
    candidates = range(len(rows)) if eligible is None else list(eligible)
    if not candidates:
        raise ValueError("no eligible operating point")
    return max(candidates, key=lambda i: (min(rows[i][k] for k in keys), -i))


def choose_row(rows: list[dict], attacks, classifier_accuracy: float, clean_cost: float) -> int:
    """The rule of the module docstring: the max-min row among those within `clean_cost` of
    the classifier's clean VAL accuracy, else the row with the best clean defended accuracy."""
    floor = classifier_accuracy - clean_cost - 1e-9
    eligible = [i for i, r in enumerate(rows) if r["val_clean_defended_accuracy"] >= floor]
    if eligible:
        return max_min_row(rows, attacks, eligible)
    clean = [r["val_clean_defended_accuracy"] for r in rows]
    return int(np.argmax(clean))


def operating_point_table(fmd, x_val, y_val, val_resistance, cfg: OperatingPointConfig,
                          cache_dir: str | None = None, seed: int = 0, verbose: int = 0) -> dict:
    """VAL figures of every operating point of `cfg`'s grid for a calibrated `fmd`.

    Args:
        fmd: calibrated `FMDefense` (its normal ranges are used; thresholds are recomputed).
        x_val, y_val: its clean VAL images [n, H, W, C] and labels [n].
        val_resistance: [n, m] VAL resistances of `fmd` (the calibration's).
        cache_dir: adversarial-set cache (None: no cache).

    Returns:
        {"rows": [...], "classifier_val_accuracy", "attacks": {"names", "n", "seed"}} where
        each row holds the point's options (`POINT_KEYS`), its thresholds' summary and its
        `val_clean_defended_accuracy`, `val_clean_flagged`, `val_<attack>_defended_accuracy`.
    """
    from fmd_tf.defense import calibration
    from fmd_tf.evaluation import harness

    unknown = [a for a in cfg.attacks if a not in harness.ATTACKS or a in harness.DEFENSE_AWARE]
    if unknown:
        raise ValueError(f"operating-point attacks must be classifier attacks of "
                         f"fmd_tf.evaluation.harness.ATTACKS, got {unknown}")
    params = {} if cfg.attack_eps is None else {"eps": cfg.attack_eps}
    not_linf = [a for a in cfg.attacks if params and (
        "eps" not in harness.ATTACKS[a].params
        or harness.ATTACKS[a].params.get("norm", "linf") != "linf")]
    if not_linf:
        raise ValueError(f"attack_eps {cfg.attack_eps} sets the radius of L∞ attacks; "
                         f"{not_linf} are not")
    x_att, y_att = x_val[: cfg.n_attack], y_val[: cfg.n_attack]
    adv = {}
    for attack in cfg.attacks:
        x_adv, _ = harness.adversarial_set(attack, fmd.classifier, x_att, y_att, cache_dir, seed,
                                           params=params)
        if verbose:
            print(f"operating point: defending {len(x_adv)} VAL {attack} images", flush=True)
        adv[attack] = ({**fmd.defend_with_stats(x_adv, verbose=verbose, outcomes=True),
                        "margin": fmd.logit_margins(x_adv)},
                       harness.purified_labels(fmd, x_adv), x_adv)
    rows = []
    val_out = harness.val_outputs(fmd, x_val, val_resistance, None)
    for (metric, tol), margin_fpr in itertools.product(cfg.gate_metrics, cfg.margin_budgets):
        gate = fmd.copy_with(recon_metric=metric,
                             **({} if tol is None else {"recon_pixel_tol": tol}))
        val_out = {**val_out, "recon_error": gate.reconstruction_error(x_val)}
        attack_outputs = {
            name: ({**out, "purified_label": purified,
                    "recon_error": gate.reconstruction_error(x_adv)}, y_att)
            for name, (out, purified, x_adv) in adv.items()}
        grid = list(itertools.product(cfg.modes, cfg.rhos, cfg.gate_budgets))
        theta_m = calibration.margin_threshold(val_out["margin"], margin_fpr)
        rows += [{"recon_metric": metric, "recon_pixel_tol": tol, "margin_fpr": margin_fpr,
                  "theta_m": theta_m if np.isfinite(theta_m) else None, **row}
                 for row in harness.val_operating_points(fmd, val_out, y_val, grid,
                                                         attack_outputs, theta_m)]
    return {"rows": rows,
            "classifier_val_accuracy": float(np.mean(val_out["classifier_label"] == y_val)),
            "attacks": {"names": list(cfg.attacks), "n": int(len(x_att)), "seed": seed},
            # not for the card: the attacked VAL images and their full-budget morph outcomes
            "adversarial": {name: (x_adv, out["morph_outcomes"])
                            for name, (out, _, x_adv) in adv.items()}}


def point_options(row: dict, fmd) -> dict:
    """FMDefense options of a table row (τ kept at the model's own when the row has none)."""
    options = {k: row[k] for k in POINT_KEYS if row.get(k) is not None}
    options.setdefault("recon_pixel_tol", fmd.recon_pixel_tol)
    return options


def apply_point(fmd, options: dict, x_val, val_resistance, verify_rows: int | None = None):
    """(A copy of `fmd` with `options`, recalibrated on the stored VAL resistances; the
    calibration report). Only the thresholds move: ranges and morphs stay the same.
    `verify_rows`: as `FMDefense.calibrate`'s (None: its default; 0 where `fmd` itself has
    just computed or checked `val_resistance`)."""
    point = fmd.copy_with(**options)
    checks = {} if verify_rows is None else {"verify_rows": verify_rows}
    report = point.calibrate(x_val, val_resistance=val_resistance, **checks)
    return point, report


def select_operating_point(fmd, x_val, y_val, val_resistance, operating_point: str = "auto",
                           cfg: OperatingPointConfig | None = None, cache_dir: str | None = None,
                           seed: int = 0, verbose: int = 0, val_outcomes=None):
    """(`fmd` at the chosen operating point, its calibration report, a card entry).

    "auto", "robust": the rule of the module docstring on `cfg`'s grid (default: `grid(
    operating_point)`), then the cheapest morph budget that keeps the full budget's VAL
    verdicts (`select_budget`); the card entry holds the chosen row, the rule, the whole table
    and the budget rows. "paper": `PAPER_POINT` with the full budget, as in the paper.
    `val_outcomes` [n, m, N] bool: the calibration's morph outcomes of `x_val`
    (`val_morph_outcomes`); without them the budget step recomputes those of the clean images
    it uses. `val_resistance` must be `fmd`'s own (its calibration's, as
    `FMDefense.calibrate` returns or has checked them): it is not recomputed here.
    """
    if operating_point not in OPERATING_POINTS:
        raise ValueError(f"operating_point must be one of {OPERATING_POINTS}, "
                         f"got {operating_point!r}")
    if fmd.adaptive_budget:  # the table compares thresholds on full-budget resistances
        fmd = fmd.copy_with(adaptive_budget=False)
    if operating_point == "paper":
        point, report = apply_point(fmd, PAPER_POINT, x_val, val_resistance, verify_rows=0)
        return point, report, {"rule": "paper", "options": dict(PAPER_POINT)}
    cfg = cfg or grid(operating_point)
    table = operating_point_table(fmd, x_val, y_val, val_resistance, cfg, cache_dir, seed,
                                  verbose)
    index = choose_row(table["rows"], cfg.attacks, table["classifier_val_accuracy"],
                       cfg.clean_cost)
    options = point_options(table["rows"][index], fmd)
    point, report = apply_point(fmd, options, x_val, val_resistance, verify_rows=0)
    adversarial = table.pop("adversarial")
    n = cfg.n_attack
    if val_outcomes is None:
        val_outcomes = point.defend_with_stats(x_val[:n], verbose=verbose,
                                               outcomes=True)["morph_outcomes"]
    sets = {name: (outcomes[:n], point.reconstruction_error(x[:n])) for name, (x, outcomes)
            in {"clean": (x_val, val_outcomes), **adversarial}.items()}
    point, budget = select_budget(point, sets, cfg, verbose)
    radius = "" if cfg.attack_eps is None else f" at L∞ {cfg.attack_eps:g}"
    entry = {"rule": f"{operating_point}: max-min VAL defended accuracy over clean and "
                     f"{', '.join(cfg.attacks)}{radius}, clean >= classifier - "
                     f"{cfg.clean_cost:g}",
             "options": options, "chosen_row": index, "settings": dataclasses.asdict(cfg),
             "budget": budget, **table}
    return point, report, entry


def budget_row(fmd, options: dict, sets: dict, auc_level: float = 0.0) -> dict:
    """VAL figures of the morph budget `options` (e.g. {"adaptive_budget": True}) against the
    full budget of the calibrated `fmd`, replayed on the full budget's morph outcomes (exactly
    what the budget would draw and decide, `FMDefense.adaptive_resistance_on_outcomes`).

    `sets`: {name: (morph outcomes [n, m, N] bool of `fmd`'s full budget, reconstruction
    errors [n] of its gate)}, one named "clean" and the others adversarial (from
    `defend_with_stats(x, outcomes=True)` and `reconstruction_error(x)`). Returns the options,
    `morphs_per_image` (mean over
    all images), `verdict_agreement` (share of images with the full budget's verdict) and, per
    adversarial set, the change of the clean-vs-adversarial ROC AUC of the resistance score
    max_i(θr(i) - r(i)) (`auc_change`) with its largest absolute value (`max_abs_auc_change`).
    With `auc_level` > 0 also each change's paired-bootstrap interval at that confidence
    (`auc_change_interval`) and the largest |end| over the intervals and the changes
    (`auc_change_bound`; without intervals it is `max_abs_auc_change`).
    """
    from fmd_tf.defense.adaptive_budget import full_resistance
    from fmd_tf.defense.fm_defense import decide
    from fmd_tf.evaluation.harness import fm_scores
    from fmd_tf.evaluation.metrics import paired_auc_change_interval, roc_auc

    variant = fmd.copy_with(**options)
    theta_r, theta_d, theta_e = (np.asarray(v) for v in (fmd.theta_r, fmd.purify_threshold(),
                                                          fmd.theta_e))
    full, fast, morphs, agree = {}, {}, [], []
    for name, (outcomes, recon_error) in sets.items():
        resistance = full_resistance(outcomes).numpy()
        if variant.adaptive_budget:
            fast_resistance, used = variant.adaptive_resistance_on_outcomes(outcomes)
        else:
            fast_resistance, used = resistance, np.full(resistance.shape, fmd.num_morphs)
        verdicts = [decide(r, theta_r, theta_d, recon_error, theta_e)[0].numpy()
                    for r in (resistance, fast_resistance)]
        agree.append(verdicts[0] == verdicts[1])
        morphs.append(used.sum(axis=1))
        full[name] = fm_scores({"resistance": resistance}, theta_r)
        fast[name] = fm_scores({"resistance": fast_resistance}, theta_r)
    attacks = [name for name in sets if name != "clean"]
    auc_change = {name: roc_auc(fast["clean"], fast[name]) - roc_auc(full["clean"], full[name])
                  for name in attacks}
    max_abs = max((abs(v) for v in auc_change.values()), default=0.0)
    interval = {} if not auc_level else {
        name: paired_auc_change_interval(full["clean"], full[name], fast["clean"], fast[name],
                                         level=auc_level) for name in attacks}
    bound = max([max_abs, *(abs(end) for ends in interval.values() for end in ends)])
    return {"options": dict(options),
            "morphs_per_image": float(np.mean(np.concatenate(morphs))),
            "full_morphs_per_image": float(fmd.num_codes * fmd.num_morphs),
            "verdict_agreement": float(np.mean(np.concatenate(agree))),
            "auc_change": auc_change,
            "max_abs_auc_change": max_abs,
            **({"auc_change_interval": {k: list(v) for k, v in interval.items()},
                "auc_change_level": auc_level} if interval else {}),
            "auc_change_bound": bound}


def select_budget(fmd, sets: dict, cfg: OperatingPointConfig, verbose: int = 0):
    """(`fmd` with the first morph budget of `cfg.budgets` that holds on VAL, card entry).

    A budget holds when `budget_row` gives verdict agreement >= `cfg.min_budget_agreement`
    and an AUC change bound (`auc_change_bound`: the change and its paired-bootstrap interval
    at `cfg.budget_auc_level`) <= `cfg.max_budget_auc_change` on every adversarial set.
    The AUC condition stands in for "the verdicts agree beyond VAL too"; when no resistance
    threshold can flag (every θr < 0, while r >= 0), the verdicts cannot depend on the budget
    on any image, and agreement alone decides. Candidates are tried in order (cheapest
    expected first) and the first that holds is taken; when none does, `fmd` keeps the full
    budget.
    """
    can_flag = resistance_can_flag(fmd)
    rule = _BUDGET_RULE.format(cfg=cfg) if can_flag else _BUDGET_RULE_NO_FLAG.format(cfg=cfg)
    rows = []
    for options in cfg.budgets:
        if verbose:
            print(f"morph budget: trying {options} on VAL", flush=True)
        rows.append(budget_row(fmd, options, sets, cfg.budget_auc_level))
        row = rows[-1]
        if row["verdict_agreement"] >= cfg.min_budget_agreement and \
                (not can_flag or row["auc_change_bound"] <= cfg.max_budget_auc_change):
            entry = {"rule": rule, "options": row["options"], "rows": rows}
            return fmd.copy_with(**row["options"]), entry
    return fmd, {"rule": rule, "options": {}, "rows": rows}


def resistance_can_flag(fmd) -> bool:
    """Whether any code's threshold can flag: is the most suspicious resistance row, 0 on every
    code, flagged by the detector's own rule (`calibration.is_suspicious`, r <= θr)?"""
    from fmd_tf.defense.calibration import is_suspicious

    theta_r = np.asarray(fmd.theta_r)
    return bool(is_suspicious(np.zeros((1, theta_r.size)), theta_r)[0])


def decides_without_morphs(defense) -> bool:
    """Whether `defense` answers label and verdict without its morphs: an `FMDefense` (it has
    `decisions`) whose resistance thresholds cannot flag, so that only its gates decide."""
    return callable(getattr(defense, "decisions", None)) and not resistance_can_flag(defense)


_BUDGET_RULE = ("first of the budgets with VAL verdict agreement >= {cfg.min_budget_agreement:g} "
                "and |AUC change| <= {cfg.max_budget_auc_change:g} on every attack, the change's "
                "{cfg.budget_auc_level:g} paired-bootstrap interval included, else the full "
                "budget")
_BUDGET_RULE_NO_FLAG = ("first of the budgets with VAL verdict agreement >= "
                        "{cfg.min_budget_agreement:g}, else the full budget (every θr < 0: the "
                        "resistance cannot flag, so the verdicts cannot depend on the budget and "
                        "the AUC condition is not applied)")
