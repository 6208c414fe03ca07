"""Check a model directory against its model card, or record its checksums.

    python scripts/verify_model.py [--model saved_models/fmnist] [--record]

Compares the SHA-256 of every artifact the card (MODEL/model_card.json) records with the file
(fmd.keras, combo_vae.keras, classifier.keras, each SavedModel version serving/N, ...) and loads
MODEL/fmd.keras with `fmd_tf.load_defense`; exit status 2 with the reason when something is
missing, damaged or not the file the card describes. --record writes the checksums of the
artifacts present into the card instead (for a card written before checksums existed, or after
you changed a file on purpose).
"""

from __future__ import annotations

import argparse
import os
import sys

from fmd_tf.cli import DEFAULT_MODEL, UsageError, run_cli, usage_errors


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model directory (holding model_card.json)")
    p.add_argument("--record", action="store_true",
                   help="record the artifacts' checksums in the card instead of checking them")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, "model_card.json")):
        raise UsageError(f"{args.model} holds no model_card.json")
    return args


def run(args) -> dict:
    from fmd_tf.loading import load_defense, record_artifacts, verify_artifacts

    if args.record:
        records = record_artifacts(args.model)
        for name, record in sorted(records.items()):
            print(f"recorded {name}: sha256 {record['sha256']} ({record['bytes']} bytes)")
        return records
    with usage_errors():
        checked = verify_artifacts(args.model)
        if not checked:
            raise UsageError(f"{args.model}/model_card.json records no checksums: run "
                             "with --record to add them")
        for name in sorted(checked):
            print(f"ok {name}")
        if os.path.isfile(os.path.join(args.model, "fmd.keras")):
            load_defense(args.model, verify=False)  # verified above
            print("ok fmd.keras loads")
    return checked


if __name__ == "__main__":
    sys.exit(run_cli(run, parse_args))
