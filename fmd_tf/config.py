"""Frozen hyperparameter configs with the paper's defaults.

Every number that changes a result lives here (never hidden in code). `get_config(name)` returns the
per-dataset :class:`ExperimentConfig`; `quick_config(cfg)` shrinks it for tests and CI.

Paper references: §IV-A (setup: 20,000 training images, VAL 2,000, CLE 5,000, γ = 40,
λ_lkd = 0.1, 10 manipulated codes for Fashion-MNIST, N = 100 morphs per code, ρ = 99.9 %,
η = 90 %), Table I (network structures).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fmd_tf.options import OptionError, normalize, option

__all__ = [
    "ADVERSARIAL_TRAINING_DEFAULTS",
    "CHECK_IMAGES",
    "CHECK_STEPS",
    "CLASSIFIER_TRAININGS",
    "COMPUTE_DTYPES",
    "DGMM_LR_SCHEDULES",
    "DRAW_ORDERS",
    "LATENTS",
    "MASKING_RATIO",
    "PURIFY_LABELS",
    "PURIFY_ZU",
    "RECON_METRICS",
    "THRESHOLD_MODES",
    "VAE_DATA",
    "ClassifierConfig",
    "ComboVAEConfig",
    "DefenseConfig",
    "ExperimentConfig",
    "SplitConfig",
    "card_classifier_training",
    "card_split_config",
    "card_split_seed",
    "get_config",
    "quick_config",
    "split_seed",
    "to_dict",
]

# The allowed values of the string options. They live here so that the configs (and the
# command-line flags derived from them) need no TensorFlow; the modules that use them
# re-export them (fm_defense) or keep an equal tuple (calibration.THRESHOLD_MODES,
# adaptive_budget.DRAW_ORDERS, precision.COMPUTE_DTYPES; tests/test_options.py checks that they
# agree).
DGMM_LR_SCHEDULES = ("cosine", "constant")  # ComboVAEConfig.dgmm_lr_schedule
VAE_DATA = ("train", "full")  # ComboVAEConfig.vae_data
TRAIN_PRECISIONS = ("auto", "float32", "mixed_bfloat16")  # .precision, .vae_precision
CLASSIFIER_TRAININGS = ("standard", "pgd_at", "trades")  # ClassifierConfig.training
THRESHOLD_MODES = ("per_code", "unified")  # DefenseConfig.threshold_mode
PURIFY_ZU = ("encoded", "class_mean")  # DefenseConfig.purify_zu
PURIFY_LABELS = ("reconstruction", "corroborated")  # DefenseConfig.purify_label
SUSPICIOUS = ("purify", "reject")  # DefenseConfig.suspicious
RECON_METRICS = ("mae", "mse", "pixel_share")  # DefenseConfig.recon_metric
DRAW_ORDERS = ("shuffled", "search")  # DefenseConfig.adaptive_order
COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "auto")  # DefenseConfig.morph_dtype
LATENTS = ("vector", "feature_map")  # ComboVAEConfig.latent

# The APGD check of an adversarially trained classifier
# (fmd_tf.evaluation.robustness.robust_training_check, scripts/robust_val.py): the first
# CHECK_IMAGES VAL images, CHECK_STEPS steps per loss. A robust classifier keeps most of its
# clean accuracy under APGD at its training ε (published TRADES on Fashion-MNIST at L∞ 0.1:
# 72 of 91 %); one that keeps less than MASKING_RATIO of it was fooled by its own training
# attack.
CHECK_IMAGES = 500
CHECK_STEPS = 100
MASKING_RATIO = 0.5

# What ClassifierConfig.training pgd_at and trades change unless given: the recipe of the
# shipped robust classifier (docs/results.md "Robust mode"), applied by
# fmd_tf.pipeline.with_classifier_training.
ADVERSARIAL_TRAINING_DEFAULTS = {"dropout": 0.0, "epochs": 30}

# Valid ranges, as `option(check=...)` takes them.
POSITIVE_INT = (lambda v: v >= 1, "must be >= 1")
NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
POSITIVE = (lambda v: v > 0, "must be > 0")
UNIT_OPEN = (lambda v: 0.0 < v < 1.0, "must be in (0, 1)")
UNIT_LEFT_OPEN = (lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")
UNIT_RIGHT_OPEN = (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
UNIT_CLOSED = (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
POSITIVE_INTS = (lambda v: len(v) > 0 and min(v) >= 1, "must be one or more ints >= 1")


@dataclass(frozen=True)
class SplitConfig:
    """The paper's disjoint data sets (§IV-A).

    `train_size` images of the official training set train the combo-VAE. VAL and CLE are drawn
    without overlap from the official test set, which neither the classifier nor the combo-VAE
    ever sees.
    """

    train_size: int = option(20_000, "TRAIN images (official training set) of the combo-VAE",
                             check=POSITIVE_INT)
    val_size: int = option(2_000, "VAL images (official test set): calibration",
                           check=POSITIVE_INT)
    cle_size: int = option(5_000, "CLE images (official test set, disjoint from VAL): "
                           "evaluation", check=POSITIVE_INT)
    test_size: int | None = option(None, "official test images (the first ones) behind the "
                                   "model card's test figures: classifier and DGMM accuracy, "
                                   "reconstruction error and label agreement; none: all",
                                   check=POSITIVE_INT)

    def __post_init__(self):
        normalize(self)


@dataclass(frozen=True)
class ClassifierConfig:
    """Target classifier: Carlini & Wagner (2017) MNIST net, returns logits."""

    conv_filters: tuple[int, ...] = option((32, 32, 64, 64), "filters of the conv layers",
                                           check=POSITIVE_INTS)
    dense_units: tuple[int, ...] = option((200, 200), "units of the dense layers",
                                          check=POSITIVE_INTS)
    dropout: float = option(0.5, "dropout rate (training pgd_at and trades: "
                            f"{ADVERSARIAL_TRAINING_DEFAULTS['dropout']:g} unless given)",
                            check=UNIT_RIGHT_OPEN)
    epochs: int = option(12, "training epochs (training pgd_at and trades: "
                         f"{ADVERSARIAL_TRAINING_DEFAULTS['epochs']} unless given)",
                         check=POSITIVE_INT)
    batch_size: int = option(128, "batch size", check=POSITIVE_INT)
    learning_rate: float = option(1e-3, "learning rate", check=POSITIVE)
    train_size: int | None = option(None, "training images; none: the whole official training "
                                    "set", check=POSITIVE_INT)
    precision: str = option(
        "auto",
        "compute precision of classifier training: mixed_bfloat16 is Keras mixed precision "
        "(float32 weights, bfloat16 compute); auto takes it where the machine computes "
        "bfloat16 natively (a CPU with AVX512-BF16 or AMX, a GPU of compute capability >= 8.0; "
        "1.8x faster classifier training on 2 CPU cores with AVX512-BF16), else float32. The "
        "saved classifier computes in float32 either way.",
        choices=TRAIN_PRECISIONS,
    )
    training: str = option(
        "standard",
        "how the classifier is trained: standard (cross-entropy on clean images), pgd_at (PGD "
        "adversarial training, Madry et al. 2018: cross-entropy on L-inf PGD images) or trades "
        "(Zhang et al. 2019: cross-entropy on clean images + trades_beta x KL to PGD images); "
        "the adversarial ones cost about adversarial_steps + 1 times the standard training "
        "(fmd_tf.models.RobustTrainer), and scripts/train.py checks them with APGD (CE and "
        f"DLR, {CHECK_STEPS} steps) at adversarial_eps on the first {CHECK_IMAGES} VAL "
        "images: the card's classifier_val_robustness, and a warning when the worst case is "
        f"below {MASKING_RATIO:.0%} of the clean accuracy, a training attack fooled by its "
        "classifier (fmd_tf.evaluation.robustness.robust_training_check)",
        choices=CLASSIFIER_TRAININGS,
    )
    adversarial_eps: float = option(0.1, "L-inf radius of the training attack (pgd_at, "
                                    "trades), and the radius the robust operating point "
                                    "(--operating-point robust) attacks at",
                                    check=UNIT_LEFT_OPEN)
    adversarial_steps: int = option(10, "PGD steps of the training attack, each of size "
                                    "2.5 x adversarial_eps / steps", check=POSITIVE_INT)
    trades_beta: float = option(1.0, "TRADES weight of the KL term (the TRADES paper uses 6 "
                                "for MNIST; the shipped Fashion-MNIST robust classifier, chosen "
                                "on VAL, uses 1: docs/results.md \"Robust mode\")",
                                check=NON_NEGATIVE)
    init: str | None = option(None, "a saved classifier (.keras) of the same architecture "
                              "whose weights start the training: fine-tuning, e.g. adversarial "
                              "fine-tuning of a standard classifier with training trades; "
                              "none: random initialisation")

    def __post_init__(self):
        normalize(self)


@dataclass(frozen=True)
class ComboVAEConfig:
    """β-TC-VAE encoder Es + DGMM + decoder (paper §III-B, §III-D, Table I)."""

    shared_dim: int = option(10, "the number of class-shared codes: d_s, the size of zs, for "
                             "a vector latent; C, the channels of the map, for a feature map",
                             check=POSITIVE_INT)
    latent: str = option(
        "vector",
        "layout of zs: vector (d_s codes, one per dimension; Table I's MNIST/Fashion-MNIST "
        "encoder and decoder) or feature_map (C = shared_dim channels of "
        "feature_map_size x feature_map_size maps, one code per channel, residual encoder and "
        "decoder blocks; the paper's CelebA model). A feature-map code's value is its channel's "
        "spatial mean and a morph shifts the whole channel; free_bits floors each channel's "
        "KL. pipeline.experiment_config(latent=...) and train.py --latent also set gamma 0 "
        "(the CelebA model is a basic combo-VAE, no TC term) unless --gamma is given.",
        choices=LATENTS,
    )
    feature_map_size: int = option(
        4, "h = w, the side of each channel's map of a feature-map latent; the images halve to "
           "it (ceil) through stride-2 blocks, e.g. 4 for 28x28 (3 blocks) and 32x32 (3), 8 for "
           "64x64 (3)", check=POSITIVE_INT)
    feature_map_encoder_filters: tuple[int, ...] = option(
        (32, 64), "widths of the feature-map encoder's residual stride-2 blocks (the last "
                  "repeated for the remaining blocks)", check=POSITIVE_INTS)
    feature_map_decoder_filters: tuple[int, ...] = option(
        (64, 32), "widths of the feature-map decoder's residual upsampling blocks, first block "
                  "first (the last repeated)", check=POSITIVE_INTS)
    unique_dim: int = option(10, "K, the number of class-unique codes zu", check=POSITIVE_INT)
    gamma: float = option(40.0, "weight of the total-correlation term (Eq. 8)",
                          check=NON_NEGATIVE)
    beta: float = option(1.0, "weight of L_KL (Eq. 8 has 1)", check=NON_NEGATIVE)
    recon_weight: float = option(
        10.0,
        "weight w of L_R (Eq. 8 has w = 1; 1 trains the paper's weighting). Resistance compares "
        "morph labels with the input's label, so it needs reconstructions the classifier labels "
        "like the input; with w = 1 the KL term starves zs (about 4 nats in all) and the "
        "reconstruction label agreement stayed below the 85 % target in our runs. w = 10 (a "
        "Gaussian decoder with pixel variance 0.05) keeps about 2-3 nats in most codes.",
        check=POSITIVE,
    )
    consistency_weight: float = option(
        100.0,
        "weight of the decoder-only label-consistency term (not in the paper; 0 turns it off, "
        "the paper's loss): KL between the classifier's outputs on x and on its reconstruction, "
        "see losses.label_consistency_loss. Clean resistance is bounded by how often "
        "reconstructions keep the input's label, which L_R alone left at 85 % on Fashion-MNIST "
        "(see CHANGELOG.md for the weights tried).",
        check=NON_NEGATIVE,
    )
    free_bits: float = option(
        0.5,
        "floor in nats of each class-shared code's batch-mean KL in L_KL (free bits, Kingma et "
        "al. 2016; losses.free_bits_kl): a code below it costs the floor and gets no KL "
        "gradient, so no code is pushed onto the prior; 0 is Eq. 8's L_KL. On Fashion-MNIST "
        "with 0, two of the ten codes collapsed (KL 0.10 and 0.16 nats, no visible change); "
        "with 0.5 one run had all ten change the image (results/training/free_bits/), a second "
        "run eight (results/training/free_bits_run2/: two codes kept 0.53 and 1.07 nats that "
        "the decoder barely shows), both at reconstruction label agreement 0.93",
        check=NON_NEGATIVE,
    )
    latent_cycle_weight: float = option(
        0.0,
        "weight of the decoder-only latent-cycle term (not in the paper; 0 turns it off): the "
        "squared error between the class-shared codes a reconstruction was decoded from and "
        "the codes the encoder reads back from it (losses.latent_cycle_loss), so that the "
        "decoder shows every code in the image; free bits keep a code's KL up but not its "
        "use by the decoder. With 10 one run had all ten codes change the image "
        "(results/training/latent_cycle/), a second nine (results/training/latent_cycle_run2/)",
        check=NON_NEGATIVE,
    )
    code_use_weight: float = option(
        1.0,
        "weight of the decoder-only code-use hinge (not in the paper; 0 turns it off, as for "
        "the shipped Fashion-MNIST model): one class-shared code of each training image, drawn "
        "at random, is shifted by 2 prior standard deviations and the decoded image must "
        "change by at least code_use_margin mean |pixel| (losses.code_use_loss). Unlike the "
        "latent-cycle term it needs nothing from the encoder, so a code the decoder ignores "
        "still gets a gradient. On Fashion-MNIST with weight 1 and margin 0.04 two runs had "
        "all ten codes change the image at reconstruction label agreement 0.93 "
        "(results/training/code_use_margin04*/)",
        check=NON_NEGATIVE,
    )
    code_use_margin: float = option(
        0.04,
        "the mean |pixel| change that the code-use hinge asks of a shift of one code by 2 "
        "prior standard deviations (code_use_weight). With 0.02 one of two Fashion-MNIST runs "
        "kept a code whose full-range sweep moved the image by 0.009 "
        "(results/training/code_use_run2/)",
        check=NON_NEGATIVE,
    )
    lambda_lkd: float = option(0.1, "weight of L_lkd in L_GM (Eq. 12)", check=NON_NEGATIVE)
    encoder_filters: tuple[int, ...] = option((32, 32, 64, 64), "encoder conv filters (C k4 s2 "
                                              "ReLU, Table I)", check=POSITIVE_INTS)
    encoder_dense: int = option(128, "encoder dense units", check=POSITIVE_INT)
    decoder_dense: int = option(128, "decoder dense units", check=POSITIVE_INT)
    decoder_filters: tuple[int, ...] = option((64, 32), "decoder transposed-conv filters (DC k4 "
                                              "s2 LeakyReLU)", check=POSITIVE_INTS)
    discriminator_units: tuple[int, ...] = option((256, 256, 256), "units of the total-"
                                                  "correlation discriminator",
                                                  check=POSITIVE_INTS)
    dgmm_epochs: int = option(15, "epochs of stage 1 (DGMM)", check=POSITIVE_INT)
    dgmm_lr_schedule: str = option(
        "cosine",
        "learning-rate schedule of stage 1 (not specified by the paper): cosine decays "
        "learning_rate to 1 % over the DGMM's training steps, as for the classifier; constant "
        "keeps it (cosine gave the better DGMM test accuracy on Fashion-MNIST, CHANGELOG.md).",
        choices=DGMM_LR_SCHEDULES,
    )
    dgmm_train_size: int | None = option(
        None,
        "stage 1 images. The DGMM is 'solely trained using the clean labeled instances' "
        "(§III-D); on the 20,000-image TRAIN split it overfits (train 96.7 %, test 87.4 %), so "
        "by default (none) it uses the whole labeled official training set; an int takes the "
        "first k TRAIN images.",
        check=POSITIVE_INT,
    )
    vae_epochs: int = option(30, "epochs of stage 2 (combo-VAE)", check=POSITIVE_INT)
    vae_precision: str = option(
        "auto",
        "compute precision of stage 2 (encoder, decoder and TC discriminator), as "
        "ClassifierConfig.precision: mixed_bfloat16 computes in bfloat16 with float32 weights "
        "and float32 losses; auto takes it where the machine computes bfloat16 natively. The "
        "DGMM (stage 1) trains in float32 and the saved combo-VAE computes in float32 either "
        "way.",
        choices=TRAIN_PRECISIONS,
    )
    vae_data: str = option(
        "train",
        "stage 2 images: train is the paper's TRAIN split (SplitConfig.train_size images, "
        "§IV-A); full is the whole official training set (VAL and CLE come from the official "
        "test set, so neither is touched).",
        choices=VAE_DATA,
    )
    batch_size: int = option(128, "batch size", check=POSITIVE_INT)
    learning_rate: float = option(1e-3, "learning rate", check=POSITIVE)
    discriminator_learning_rate: float = option(1e-4, "learning rate of the discriminator",
                                                check=POSITIVE)

    def __post_init__(self):
        normalize(self)


def _percentile_rule(v):
    return 0.0 <= v[0] < v[1] <= 100.0


def _codes(v):
    return len(v) > 0 and len(set(v)) == len(v) and min(v) >= 0


# The values DefenseConfig options had before they existed: a saved defense (or card) without
# one of them was made with this value, not today's default.
LEGACY_DEFAULTS = {"recon_metric": "mse", "purify_label": "reconstruction",
                   "morph_dtype": "float32", "morph_check_margin": 0.0}


@dataclass(frozen=True)
class DefenseConfig:
    """Detector and purifier (paper §III-C, §III-D, Eq. 5): the options of `FMDefense`.

    Natural-morph search: candidate offsets for code i at search step t (t = 1..max_steps) are
    drawn uniformly in ±t·Δr·w_i, where w_i is the width of the code's normal range; B
    candidates per step; the first N that stay inside the normal range are kept (§III-C).

    `member_shared` options must be equal in every member of an `FMDefenseEnsemble` trained by
    scripts/train.py (the morph seed differs). `validate(cfg)` (fmd_tf.options) checks every
    field and that the search draws at least N candidates; `FMDefense` adds the checks that
    need the model (selected codes < d_s, adaptive_refine_codes <= m, jit_compile).
    """

    num_morphs: int = option(100, "N, the natural morphs per code", check=POSITIVE_INT,
                             member_shared=True)
    candidates_per_step: int = option(20, "B, the search candidates per step",
                                      check=POSITIVE_INT)
    radius_step: float = option(0.025, "Δr, the growth of the search radius per step, as a "
                                "fraction of the normal-range width", check=POSITIVE,
                                member_shared=True)
    max_steps: int = option(20, "search steps", check=POSITIVE_INT)
    range_percentiles: tuple[float, float] = option(
        (1.0, 99.0), "LOW,HIGH percentiles of the clean VAL encoder means: a code's normal "
        "value range", check=(_percentile_rule, "must satisfy 0 <= low < high <= 100"),
        member_shared=True,
    )
    selected_codes: tuple[int, ...] | None = option(
        None, "indices of the m manipulated codes; none: all d_s codes",
        check=(_codes, "must be distinct non-negative code indices"), member_shared=True,
    )
    threshold_mode: str = option("per_code", "θr rule: one threshold per code, or one shared "
                                 "(unified)", choices=THRESHOLD_MODES, member_shared=True)
    rho: float = option(0.999, "ρ: clean VAL false-positive rate <= 1 - ρ",
                        check=UNIT_LEFT_OPEN, member_shared=True)
    eta: float = option(0.9, "η: θd is the η-fractile of the suspicious VAL distances",
                        check=UNIT_CLOSED, member_shared=True)
    min_suspicious: int = option(20, "below this many suspicious VAL images, θd comes from "
                                 "thresholds at eta_reference_rho", check=NON_NEGATIVE)
    eta_reference_rho: float = option(0.9, "ρ of the reference thresholds of θd with few "
                                      "suspicious VAL images", check=UNIT_LEFT_OPEN)
    suspicious: str = option(
        "purify",
        "what a suspicious input gets: purify (the paper: the purified image's label when its "
        "distance Dis <= θd, else rejected) or reject (always rejected: for a public endpoint, "
        "where an attacker can steer inputs into the purifier and pick its label)",
        choices=SUSPICIOUS, member_shared=True,
    )
    purify_zu: str = option("encoded", "zu of the purified image: the encoded zu(x), or the "
                            "mean of the most likely DGMM class", choices=PURIFY_ZU)
    purify_label: str = option(
        "corroborated",
        "label of a purified input: reconstruction (the paper) is the classifier's label of the "
        "purified image; corroborated keeps the classifier's label of the input itself when the "
        "DGMM's most likely class of zu(x) is that label (the class-unique code corroborates "
        "it, so the low resistance came from the decoder changing the class), else the purified "
        "image's label. Verdicts do not depend on it.",
        choices=PURIFY_LABELS, member_shared=True,
    )
    chunk_size: int = option(2_000, "morphs per decoder+classifier pass (bounds the memory)",
                             check=POSITIVE_INT)
    seed: int = option(0, "randomness key of the morph search (saved with the model)",
                       check=NON_NEGATIVE, cli=False)
    adaptive_budget: bool = option(
        False,
        "adaptive morph budget (fmd_tf.defense.adaptive_budget): after calibration, draw "
        "morphs in rounds of adaptive_round and stop a pair once an exact binomial test at "
        "level adaptive_alpha (Bonferroni over the looks) puts r(i) clearly above or below "
        "θr(i); calibration always uses all N. Not XLA-compatible.",
    )
    adaptive_round: int = option(10, "morphs per round of the adaptive budget",
                                 check=POSITIVE_INT)
    adaptive_alpha: float = option(0.01, "level α of the adaptive budget's sequential test",
                                   check=(lambda v: 0.0 < v < 0.5, "must be in (0, 0.5)"))
    adaptive_refine_codes: int = option(
        0, "with the adaptive budget, each image's this many codes with the lowest r(i) - θr(i) "
        "estimates then draw on until all N morphs, or until the rest cannot change the "
        "image's score (0 = off; at most the number of selected codes)",
        check=NON_NEGATIVE,
    )
    adaptive_order: str = option(
        "shuffled", "order in which the adaptive budget draws each pair's N morphs: shuffled "
        "(a fixed permutation drawn from seed) or search (smallest radius first); the full "
        "budget does not depend on it", choices=DRAW_ORDERS,
    )
    morph_dtype: str = option(
        "auto", "compute dtype of the decoder+classifier pass over the morphs "
        "(fmd_tf.defense.precision); weights stay float32. auto: bfloat16 where the machine "
        "computes it natively (a CPU with AVX512-BF16/AMX, a GPU of compute capability >= 8.0), "
        "float32 elsewhere", choices=COMPUTE_DTYPES,
    )
    morph_check_margin: float = option(
        1.0, "with a reduced morph_dtype, morphs whose top two classifier outputs differ by "
        "less than this are classified again in float32, so the labels are float32's unless an "
        "output's rounding error exceeds half of it (0 = no check; in logits, or in log "
        "probabilities for a classifier with a softmax output)", check=NON_NEGATIVE,
    )
    recon_fpr: float = option(
        0.0, "reconstruction gate (not in the paper; 0 = off, the paper's rule): reject inputs "
        "whose combo-VAE reconstruction error exceeds the clean VAL (1 - recon_fpr) quantile",
        check=UNIT_RIGHT_OPEN, member_shared=True,
    )
    margin_fpr: float = option(
        0.0, "classifier-margin gate (not in the paper; 0 = off): reject inputs whose "
        "classifier logit margin (top-1 minus top-2 logit) is below the clean VAL margin_fpr "
        "quantile θm (in probabilities for a classifier with a softmax output). With a robust "
        "classifier an attack within its budget rarely reaches a confident wrong label, and "
        "most clean images it rejects were misclassified anyway",
        check=UNIT_RIGHT_OPEN, member_shared=True,
    )
    recon_metric: str = option(
        "mae",
        "the gate's reconstruction error e(x): mae (mean absolute error, the L1 error of "
        "MagNet's detector), mse (mean squared error), or pixel_share (the share of pixels "
        "with |x - x̂| > recon_pixel_tol). L1 weighs the small perturbation an attack spreads "
        "over every pixel more than the few large errors of a hard clean image; pixel_share "
        "counts the pixels an attack moved off the manifold and ignores how far a hard clean "
        "image's few bad pixels are off. Models saved before this option existed load as mse.",
        choices=RECON_METRICS, member_shared=True,
    )
    recon_pixel_tol: float = option(0.15, "per-pixel tolerance τ of the pixel_share gate "
                                    "metric (unused otherwise)", check=UNIT_OPEN,
                                    member_shared=True)

    def __post_init__(self):
        normalize(self)

    def _cross_checks(self):
        """Checks of several fields, run by `fmd_tf.options.validate` after the field checks."""
        if self.candidates_per_step * self.max_steps < self.num_morphs:
            raise OptionError(
                "num_morphs",
                f"the search draws candidates_per_step*max_steps = "
                f"{self.candidates_per_step * self.max_steps} candidates, fewer than "
                f"num_morphs = {self.num_morphs}",
                fields=("num_morphs", "candidates_per_step", "max_steps"),
            )


@dataclass(frozen=True)
class ExperimentConfig:
    dataset: str = "fmnist"
    image_shape: tuple[int, int, int] = (28, 28, 1)
    num_classes: int = 10
    splits: SplitConfig = field(default_factory=SplitConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    combo: ComboVAEConfig = field(default_factory=ComboVAEConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)


_CONFIGS: dict[str, ExperimentConfig] = {
    "fmnist": ExperimentConfig(),
    # The paper manipulates 20 codes on MNIST (§IV-A).
    "mnist": ExperimentConfig(dataset="mnist", combo=ComboVAEConfig(shared_dim=20)),
}


def get_config(name: str) -> ExperimentConfig:
    """Paper-default config of a dataset; raises ValueError naming the known ones."""
    if name not in _CONFIGS:
        raise ValueError(f"no config for dataset {name!r}; known: {', '.join(sorted(_CONFIGS))}")
    return _CONFIGS[name]


def quick_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """A tiny variant (512 training images, 2,048 for the classifier, one epoch each, few
    morphs, the card's test figures on 1,024 test images) for tests and CI."""
    return dataclasses.replace(
        cfg,
        splits=SplitConfig(train_size=512, val_size=128, cle_size=128, test_size=1024),
        classifier=dataclasses.replace(cfg.classifier, epochs=1, train_size=2048),
        combo=dataclasses.replace(
            cfg.combo, dgmm_epochs=1, vae_epochs=1, batch_size=64, dgmm_train_size=512,
            vae_data="train",
        ),
        # float32 morphs: a classifier trained for one epoch has small logits, so nearly every
        # morph would be a close call and checked bfloat16 would only add a pass.
        defense=dataclasses.replace(
            cfg.defense, num_morphs=8, candidates_per_step=4, max_steps=4, chunk_size=256,
            rho=0.95, morph_dtype="float32",
        ),
    )


def to_dict(cfg) -> dict:
    """JSON-friendly dict of a (nested) config dataclass."""
    return dataclasses.asdict(cfg)


def _card(model_dir: str) -> tuple[str, dict | None]:
    """(path of model_dir's model_card.json, its entries or None without one); ValueError
    naming the card when it is not JSON."""
    import json
    import os

    path = os.path.join(model_dir, "model_card.json")
    if not os.path.exists(path):
        return path, None
    try:
        with open(path) as f:
            return path, json.load(f)
    except ValueError as err:
        raise ValueError(f"{path}: not a JSON model card: {err}") from None


def card_split_seed(model_dir: str) -> int | None:
    """The seed of the data splits a trained model was calibrated on (`seed` of its
    model_card.json, `train.py --seed`), or None without a card or entry."""
    card = _card(model_dir)[1]
    seed = card.get("seed") if isinstance(card, dict) else None
    return None if seed is None else int(seed)


def card_preset(model_dir: str) -> str | None:
    """The preset of a trained model's last `scripts/train.py` run (`preset` of its
    model_card.json: "full" or "fast"), or None without a card or entry."""
    card = _card(model_dir)[1]
    preset = card.get("preset") if isinstance(card, dict) else None
    return None if preset is None else str(preset)


def split_seed(model_dir: str, seed: int | None = None) -> int:
    """The seed of the data splits to use with the model in `model_dir`: `seed` when given,
    else the one the model was calibrated on (`card_split_seed`), else 0. The default of every
    script's `--seed` (`fmd_tf.cli.add_seed_argument`): another seed's CLE images overlap the
    model's VAL images."""
    if seed is not None:
        return int(seed)
    calibrated = card_split_seed(model_dir)
    return 0 if calibrated is None else calibrated


def _card_entry(model_dir: str, key: str, what: str, build):
    """`build(entry)` for the `hyperparameters.<key>` entry of the model card in `model_dir`, or
    None without a card or entry. Raises ValueError naming the card and `what` the entry holds
    when `build` cannot read it."""
    path, card = _card(model_dir)
    if card is None:
        return None
    try:
        entry = card.get("hyperparameters", {}).get(key)
        return build(entry) if entry else None
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: cannot read the {what} (hyperparameters.{key}): "
                         f"{err}") from None


def card_defense_config(model_dir: str) -> DefenseConfig | None:
    """The defense options a trained model was calibrated with (`hyperparameters.defense` of its
    model_card.json; an option the card predates takes the value it had before it existed,
    `LEGACY_DEFAULTS`, as for a saved defense), or None without a card or entry. Raises
    ValueError naming the card when the entry is malformed."""
    return _card_entry(model_dir, "defense", "defense options",
                       lambda options: DefenseConfig(**{**LEGACY_DEFAULTS, **options}))


def card_classifier_training(model_dir: str) -> tuple[str | None, float | None] | None:
    """(how the classifier a trained model describes was trained, the L∞ radius of its training
    attack): `training` (one of `CLASSIFIER_TRAININGS`) and `adversarial_eps` of
    `hyperparameters.classifier` in its model_card.json, None where the entry has none; None
    without a card or entry. Raises ValueError naming the card when the entry is malformed."""
    def read(options):
        eps = options.get("adversarial_eps")
        return options.get("training"), None if eps is None else float(eps)

    return _card_entry(model_dir, "classifier", "classifier options", read)


def card_split_config(model_dir: str) -> SplitConfig | None:
    """The split sizes a trained model used (`hyperparameters.splits` of its model_card.json),
    or None without a card. VAL must be the images of its val_resistance.npy, and CLE disjoint
    from them. Raises ValueError naming the card when the entry is malformed."""
    return _card_entry(model_dir, "splits", "split sizes", lambda sizes: SplitConfig(**sizes))
