"""Threshold calibration on clean validation data (paper §III-C "threshold selection", §III-D).

Decision rule. An input with resistance vector r ∈ [0, 1]^m is *normal* iff r(i) > θr(i) for
every selected code i, otherwise *suspicious*. Resistances are multiples of 1/N, so every
threshold is placed half-way between two grid values; r(i) = θr(i) never happens.

Calibration of θr (clean VAL resistances R [n, m], target ρ, FPR budget f = 1 - ρ):

* ``unified``: one θ for all codes, the largest half-grid value such that the share of VAL
  images with min_i r(i) <= θ is at most f.
* ``per_code``: for a per-code budget α, θr(i) is the largest half-grid value with
  mean(R[:, i] <= θr(i)) <= α. α is the largest k/n (k = 0, 1, ...) whose *joint* VAL
  false-positive rate (any code flagged) is at most f. The joint rate, not each code's, meets
  the budget.

Distance (Eq. 5): Dis(r, θr) = Σ_i max(θr(i) - r(i), 0).

Reconstruction gate (not in the paper, off when `recon_fpr` = 0): an input whose
reconstruction error e(x) = mean(|x - decoder(μs(x) ‖ zu(x))|) (`FMDefense.recon_metric` "mae";
"mse" squares the difference instead; "pixel_share" is the share of pixels with
|x - x̂| > τ) exceeds θe is rejected whatever its resistance, as far from the combo-VAE's
manifold. θe is the smallest VAL error value such that at most ⌊recon_fpr·n⌋ clean VAL images
have e > θe; with a discrete error (pixel_share: multiples of 1/pixels) ties at θe can make the
VAL rejection rate smaller than the budget, never larger. The clean false-positive
budget of the whole defense is then at most (1 - ρ) + recon_fpr.

Classifier-margin gate (not in the paper, off when `margin_fpr` = 0): an input whose logit
margin m(x) = Z_(1)(x) - Z_(2)(x) (top-1 minus top-2 logit of the classifier) is below θm is
rejected whatever its resistance. θm is the smallest VAL margin such that at most
⌊margin_fpr·n⌋ clean VAL images have m < θm. With both gates the clean budget is at most
(1 - ρ) + recon_fpr + margin_fpr.

θd (η-fractile rule): the η-quantile (linear interpolation) of Dis over the suspicious VAL
images. With ρ = 0.999 and 2,000 VAL images at most two are suspicious, too few for a
fractile; when fewer than `min_suspicious` are suspicious, the same rule is applied with the
looser reference thresholds calibrated at `eta_reference_rho` (default 0.9), i.e. θd is the
η-quantile of how far clean images fall below the 90 %-thresholds.
"""

from __future__ import annotations

import numpy as np

THRESHOLD_MODES = ("per_code", "unified")


def _threshold_below(sorted_values: np.ndarray, allowed: int, num_morphs: int) -> float:
    """Largest half-grid threshold flagging at most `allowed` of the sorted values."""
    half = 0.5 / num_morphs
    if allowed >= len(sorted_values):
        return 1.0 + half
    return float(sorted_values[allowed] - half)


def resistance_thresholds(
    resistance: np.ndarray, rho: float, mode: str = "per_code", num_morphs: int = 100
) -> np.ndarray:
    """θr [m] so that the clean false-positive rate on `resistance` [n, m] is at most 1 - rho."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {mode!r}")
    r = np.asarray(resistance, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] == 0:
        raise ValueError(f"resistance must be a non-empty [n, m] array, got shape {r.shape}")
    n, m = r.shape
    budget = int(np.floor((1.0 - rho) * n + 1e-9))
    if mode == "unified":
        theta = _threshold_below(np.sort(r.min(axis=1)), budget, num_morphs)
        return np.full(m, theta, dtype=np.float32)
    columns = np.sort(r, axis=0)
    best = np.array([_threshold_below(columns[:, i], 0, num_morphs) for i in range(m)])
    for allowed in range(1, budget + 1):
        theta = np.array([_threshold_below(columns[:, i], allowed, num_morphs) for i in range(m)])
        if false_positive_rate(r, theta) > budget / n:
            break
        best = theta
    return best.astype(np.float32)


def is_suspicious(resistance: np.ndarray, theta_r: np.ndarray) -> np.ndarray:
    """[n] bool: some code's resistance is not above its threshold."""
    return np.any(np.asarray(resistance) <= np.asarray(theta_r)[None, :], axis=1)


def false_positive_rate(resistance: np.ndarray, theta_r: np.ndarray) -> float:
    """Share of (clean) rows flagged suspicious."""
    return float(np.mean(is_suspicious(resistance, theta_r)))


def distance(resistance: np.ndarray, theta_r: np.ndarray) -> np.ndarray:
    """Eq. 5: Dis(r, θr) = Σ_i max(θr(i) - r(i), 0); [n]."""
    return np.sum(np.maximum(np.asarray(theta_r)[None, :] - np.asarray(resistance), 0.0), axis=1)


def purify_threshold(theta_d, suspicious: str):
    """θd as the verdicts use it (§III-A: a suspicious input is purified iff Dis <= θd): θd
    itself when suspicious inputs are purified (`suspicious` "purify"), -inf when every one is
    rejected ("reject": no distance is <= -inf)."""
    return theta_d if suspicious == "purify" else -np.inf


def distance_threshold(
    resistance: np.ndarray,
    theta_r: np.ndarray,
    eta: float,
    mode: str = "per_code",
    num_morphs: int = 100,
    min_suspicious: int = 20,
    reference_rho: float = 0.9,
) -> tuple[float, dict]:
    """θd by the η-fractile rule of the module docstring; returns (θd, how it was chosen)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    r = np.asarray(resistance, dtype=np.float64)
    suspicious = is_suspicious(r, theta_r)
    info = {"num_suspicious_val": int(suspicious.sum()), "rule": "suspicious_val"}
    thresholds = np.asarray(theta_r)
    if suspicious.sum() < min_suspicious:
        thresholds = resistance_thresholds(r, reference_rho, mode, num_morphs)
        suspicious = is_suspicious(r, thresholds)
        info.update(rule="reference_rho", reference_rho=reference_rho,
                    num_suspicious_reference=int(suspicious.sum()))
    if not suspicious.any():
        return 0.0, info
    return float(np.quantile(distance(r[suspicious], thresholds), eta)), info


def select_codes(resistance: np.ndarray, num_codes: int) -> np.ndarray:
    """Indices of the `num_codes` codes with the highest mean clean resistance (sorted)."""
    r = np.asarray(resistance)
    if not 1 <= num_codes <= r.shape[1]:
        raise ValueError(f"num_codes must be in [1, {r.shape[1]}], got {num_codes}")
    return np.sort(np.argsort(-r.mean(axis=0), kind="stable")[:num_codes])


def recon_threshold(errors: np.ndarray, fpr: float) -> float:
    """θe of the reconstruction gate: at most ⌊fpr·n⌋ of the clean `errors` [n] exceed it.

    `fpr` = 0 disables the gate (θe = +inf).
    """
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"recon_fpr must be in [0, 1), got {fpr}")
    e = np.sort(np.asarray(errors, dtype=np.float64).reshape(-1))[::-1]
    if e.size == 0:
        raise ValueError("errors must be non-empty")
    if fpr == 0.0:
        return float("inf")
    return float(e[int(np.floor(fpr * e.size + 1e-9))])


def logit_margin(logits):
    """m(x) = Z_(1) - Z_(2), the top-1 minus the top-2 logit [B] of `logits` [B, K] (a tensor
    or an array; K >= 2): the classifier-margin gate's score (low = unsure)."""
    import tensorflow as tf

    top = tf.math.top_k(tf.convert_to_tensor(logits, tf.float32), k=2).values
    return top[:, 0] - top[:, 1]


def margin_threshold(margins: np.ndarray, fpr: float) -> float:
    """θm of the classifier-margin gate: at most ⌊fpr·n⌋ of the clean `margins` [n] are below
    it (an input is rejected iff m(x) < θm). `fpr` = 0 disables the gate (θm = -inf).

    The reconstruction gate's rule on -m: m < θm iff -m > -θm."""
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"margin_fpr must be in [0, 1), got {fpr}")
    if np.size(margins) == 0:
        raise ValueError("margins must be non-empty")
    return -recon_threshold(-np.asarray(margins, dtype=np.float64), fpr)
