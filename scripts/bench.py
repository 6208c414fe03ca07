"""Performance benchmark of FM-Defense: naive loop, machine limit, attacks, serving, options.

    python scripts/bench.py [--model saved_models/fmnist] [--out results/bench.json] [--n 256]
        [--sections speed,roofline,...] [--quick] [...]   (--help lists every option)

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
                   (`fmd_tf.export.export_serving` to a temp dir), batch 1 and batch 64, after a
                   warm-up call, in this process (`tf.saved_model.load`) and over gRPC through
                   the local PredictionService server (`fmd_tf.serving.local_server`), for the
                   full budget (all morphs in float32, "before") and the default path
                   ("after"), with their ratios; for a model whose resistance cannot flag
                   (the robust mode) also its decision export, the gates only
                   (`export.py --exposure decision`), with its ratios to the default path.
default_inference  the model's default inference path as shipped (fmd.keras: the morph budget its
                   training chose on VAL, e.g. the adaptive budget, and its morph dtype) against
                   the full budget (all m·N morphs in float32) on --default-n CLE images and
                   their FGSM versions (eps 0.3): throughput ratio, verdict agreement, ROC AUC
                   of the resistance score max_i(θr_i - r_i) of both and its change, morphs
                   per image, and the top op types by self time of one batch under tf.profiler.
bfloat16_vs_float32  the morph pass in bfloat16 vs float32, unchecked (`morph_check_margin=0`)
                   and checked (close calls classified again in float32; `checked`):
                   throughput ratios (timed back to back), morph outcomes that differ from
                   float32's, agreement of verdicts / resistances on the clean and FGSM images.
xla_on_off         XLA off and on (`jit_compile`) for the full budget's graph on the device
                   TensorFlow uses (a GPU where one is visible: the GPU row; else the CPU):
                   images/s at --batch-size, batch-1 latency, verdict agreement; the shipped
                   default path beside them (data-dependent shapes: never XLA-compiled).
serving_load       the exported model behind the local PredictionService / REST server under
                   load: --load-clients concurrent clients, --load-requests requests (10 %
                   malformed) over gRPC and over REST, server-side batching off and on; every
                   answer checked against FMDefense in process, every bad request
                   INVALID_ARGUMENT; p50 / p99 latency, requests/s, resident-memory growth.
demo_wall          wall time of `scripts/demo.py --n --demo-n` in a new process (imports, model,
                   data, FGSM, defense, figure) with the default path and with --budget full.
test_suite         wall time of `python -m pytest -q` (what `make test` runs) in a new process.
training           full training from scratch: wall time and accuracies of the model card
                   --training-card (a `scripts/train.py --dataset fmnist` run, scaled by the
                   peak that run measured before and after itself); and, side by side here, the
                   changes it rests on: classifier steps in float32 vs mixed_bfloat16, combo-VAE
                   steps with the frozen DGMM's and classifier's outputs computed in the loss vs
                   precomputed, one morph-budget trial run on the model vs replayed on the full
                   budget's morph outcomes (checked identical).
feature_map_celeba_size  the paper's CelebA model at CelebA's size (64x64x3, 1,000 identities,
                   `--latent feature_map`), untrained weights (timing only): ms per classifier
                   and combo-VAE step, and the full-budget defense's images/s on
                   --feature-map-n images.
peak_rss_mib       resource.getrusage peak resident memory of this process.

Machines of this kind differ up to 3x in speed: the float32 matmul peak of this machine is
measured first (`device.matmul_peak_flops`) and every wall time is also given at the reference
peak of 220 GFLOP/s (`seconds_at_reference_peak` = seconds x peak / 220 GFLOP/s).

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
from fmd_tf.evaluation.bench import file_sha256 as _file_sha256  # noqa: F401  (tests)
from fmd_tf.options import add_arguments, apply_arguments, option_help


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(p, bench.BenchConfig)
    p.add_argument("--quick", action="store_true",
                   help=option_help(bench.BenchConfig, "quick"))
    args = p.parse_args(argv)
    with usage_errors(ValueError):  # BenchConfig checks every value (sections, sizes, ...)
        cfg = dataclasses.replace(apply_arguments(bench.BenchConfig(), args), quick=args.quick)
        if cfg.quick:
            cfg = dataclasses.replace(cfg, **bench.quick_sizes(dataclasses.asdict(cfg)))
    if not os.path.isfile(os.path.join(cfg.model, "fmd.keras")):
        raise UsageError(
            f"{os.path.join(cfg.model, 'fmd.keras')} not found; train it with "
            "`python scripts/train.py --dataset fmnist` (or --quick) or pass --model"
        )
    vars(args).update(dataclasses.asdict(cfg))
    args.config = cfg
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
