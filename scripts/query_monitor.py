"""False-positive rate of the Blacklight query monitor (`fmd_tf.serving.query_monitor`) on
benign traffic: the VAL and CLE images of the paper's split, each sent once, in order.

    python scripts/query_monitor.py [--dataset fmnist] [--thresholds 10,15,20,25,30,35]
        [--out results/query_monitor.json]

Prints the share of each stream flagged at each threshold (the monitor's default is 25, its
other options Blacklight's MNIST values) and writes the JSON report.
"""

from __future__ import annotations

import argparse
import sys

from fmd_tf.cli import UsageError, run_cli, usage_errors


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split")
    p.add_argument("--thresholds", default="10,15,20,25,30,35",
                   help="comma-separated match thresholds to report")
    p.add_argument("--out", default="results/query_monitor.json", help="JSON report")
    args = p.parse_args(argv)
    try:
        args.thresholds = tuple(int(v) for v in args.thresholds.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--thresholds takes integers like 20,25, got "
                         f"{args.thresholds!r}") from None
    if not args.thresholds or min(args.thresholds) < 1:
        raise UsageError(f"--thresholds must be integers >= 1, got {args.thresholds}")
    return args


def run(args):
    import os

    from fmd_tf.files import write_json
    from fmd_tf.serving.query_monitor import benign_report

    with usage_errors():  # an unknown dataset, a threshold above top_k
        report = benign_report(args.dataset, args.seed, args.thresholds)
    report["command"] = "python scripts/query_monitor.py " + " ".join(sys.argv[1:])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_json(args.out, report, sort_keys=True)
    for name, stream in report["streams"].items():
        rates = ", ".join(f"{t}: {share:.4%}" for t, share in stream["flagged"].items())
        print(f"{name} ({stream['n']} clean images, one query each): flagged at threshold "
              f"{rates}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(run, parse_args))
