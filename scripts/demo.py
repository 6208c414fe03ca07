"""The main job: FM-Defense on clean Fashion-MNIST test images and their FGSM versions.

    python scripts/demo.py [--model saved_models/fmnist] [--n 200] [--eps 0.3]
        [--figure results/demo.png] [--seed 0]

Loads the shipped `fmd.keras`, takes the first --n CLE images of the paper split, attacks the
classifier with FGSM (L∞ eps; the attacker does not know the defense, as in the paper), runs the
defense on both sets, prints verdict counts and accuracies, and writes a PNG with input / morphs
of one code / purified image.
"""

from __future__ import annotations

import argparse
import os
import sys


class UsageError(Exception):
    """Printed without a traceback; exit status 2."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="saved_models/fmnist", help="directory holding fmd.keras")
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figure", default="results/demo.png")
    args = p.parse_args(argv)
    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    if not 0.0 < args.eps <= 1.0:
        raise UsageError(f"--eps must be in (0, 1], got {args.eps}")
    if not os.path.isfile(os.path.join(args.model, "fmd.keras")):
        raise UsageError(
            f"{os.path.join(args.model, 'fmd.keras')} not found; train it with "
            "`python scripts/train.py --dataset fmnist` or pass --model"
        )
    return args


def defended_accuracy(out, y, adversarial: bool) -> float:
    """Clean: final label correct. Adversarial: rejected or final label correct."""
    import numpy as np

    correct = out["label"] == y
    if adversarial:
        correct |= out["verdict"] == 2
    return float(np.mean(correct))


def run(args) -> dict:
    import keras
    import numpy as np

    import fmd_tf  # noqa: F401
    from fmd_tf import plots
    from fmd_tf.attacks import fgsm
    from fmd_tf.data import paper_splits

    fmd = keras.models.load_model(os.path.join(args.model, "fmd.keras"))
    splits = paper_splits(args.dataset, args.seed)
    x, y = splits.x_cle[: args.n], splits.y_cle[: args.n]
    x_adv = fgsm(fmd.classifier, x, eps=args.eps, y=y)
    rows = {}
    outs = {}
    for name, data, adversarial in (("clean", x, False), (f"FGSM eps={args.eps}", x_adv, True)):
        out = fmd.defend(data)
        outs[name] = out
        counts = np.bincount(out["verdict"], minlength=3) / len(data)
        rows[name] = {
            "passed": counts[0], "purified": counts[1], "rejected": counts[2],
            "accuracy without defense": float(np.mean(out["classifier_label"] == y)),
            "accuracy with FM-Defense": defended_accuracy(out, y, adversarial),
            "mean resistance": float(out["resistance"].mean()),
        }
    names = list(rows)
    print(f"\nFM-Defense on {args.n} Fashion-MNIST CLE test images ({args.model}/fmd.keras)")
    print(f"{'':28s}" + "".join(f"{n:>18s}" for n in names))
    for key in rows[names[0]]:
        print(f"{key:28s}" + "".join(f"{rows[n][key]:18.3f}" for n in names))
    print("(adversarial inputs count as defended when rejected or relabelled correctly)")

    code = int(np.argmin(outs[names[1]]["resistance"][0]))
    code = fmd.selected_codes[code]
    panel = []
    for name, data in ((names[0], x), (names[1], x_adv)):
        out = outs[name]
        morph = fmd.morph_images(data[:1], code, count=8)[0]
        verdict = ["passed", "purified", "rejected"][out["verdict"][0]]
        caption = f"{verdict}, label {out['label'][0]} (true {y[0]})"
        panel.append((name, data[0], morph, out["purified"][0], caption))
    os.makedirs(os.path.dirname(args.figure) or ".", exist_ok=True)
    plots.defense_panel(panel, args.figure, title=f"morphs of code z{code}")
    print(f"wrote {args.figure}")
    return rows


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
