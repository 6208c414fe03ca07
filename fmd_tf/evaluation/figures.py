"""Report figures of `scripts/evaluate.py` (paper Fig. 1, 4, 5, 6 and ROC curves)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fmd_tf.defense import calibration  # noqa: E402
from fmd_tf.evaluation import metrics  # noqa: E402
from fmd_tf.files import atomic_path  # noqa: E402


def _save(fig, path):
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def resistance_histograms(mean_resistance: dict, path: str) -> None:
    """Fig. 1: histogram of each image's mean resistance, clean vs each attack."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, 1, 26)
    for name, values in mean_resistance.items():
        ax.hist(values, bins=bins, alpha=0.45, label=name, density=True)
    ax.set_xlabel("mean resistance over the selected codes")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    ax.set_title("Resistance: clean vs adversarial (Fig. 1)")
    _save(fig, path)


def detection_vs_unified_threshold(r_clean, r_attacks: dict, path: str) -> None:
    """Fig. 4 (row 1): detection accuracy vs one unified resistance threshold."""
    grid = np.linspace(0, 1, 51)
    min_clean = r_clean.min(axis=1)
    fig, axes = plt.subplots(1, len(r_attacks), figsize=(3.2 * len(r_attacks), 3), squeeze=False)
    for ax, (name, r_adv) in zip(axes[0], r_attacks.items(), strict=True):
        min_adv = r_adv.min(axis=1)
        adv = [np.mean(min_adv <= t) for t in grid]
        clean = [np.mean(min_clean > t) for t in grid]
        overall = [(a * len(min_adv) + c * len(min_clean)) / (len(min_adv) + len(min_clean))
                   for a, c in zip(adv, clean, strict=True)]
        ax.plot(grid, adv, label="Adv")
        ax.plot(grid, clean, label="Clean")
        ax.plot(grid, overall, label="Overall")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("unified threshold θr")
    axes[0, 0].set_ylabel("detection accuracy")
    axes[0, 0].legend(fontsize=7)
    _save(fig, path)


def detection_vs_rho(r_val, r_clean, r_attacks: dict, num_morphs: int, mode: str,
                     path: str) -> None:
    """Fig. 4 (row 2): detection accuracy vs ρ (thresholds calibrated on VAL for each ρ)."""
    rhos = np.array([0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999])
    fig, axes = plt.subplots(1, len(r_attacks), figsize=(3.2 * len(r_attacks), 3), squeeze=False)
    thetas = [calibration.resistance_thresholds(r_val, rho, mode, num_morphs) for rho in rhos]
    clean = [1 - calibration.false_positive_rate(r_clean, t) for t in thetas]
    for ax, (name, r_adv) in zip(axes[0], r_attacks.items(), strict=True):
        adv = [calibration.false_positive_rate(r_adv, t) for t in thetas]
        ax.plot(np.arange(len(rhos)), adv, marker="o", label="Adv")
        ax.plot(np.arange(len(rhos)), clean, marker="o", label="Clean")
        ax.set_xticks(np.arange(len(rhos)), [str(r) for r in rhos], rotation=60, fontsize=6)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(f"ρ ({mode} thresholds)")
    axes[0, 0].set_ylabel("detection accuracy")
    axes[0, 0].legend(fontsize=7)
    _save(fig, path)


def purification_vs_eta(curves: dict, path: str) -> None:
    """Fig. 5: purification recall and final accuracy vs η. curves[name] = dict of lists."""
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3), squeeze=False)
    for ax, (name, c) in zip(axes[0], curves.items(), strict=True):
        for key in ("adversarial_recall", "clean_recall", "paper_final_accuracy"):
            ax.plot(c["eta"], [np.nan if v is None else v for v in c[key]], marker=".",
                    label=key.replace("_", " "))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("η")
        ax.set_ylim(0, 1.02)
    axes[0, 0].legend(fontsize=6)
    _save(fig, path)


def purified_grid(rows: dict, path: str, count: int = 8) -> None:
    """Fig. 6: for each set, inputs (top) and their purified reconstructions (bottom)."""
    fig, axes = plt.subplots(2 * len(rows), count, figsize=(count * 0.8, len(rows) * 1.8),
                             squeeze=False)
    for k, (name, (images, purified)) in enumerate(rows.items()):
        for j in range(count):
            for r, src in enumerate((images, purified)):
                ax = axes[2 * k + r, j]
                ax.set_xticks([])
                ax.set_yticks([])
                if j < len(src):
                    ax.imshow(src[j, ..., 0], cmap="gray", vmin=0, vmax=1)
        axes[2 * k, 0].set_ylabel(name, fontsize=6)
        axes[2 * k + 1, 0].set_ylabel("purified", fontsize=6)
    _save(fig, path)


def roc_curves(scores: dict, path: str) -> None:
    """ROC per attack: scores[attack][defense] = (clean scores, adversarial scores)."""
    fig, axes = plt.subplots(1, len(scores), figsize=(3.2 * len(scores), 3.2), squeeze=False)
    for ax, (attack, by_defense) in zip(axes[0], scores.items(), strict=True):
        for defense, (neg, pos) in by_defense.items():
            fpr, tpr = metrics.roc_curve(neg, pos)
            ax.plot(fpr, tpr, label=f"{defense} (AUC {metrics.roc_auc(neg, pos):.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.5)
        ax.set_title(attack, fontsize=9)
        ax.set_xlabel("false-positive rate (clean)")
        ax.legend(fontsize=6, loc="lower right")
    axes[0, 0].set_ylabel("true-positive rate")
    _save(fig, path)
