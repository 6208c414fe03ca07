"""The demo: FM-Defense on clean CLE images and their FGSM versions (`scripts/demo.py`).

    from fmd_tf.evaluation.demo import format_rows, run_demo
    rows = run_demo("saved_models/fmnist", n=200, figure="results/demo.png")
    print(format_rows(rows, 200, "saved_models/fmnist"))

FGSM attacks the classifier alone (the attacker does not know the defense, as in the paper);
an adversarial input counts as defended when rejected or relabelled correctly.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["BUDGETS", "format_rows", "run_demo"]


BUDGETS = ("default", "full")


def run_demo(model_dir: str, dataset: str = "fmnist", n: int = 200, eps: float = 0.3,
             seed: int = 0, figure: str | None = None, budget: str = "default",
             verbose: int = 0) -> dict:
    """{set name: {figure name: value}} of `model_dir`/fmd.keras on the first `n` CLE images
    ("clean") and their FGSM versions at L∞ `eps` ("FGSM eps=<eps>"): verdict shares,
    accuracies without and with the defense, mean resistance. With `figure`, also a PNG of
    one image of each set, its morphs along one code and its purified version.

    `budget`: "default" runs the model as saved (its morph budget and morph dtype); "full" draws
    all N morphs of every code in float32 (`FMDefense.FULL_BUDGET`, the paper's path).
    `verbose` shows a progress bar per set."""
    from fmd_tf.attacks import fgsm
    from fmd_tf.data import paper_splits
    from fmd_tf.evaluation.metrics import defended_accuracy
    from fmd_tf.loading import load_defense

    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    fmd = load_defense(model_dir)
    if budget == "full":
        fmd = fmd.copy_with(**fmd.FULL_BUDGET)
    splits = paper_splits(dataset, seed)
    x, y = splits.x_cle[:n], splits.y_cle[:n]
    x_adv = fgsm(fmd.classifier, x, eps=eps, y=y)
    rows, outs, sets = {}, {}, {}
    for name, data, adversarial in (("clean", x, False), (f"FGSM eps={eps}", x_adv, True)):
        if verbose:
            print(f"{name}: {len(data)} images", flush=True)
        out = outs[name] = fmd.defend(data, verbose=verbose)
        sets[name] = data
        counts = np.bincount(out["verdict"], minlength=3) / len(data)
        rows[name] = {
            "passed": float(counts[0]), "purified": float(counts[1]),
            "rejected": float(counts[2]),
            "accuracy without defense": float(np.mean(out["classifier_label"] == y)),
            "accuracy with FM-Defense": defended_accuracy(out["label"], out["verdict"], y,
                                                          adversarial),
            "mean resistance": float(out["resistance"].mean()),
        }
    if figure:
        _panel(fmd, sets, outs, y, figure)
    return rows


def _panel(fmd, sets: dict, outs: dict, y, path: str) -> None:
    """Input / morphs of the code the first adversarial image resists least / purified image,
    of the first image of each set."""
    from fmd_tf import plots

    adv_name = list(outs)[1]
    code = fmd.selected_codes[int(np.argmin(outs[adv_name]["resistance"][0]))]
    panel = []
    for name, data in sets.items():
        out = outs[name]
        morph = fmd.morph_images(data[:1], code, count=8)[0]
        verdict = ["passed", "purified", "rejected"][out["verdict"][0]]
        caption = f"{verdict}, label {out['label'][0]} (true {y[0]})"
        panel.append((name, data[0], morph, out["purified"][0], caption))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    plots.defense_panel(panel, path, title=f"morphs of code z{code}")


def format_rows(rows: dict, n: int, model_dir: str) -> str:
    """The printed table of `run_demo`'s rows (one column per set)."""
    names = list(rows)
    lines = ["", f"FM-Defense on {n} Fashion-MNIST CLE test images ({model_dir}/fmd.keras)",
             f"{'':28s}" + "".join(f"{name:>18s}" for name in names)]
    lines += [f"{key:28s}" + "".join(f"{rows[name][key]:18.3f}" for name in names)
              for key in rows[names[0]]]
    lines.append("(adversarial inputs count as defended when rejected or relabelled correctly)")
    return "\n".join(lines)
