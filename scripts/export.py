"""Export the trained FM-Defense as a TensorFlow Serving SavedModel.

    python scripts/export.py [--model saved_models/fmnist/fmd.keras]
        [--out saved_models/fmnist/serving] [--version N] [--overwrite] [--xla]
        [--exposure full|decision]

Writes --out/<version>/ (TF Serving layout; `serving/docker-compose.yml` mounts --out at
/models/fmd) with the signatures serving_default (full defense), classify, detect and purify,
each taking `images` float32 [None, 28, 28, 1] in [0, 1], and prints them; with `--exposure
decision` only serving_default with `label` and `verdict` (a public endpoint: score-based
attacks need the other outputs). An existing version is never replaced without --overwrite.
--xla compiles the morph search with XLA: only for a GPU server (it was ~3x slower on CPU).
See `fmd_tf/export.py` for details.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from fmd_tf.cli import UsageError, run_cli, usage_errors


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="saved_models/fmnist/fmd.keras",
                   help="calibrated FMDefense .keras file")
    p.add_argument("--out", default="saved_models/fmnist/serving",
                   help="TF Serving base path; the model goes to OUT/VERSION")
    p.add_argument("--version", type=int, default=1, help="model version (positive integer)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/VERSION")
    p.add_argument("--xla", action="store_true",
                   help="XLA-compile the morph search (GPU servers only)")
    p.add_argument("--exposure", default="full",
                   help="what the endpoint reveals (fmd_tf.export.EXPOSURES): full (the four "
                        "signatures) or decision (serving_default with label and verdict only: "
                        "a public endpoint, no scores for score-based attacks)")
    args = p.parse_args(argv)
    if args.version < 1:
        raise UsageError(f"--version must be a positive integer, got {args.version}")
    target = os.path.join(args.out, str(args.version))
    if os.path.exists(target) and not args.overwrite:
        raise UsageError(
            f"{target} already exists; pass --overwrite to replace it or choose another --version"
        )
    if not os.path.isfile(args.model):
        raise UsageError(
            f"model file {args.model} not found; train it with `python scripts/train.py` or pass "
            "--model PATH/fmd.keras"
        )
    if not args.model.endswith(".keras"):
        raise UsageError(f"--model must be a .keras file, got {args.model}")
    from fmd_tf.loading import check_model_file

    with usage_errors():  # damaged, changed since training, newer format: before TensorFlow
        check_model_file(args.model)
    return args


def run(args) -> str:
    from fmd_tf.defense import NotCalibratedError
    from fmd_tf.export import describe_signatures, export_serving
    from fmd_tf.loading import CARD, load_defense, record_artifacts

    with usage_errors():  # an unregistered class, not a defense
        fmd = load_defense(args.model, verify=False)  # checked in parse_args
    if args.xla and not fmd._xla_compatible():  # XLA needs fixed shapes
        fmd = fmd.copy_with(**fmd.XLA_OPTIONS)
        print(f"--xla: exporting with {fmd.XLA_OPTIONS} (the default budget and the checked "
              "reduced-precision morphs have data-dependent shapes)")
    try:
        path = export_serving(fmd, args.out, version=args.version, overwrite=args.overwrite,
                              jit_compile=args.xla, exposure=args.exposure)
    except (NotCalibratedError, FileExistsError, ValueError) as e:
        raise UsageError(str(e)) from None
    except OSError as e:  # e.g. --out not writable
        raise UsageError(f"cannot write {args.out}: {e}") from None
    print(f"wrote {path}" + (" (XLA)" if args.xla else ""))
    model_dir = os.path.dirname(os.path.abspath(args.model))
    if os.path.isfile(os.path.join(model_dir, CARD)) and \
            os.path.dirname(os.path.abspath(args.out)) == model_dir:  # the model's own serving/
        record_artifacts(model_dir, [os.path.relpath(os.path.abspath(path), model_dir)])
        print(f"recorded its SHA-256 in {os.path.join(model_dir, CARD)}")
    for name, sig in describe_signatures(path).items():
        print(f"signature {name!r}:")
        for kind in ("inputs", "outputs"):
            for key, (dtype, shape) in sig[kind].items():
                dims = "?" if shape is None else "[" + ", ".join(
                    "None" if d < 0 else str(d) for d in shape) + "]"
                print(f"  {kind[:-1]:6s} {key:17s} {dtype:8s} {dims}")
    return path


# `main(argv) -> exit status`, for calling the script in-process (tests/test_export_serving.py).
main = functools.partial(run_cli, run, parse_args)

if __name__ == "__main__":
    sys.exit(run_cli(run, parse_args))
