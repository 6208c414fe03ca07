"""Performance benchmark of FM-Defense: naive loop, machine limit, attacks, serving, options.

    python scripts/bench.py [--model saved_models/fmnist] [--out results/bench.json] [--n 256]
        [--naive-n 4] [--attack-n 100] [--batch-size 64] [--sections all] [--quick]

Every figure is a measurement or a ratio of two measurements taken in this one run, on this
machine (written to --out as JSON and printed as a table):

speedup_vs_naive   FMDefense detect+purify throughput (`defend`, images/s, on --n CLE images,
                   after a warm-up batch) over a naive reference: an eager Python loop over
                   images, codes and morphs that calls decoder + classifier once per morph (same
                   maths: the §III-C search walked in Python, same table, same verdict rule). The
                   naive side is timed on the first --naive-n images only and extrapolated per
                   image (`naive_images_timed`); its resistances are compared with FMDefense's.
                   A second reference, one batched call per (image, code), is reported as well.
roofline_share     achieved FLOP/s of the defense over this machine's dense float32 matmul FLOP/s
                   (`tf.linalg.matmul` of two SxS matrices, S = 2048, best of a few, FLOPs 2·S³).
                   FLOPs are counted from the op shapes of the traced decoder+classifier graph
                   (batch 1): MatMul 2·M·K·N, Conv2D 2·(output elements)·kh·kw·C_in, transposed
                   conv (Conv2DBackpropInput) 2·(input elements)·kh·kw·C_out, i.e. multiply-adds
                   x 2; bias adds, activations and pooling are not counted. Per image: m·N morphs
                   x (decoder + classifier) + the image's own classifier, encoder, DGMM and
                   purification pass. Chunk padding is not counted (useful FLOPs only).
attack_speedup_vs_art  own DeepFool and C&W-L2 (fmd_tf.attacks) vs ART's on the same --attack-n
                   images, same nominal hyper-parameters, ART's TensorFlowV2Classifier around the
                   Keras classifier; success = the classifier's label changes; own attacks timed
                   warm (after a first, tracing run, also reported). Skipped with a note when
                   either side is not importable. --art-attacks deepfool reruns DeepFool only
                   and carries C&W over from the existing --out file (ART's C&W takes ~25 min).
serving_latency    p50 / p99 of the exported SavedModel's `serving_default` signature
                   (`fmd_tf.export.export_serving` to a temp dir, `tf.saved_model.load`), batch 1
                   and batch 64, after warm-up calls.
adaptive_budget    the same defense with `adaptive_budget=True`: mean morphs per image (vs m·N),
                   ROC AUC clean vs FGSM (eps 0.3, same images; score max_i(θr_i - r_i)) of the
                   adaptive and the full-budget detector, verdict agreement, throughput ratio;
                   under `refined` the same with `adaptive_refine_codes` = --adaptive-refine
                   (each image's K deciding codes finished to all N morphs); both draw the
                   morphs in the default shuffled order, and `refined_search_order` repeats
                   `refined` with `adaptive_order="search"` (smallest radius first).
bfloat16_vs_float32  `morph_dtype="bfloat16"` vs float32: throughput ratio (timed back to back)
                   and agreement of verdicts / resistances on the clean and FGSM images.
peak_rss_mib       resource.getrusage peak resident memory of this process.

With a subset of --sections and an existing --out of the same model file (fmd.keras SHA-256,
`settings.fmd_sha256`) and sizes, the other sections are kept from that file (listed in
`carried_over`; each measured section has its own `measured_at` time): ratios are always taken
within one section of one run.

XLA (`jit_compile`) is used only when a GPU is visible (FMDefense's default). --quick shrinks
everything (a smoke test, e.g. on the `scripts/train.py --quick` model); the defaults are the
full-size benchmark. Exit status 2 (no traceback) for a missing model or data set.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from fmd_tf.cli import UsageError, run_cli, usage_errors
from fmd_tf.evaluation import bench
from fmd_tf.evaluation.bench import SECTIONS
from fmd_tf.evaluation.bench import file_sha256 as _file_sha256  # noqa: F401  (tests)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="saved_models/fmnist", help="directory holding fmd.keras")
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--out", default="results/bench.json")
    p.add_argument("--n", type=int, default=256, help="CLE images for the throughput figures")
    p.add_argument("--naive-n", type=int, default=4, help="images timed by the naive loop")
    p.add_argument("--attack-n", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eps", type=float, default=0.3, help="FGSM L∞ budget (adaptive, bf16)")
    p.add_argument("--adaptive-round", type=int, default=10)
    p.add_argument("--adaptive-alpha", type=float, default=0.01)
    p.add_argument("--adaptive-refine", type=int, default=1,
                   help="adaptive_refine_codes of the `refined` adaptive-budget variant")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--latency-reps", type=int, nargs=2, default=(50, 10), metavar=("B1", "B64"),
                   help="timed serving calls at batch 1 and batch 64")
    p.add_argument("--cw-iterations", type=int, default=100)
    p.add_argument("--cw-search-steps", type=int, default=5)
    p.add_argument("--df-iterations", type=int, default=50)
    p.add_argument("--art-attacks", default="deepfool,cw",
                   help="attacks section: which of deepfool,cw to time against ART (one left "
                        "out is carried over from an existing --out file)")
    p.add_argument("--sections", default="all", help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(bench.quick_sizes(vars(args)))
    sections = SECTIONS if args.sections == "all" else tuple(
        s.strip() for s in args.sections.split(",") if s.strip())
    args.sections = sections
    args.art_attacks = tuple(a.strip() for a in args.art_attacks.split(",") if a.strip())
    if not os.path.isfile(os.path.join(args.model, "fmd.keras")):
        raise UsageError(
            f"{os.path.join(args.model, 'fmd.keras')} not found; train it with "
            "`python scripts/train.py --dataset fmnist` (or --quick) or pass --model"
        )
    args.latency_reps = tuple(args.latency_reps)
    with usage_errors(ValueError):  # BenchConfig checks every value (sections, sizes, ...)
        args.config = bench.BenchConfig(**{f.name: getattr(args, f.name)
                                           for f in dataclasses.fields(bench.BenchConfig)})
    return args


def _earlier_sections(args, keys) -> dict:
    """`bench.earlier_sections` of --out for parsed arguments; UsageError when it holds a bench
    of other settings or another fmd.keras (`args.fmd_sha256`)."""
    with usage_errors(ValueError):
        return bench.earlier_sections(args.out, vars(args), keys)


def run(args) -> dict:
    cfg = args.config
    with usage_errors():  # not calibrated, too few CLE images, an --out of other settings
        ctx = bench.prepare(cfg)
    report = bench.measure(ctx)
    print(bench.format_table(report))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    sys.exit(run_cli(run, parse_args))
