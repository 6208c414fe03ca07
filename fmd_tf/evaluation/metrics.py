"""Evaluation metrics of the paper's §IV and of the report schema (pure numpy).

Conventions: verdict 0 passed, 1 purified, 2 rejected; final label -1 when rejected.
"""

from __future__ import annotations

import numpy as np

VERDICT_PASSED, VERDICT_PURIFIED, VERDICT_REJECTED = 0, 1, 2


def roc_auc(scores_negative: np.ndarray, scores_positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count 1/2); positives should score high."""
    neg = np.asarray(scores_negative, np.float64).ravel()
    pos = np.asarray(scores_positive, np.float64).ravel()
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError("roc_auc needs at least one negative and one positive score")
    _, inverse, counts = np.unique(np.concatenate([neg, pos]), return_inverse=True,
                                   return_counts=True)
    # 1-based rank of each distinct value, averaged over its ties
    mean_rank = np.cumsum(counts) - 0.5 * (counts - 1)
    rank_sum = mean_rank[inverse[len(neg):]].sum()
    return float((rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def paired_auc_change_interval(neg_a, pos_a, neg_b, pos_b, level: float = 0.95,
                               resamples: int = 200, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of roc_auc(neg_b, pos_b) - roc_auc(neg_a, pos_a).

    a and b are two scores of the same images (row i of neg_a and neg_b is one negative
    image, likewise for pos), so each resample draws the negatives and the positives with
    replacement once and scores both a and b on that draw (a paired bootstrap). Returns the
    (1 - level) / 2 and (1 + level) / 2 quantiles of the `resamples` differences.
    """
    neg_a, neg_b, pos_a, pos_b = (np.asarray(v, np.float64).ravel()
                                  for v in (neg_a, neg_b, pos_a, pos_b))
    if neg_a.shape != neg_b.shape or pos_a.shape != pos_b.shape:
        raise ValueError("a and b must score the same images (equal lengths)")
    if not 0.0 < level < 1.0 or resamples < 1:
        raise ValueError(f"need 0 < level < 1 and resamples >= 1, got {level}, {resamples}")
    rng = np.random.default_rng(seed)
    changes = []
    for _ in range(resamples):
        i = rng.integers(0, len(neg_a), len(neg_a))
        j = rng.integers(0, len(pos_a), len(pos_a))
        changes.append(roc_auc(neg_b[i], pos_b[j]) - roc_auc(neg_a[i], pos_a[j]))
    low, high = np.quantile(changes, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def roc_curve(scores_negative, scores_positive):
    """(fpr, tpr) arrays over all thresholds, flagging score >= threshold."""
    neg = np.asarray(scores_negative, np.float64).ravel()
    pos = np.asarray(scores_positive, np.float64).ravel()
    thresholds = np.unique(np.concatenate([neg, pos, [np.inf]]))[::-1]
    fpr = np.array([np.mean(neg >= t) for t in thresholds])
    tpr = np.array([np.mean(pos >= t) for t in thresholds])
    return fpr, tpr


def tpr_at_fpr(scores_negative, scores_positive, fpr: float) -> float:
    """TPR of the detector "score > t" at the lowest threshold t whose FPR on the negatives is
    at most `fpr`: t is the (k+1)-th largest negative score, k = floor(fpr * n) (-inf when
    k >= n). Negatives tied at t are not flagged, so a score with many ties reaches a lower FPR
    (and TPR) than asked, never a higher one.

    Shapes: negatives [n], positives [p]; `fpr` in [0, 1].
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    neg = np.sort(np.asarray(scores_negative, np.float64).ravel())
    pos = np.asarray(scores_positive, np.float64).ravel()
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError("tpr_at_fpr needs at least one negative and one positive score")
    allowed = int(np.floor(fpr * len(neg) + 1e-9))  # negatives that may score above t
    threshold = -np.inf if allowed >= len(neg) else neg[len(neg) - 1 - allowed]
    return float(np.mean(pos > threshold))


def defended(label, verdict, y, adversarial: bool) -> np.ndarray:
    """bool [n] per image. Clean: final label correct. Adversarial: rejected or final label
    correct."""
    correct = np.asarray(label) == np.asarray(y)
    if adversarial:
        correct |= np.asarray(verdict) == VERDICT_REJECTED
    return correct


def defended_accuracy(label, verdict, y, adversarial: bool) -> float:
    """Share of `defended` images."""
    return float(np.mean(defended(label, verdict, y, adversarial)))


def worst_case_accuracy(clean: dict, attacked: dict, y) -> float:
    """Robust accuracy per image, worst case over attacks: the share of images whose clean
    input is defended (final label right) and every attacked version too (rejected or label
    right). `clean`, `attacked[name]`: outputs with "label" and "verdict" [n] on the same n
    images, in the same order."""
    ok = defended(clean["label"], clean["verdict"], y, False)
    for out in attacked.values():
        ok = ok & defended(out["label"], out["verdict"], y, True)
    return float(np.mean(ok))


def purification_recall(label, verdict, y) -> float | None:
    """Share of purified inputs (the salvageable set) whose final label is correct (Fig. 5)."""
    purified = np.asarray(verdict) == VERDICT_PURIFIED
    if not purified.any():
        return None
    return float(np.mean(np.asarray(label)[purified] == np.asarray(y)[purified]))


def paper_final_accuracy(clean: dict, adversarial: dict, y_clean, y_adv) -> float:
    """The paper's "final accuracy" (§IV-B2): (TP + TN + Recovered) / (|CLE| + |ADV|).

    TP: adversarial inputs rejected; TN: clean inputs passed; Recovered: purified inputs (clean
    or adversarial) whose purified label is correct. As in the paper, a passed clean image counts
    whatever its label and a passed adversarial image counts as a miss.
    """
    tp = np.sum(adversarial["verdict"] == VERDICT_REJECTED)
    tn = np.sum(clean["verdict"] == VERDICT_PASSED)
    recovered = sum(
        np.sum((out["verdict"] == VERDICT_PURIFIED) & (out["label"] == y))
        for out, y in ((clean, y_clean), (adversarial, y_adv))
    )
    return float((tp + tn + recovered) / (len(y_clean) + len(y_adv)))


def detection_rates(is_adv_clean, is_adv_attack) -> tuple[float, float]:
    """(TPR on the attack set, FPR on the clean set)."""
    return float(np.mean(is_adv_attack)), float(np.mean(is_adv_clean))
