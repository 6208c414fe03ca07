"""FMDefense: the detector-purifier of the paper as one Keras model (§III-A, C, D; Eq. 5)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from fmd_tf.defense import adaptive_budget as adaptive
from fmd_tf.defense import calibration, morphs, precision

VERDICT_PASSED, VERDICT_PURIFIED, VERDICT_REJECTED = 0, 1, 2
OUTPUT_KEYS = ("label", "verdict", "classifier_label", "resistance", "distance", "purified",
               "recon_error")
PURIFY_ZU = ("encoded", "class_mean")
PURIFY_LABELS = ("reconstruction", "corroborated")
RECON_METRICS = ("mae", "mse", "pixel_share")
LEGACY_RECON_METRIC = "mse"  # the gate's metric of files saved before `recon_metric` existed


class NotCalibratedError(RuntimeError):
    """The defense was used before `calibrate` set its ranges and thresholds."""


def _check_images_static(images, image_shape):
    """Python-side checks that need no data: dtype, rank, image size."""
    dtype = getattr(images, "dtype", None)
    if dtype is not None and not tf.as_dtype(dtype).is_floating:
        raise TypeError(
            f"images must be float32 in [0, 1], got dtype {tf.as_dtype(dtype).name} "
            "(divide uint8 images by 255 first)"
        )
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(f"images must have rank 4 [batch, {image_shape}], got shape {shape}")
    if shape[1:] != tuple(image_shape) and None not in shape[1:]:
        raise ValueError(f"images must be [batch, {', '.join(map(str, image_shape))}], got {shape}")


def check_image_values(x) -> np.ndarray:
    """A non-empty numpy batch as float32, finite and in [0, 1]; ValueError naming the problem
    (nothing is clipped)."""
    if len(x) == 0:
        raise ValueError("images: empty batch")
    x = np.asarray(x).astype(np.float32, copy=False)
    if not np.all(np.isfinite(x)):
        raise ValueError("images contain NaN or Inf")
    if x.min() < 0.0 or x.max() > 1.0:
        raise ValueError(
            f"images must be in [0, 1], found values in [{x.min():.3g}, {x.max():.3g}]"
        )
    return x


def validate_images(images, image_shape):
    """Graph-side checks (InvalidArgumentError naming the problem); returns float32 images."""
    images = tf.cast(images, tf.float32)
    checks = [
        tf.debugging.assert_equal(
            tf.shape(images)[1:], tf.constant(image_shape, tf.int32),
            message=f"images must be [batch, {', '.join(map(str, image_shape))}]",
        ),
        tf.debugging.assert_positive(tf.shape(images)[0], message="images: empty batch"),
        tf.debugging.assert_all_finite(images, message="images contain NaN or Inf"),
        tf.debugging.assert_greater_equal(
            tf.reduce_min(images), 0.0, message="images must be in [0, 1]: found a value < 0"
        ),
        tf.debugging.assert_less_equal(
            tf.reduce_max(images), 1.0, message="images must be in [0, 1]: found a value > 1"
        ),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(images)


def decide(resistance, theta_r, theta_d, recon_error=None, theta_e=None):
    """Verdicts of the detector-purifier from resistance vectors (§III-A, Eq. 5).

    Args:
        resistance: [B, m] float32.
        theta_r: [m] resistance thresholds; a row is normal iff r(i) > θr(i) for all i.
        theta_d: scalar distance threshold; suspicious rows with Dis <= θd are purified.
        recon_error, theta_e: optional reconstruction gate (not in the paper): rows with
            recon_error [B] > θe are rejected whatever their resistance.

    Returns:
        (verdict int32 [B]: 0 passed, 1 purified, 2 rejected; distance Dis(r, θr) float32 [B]).
    """
    resistance = tf.convert_to_tensor(resistance, tf.float32)
    theta_r = tf.convert_to_tensor(theta_r, tf.float32)
    distance = tf.reduce_sum(tf.nn.relu(theta_r[None, :] - resistance), axis=-1)
    suspicious = tf.reduce_any(resistance <= theta_r[None, :], axis=-1)
    verdict = tf.where(
        suspicious,
        tf.where(distance <= theta_d, VERDICT_PURIFIED, VERDICT_REJECTED),
        VERDICT_PASSED,
    )
    if recon_error is not None:
        verdict = tf.where(recon_error > theta_e, VERDICT_REJECTED, verdict)
    return tf.cast(verdict, tf.int32), distance


def final_label(verdict, label, purified_label):
    """The classifier's label if passed, the purified image's label if purified, else -1."""
    return tf.where(
        verdict == VERDICT_PASSED,
        tf.cast(label, tf.int64),
        tf.where(
            verdict == VERDICT_PURIFIED,
            tf.cast(purified_label, tf.int64),
            tf.constant(-1, tf.int64),
        ),
    )


class BatchedDefense:
    """The call / numpy API shared by `FMDefense` and `FMDefenseEnsemble` (a mixin in front of
    `keras.Model`). Needs `_image_shape`, `_graph_fn`, `jit_compile`, `is_calibrated`,
    `_defend(images, with_stats)` and `_xla_compatible()`."""

    output_keys = OUTPUT_KEYS  # what `defend` returns

    def _require_calibrated(self):
        if not self.is_calibrated:
            raise NotCalibratedError(
                f"{type(self).__name__} is not calibrated: call calibrate(x_val) on clean "
                "validation images first (or load a calibrated model)"
            )

    def _compiled(self):
        if self._graph_fn is None:
            jit = self.jit_compile
            if jit is None:
                jit = bool(tf.config.list_physical_devices("GPU")) and self._xla_compatible()
            self._graph_fn = tf.function(self._defend, jit_compile=jit, reduce_retracing=True)
        return self._graph_fn

    def call(self, images):
        if self._image_shape is not None:
            _check_images_static(images, self._image_shape)
        if tf.executing_eagerly():
            return self._compiled()(images)
        return self._defend(images)

    # ----------------------------------------------------------------------------- numpy API
    def _as_batch(self, x) -> np.ndarray:
        x = np.asarray(x)
        if not self.built:
            self.build((None, *x.shape[1:]))
        _check_images_static(x, self._image_shape)
        return check_image_values(x)

    def defend(self, x, batch_size: int = 64) -> dict:
        """`call` on a numpy array of any length, in batches; numpy outputs."""
        x = self._as_batch(x)
        self._require_calibrated()
        parts = [self(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return {k: np.concatenate([p[k].numpy() for p in parts]) for k in self.output_keys}

    def defend_with_stats(self, x, batch_size: int = 64) -> dict:
        """`defend` plus `morphs_used` int32 [n, m], the morphs drawn per (image, code) pair."""
        x = self._as_batch(x)
        self._require_calibrated()
        fn = self._compiled()
        parts = [fn(tf.constant(x[i : i + batch_size]), with_stats=True)
                 for i in range(0, len(x), batch_size)]
        return {k: np.concatenate([p[k].numpy() for p in parts])
                for k in (*self.output_keys, "morphs_used")}

    def detect(self, x, batch_size: int = 64):
        """ART-style detection: (report dict, is_adversarial [n] bool = verdict != passed)."""
        out = self.defend(x, batch_size)
        return out, out["verdict"] != VERDICT_PASSED


@keras.saving.register_keras_serializable(package="fmd_tf")
class FMDefense(BatchedDefense, keras.Model):
    """Classifier + combo-VAE + calibration state; `call` detects and purifies a batch.

    For each image: label y0 = classifier(x); codes μs(x), zu(x); for every selected code i,
    N natural morphs (`morphs.natural_morph_codes`) decoded with the other codes and zu fixed;
    resistance r(i) = share of morphs classified y0. Verdict: passed if r(i) > θr(i) for all i;
    else purified if Dis(r, θr) <= θd (label = classifier(decoder(μs(x) ‖ zu))); else rejected
    (label -1). With `recon_fpr` > 0 (not in the paper) an input whose reconstruction error
    exceeds θe is rejected first. See `fmd_tf.defense.calibration` for how θr, θd and θe are
    set.

    All B·m·N morphs run through decoder and classifier in chunks of `chunk_size` inside one
    graph (`tf.map_fn`), so memory is bounded and there is no Python loop at run time. The
    search offsets are drawn from `seed` when the model is built and saved as a weight: the same
    model and image give the same outputs in any process, whatever the rest of the batch.

    Args:
        classifier: Keras model, images -> logits.
        combo_vae: trained `ComboVAE`.
        num_morphs: N.
        candidates_per_step, radius_step, max_steps: natural-morph search (§III-C).
        range_percentiles: normal-range rule on VAL encoder means.
        selected_codes: indices of the m manipulated codes; None = all d_s.
        threshold_mode, rho, eta, min_suspicious, eta_reference_rho: calibration.
        purify_zu: "encoded" (zu(x)) or "class_mean" (μ of the most likely DGMM class).
        purify_label: label of a purified input. "reconstruction" (the paper): the classifier's
            label of the purified image. "corroborated": the classifier's label of the input
            itself when the DGMM's most likely class of zu(x) is that label (the class-unique
            code corroborates it, so the low resistance came from the decoder changing the
            class), else the purified image's label. Verdicts are the same in both modes.
        chunk_size: morphs per decoder+classifier pass.
        seed: randomness key of the morph search.
        jit_compile: XLA for the graph; None = on when a GPU is visible (XLA was ~3x slower on
            CPU) and `adaptive_budget` is off.
        adaptive_budget: once calibrated, draw each pair's morphs in rounds and stop when r(i) is
            clearly above or below θr(i) (`fmd_tf.defense.adaptive_budget`); calibration always
            uses all N. Not XLA-compatible.
        adaptive_round, adaptive_alpha: morphs per round and level α of that sequential test.
        adaptive_refine_codes: with the adaptive budget, each image's this many codes with the
            lowest r(i) - θr(i) estimates then draw all N morphs (0 = off).
        adaptive_order: order in which the adaptive budget draws each pair's N morphs:
            "shuffled" (a fixed permutation drawn from `seed`) or "search" (smallest radius
            first); see `adaptive_budget.draw_order`. The full budget does not depend on it.
        morph_dtype: "float32", "bfloat16" or "float16" for the decoder+classifier pass over
            the morphs (`fmd_tf.defense.precision`); weights stay float32.
        recon_fpr: clean VAL budget of the reconstruction gate (0 = off, the paper's rule).
        recon_metric: the gate's reconstruction error e(x): "mae" (mean absolute error, the L1
            error of MagNet's detector) or "mse" (mean squared error). L1 weighs the small
            perturbation an attack spreads over every pixel more than the few large errors of
            a hard clean image. "pixel_share" is the share of pixels with |x - x̂| >
            `recon_pixel_tol`: it counts the pixels an attack moved off the manifold and ignores
            how far a hard clean image's few bad pixels are off. Models saved before this
            option existed load as "mse".
        recon_pixel_tol: per-pixel tolerance τ of the "pixel_share" metric (unused otherwise).

    Call: images float32 [B, H, W, C] in [0, 1] -> dict with `label` int64 [B] (-1 when
    rejected), `verdict` int32 [B] (0 passed, 1 purified, 2 rejected), `classifier_label` int64
    [B], `resistance` float32 [B, m], `distance` float32 [B], `purified` float32 [B, H, W, C],
    `recon_error` float32 [B] (`recon_metric` error of decoder(μs(x) ‖ zu(x)) against x).
    """

    def __init__(
        self,
        classifier,
        combo_vae,
        num_morphs=100,
        candidates_per_step=20,
        radius_step=0.025,
        max_steps=20,
        range_percentiles=(1.0, 99.0),
        selected_codes=None,
        threshold_mode="per_code",
        rho=0.999,
        eta=0.9,
        min_suspicious=20,
        eta_reference_rho=0.9,
        purify_zu="encoded",
        purify_label="reconstruction",
        chunk_size=2000,
        seed=0,
        jit_compile=None,
        adaptive_budget=False,
        adaptive_round=10,
        adaptive_alpha=0.01,
        adaptive_refine_codes=0,
        adaptive_order="shuffled",
        morph_dtype="float32",
        recon_fpr=0.0,
        recon_metric="mae",
        recon_pixel_tol=0.15,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.classifier = _maybe_deserialize(classifier)
        self.combo_vae = _maybe_deserialize(combo_vae)
        self.num_morphs = int(num_morphs)
        self.candidates_per_step = int(candidates_per_step)
        self.radius_step = float(radius_step)
        self.max_steps = int(max_steps)
        self.range_percentiles = tuple(float(p) for p in range_percentiles)
        d_s = self.combo_vae.shared_dim
        if selected_codes is None:
            selected_codes = range(d_s)
        self.selected_codes = tuple(int(c) for c in selected_codes)
        self.threshold_mode = str(threshold_mode)
        self.rho = float(rho)
        self.eta = float(eta)
        self.min_suspicious = int(min_suspicious)
        self.eta_reference_rho = float(eta_reference_rho)
        self.purify_zu = str(purify_zu)
        self.purify_label = str(purify_label)
        self.chunk_size = int(chunk_size)
        self.seed = int(seed)
        self.jit_compile = jit_compile
        self.adaptive_budget = bool(adaptive_budget)
        self.adaptive_round = int(adaptive_round)
        self.adaptive_alpha = float(adaptive_alpha)
        self.adaptive_refine_codes = int(adaptive_refine_codes)
        self.adaptive_order = str(adaptive_order)
        self.morph_dtype = str(morph_dtype)
        self.recon_fpr = float(recon_fpr)
        self.recon_metric = str(recon_metric)
        self.recon_pixel_tol = float(recon_pixel_tol)
        self._check_arguments(d_s)
        self._image_shape = None
        self._graph_fn = None

    def _check_arguments(self, d_s):
        if self.num_morphs < 1:
            raise ValueError(f"num_morphs must be >= 1, got {self.num_morphs}")
        if self.candidates_per_step < 1 or self.max_steps < 1:
            raise ValueError("candidates_per_step and max_steps must be >= 1")
        if self.candidates_per_step * self.max_steps < self.num_morphs:
            raise ValueError(
                f"the search draws candidates_per_step*max_steps = "
                f"{self.candidates_per_step * self.max_steps} candidates, fewer than "
                f"num_morphs = {self.num_morphs}"
            )
        if self.radius_step <= 0:
            raise ValueError(f"radius_step must be > 0, got {self.radius_step}")
        lo, hi = self.range_percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"range_percentiles must satisfy 0 <= low < high <= 100, got "
                             f"{self.range_percentiles}")
        if not self.selected_codes or len(set(self.selected_codes)) != len(self.selected_codes):
            raise ValueError(f"selected_codes must be distinct, got {self.selected_codes}")
        if min(self.selected_codes) < 0 or max(self.selected_codes) >= d_s:
            raise ValueError(f"selected_codes must be in [0, {d_s}), got {self.selected_codes}")
        if self.threshold_mode not in calibration.THRESHOLD_MODES:
            raise ValueError(f"threshold_mode must be one of {calibration.THRESHOLD_MODES}, "
                             f"got {self.threshold_mode!r}")
        if not 0.0 < self.rho <= 1.0 or not 0.0 < self.eta_reference_rho <= 1.0:
            raise ValueError("rho and eta_reference_rho must be in (0, 1]")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.purify_zu not in PURIFY_ZU:
            raise ValueError(f"purify_zu must be one of {PURIFY_ZU}, got {self.purify_zu!r}")
        if self.purify_label not in PURIFY_LABELS:
            raise ValueError(f"purify_label must be one of {PURIFY_LABELS}, "
                             f"got {self.purify_label!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.adaptive_round < 1:
            raise ValueError(f"adaptive_round must be >= 1, got {self.adaptive_round}")
        if not 0.0 < self.adaptive_alpha < 0.5:
            raise ValueError(f"adaptive_alpha must be in (0, 0.5), got {self.adaptive_alpha}")
        if self.adaptive_budget and self.jit_compile:
            raise ValueError("adaptive_budget has data-dependent shapes: jit_compile must be "
                             "None or False")
        if not 0 <= self.adaptive_refine_codes <= len(self.selected_codes):
            raise ValueError(f"adaptive_refine_codes must be in [0, {len(self.selected_codes)}], "
                             f"got {self.adaptive_refine_codes}")
        if self.adaptive_order not in adaptive.DRAW_ORDERS:
            raise ValueError(f"adaptive_order must be one of {adaptive.DRAW_ORDERS}, "
                             f"got {self.adaptive_order!r}")
        if not 0.0 <= self.recon_fpr < 1.0:
            raise ValueError(f"recon_fpr must be in [0, 1), got {self.recon_fpr}")
        if self.recon_metric not in RECON_METRICS:
            raise ValueError(f"recon_metric must be one of {RECON_METRICS}, "
                             f"got {self.recon_metric!r}")
        if not 0.0 < self.recon_pixel_tol < 1.0:
            raise ValueError(f"recon_pixel_tol must be in (0, 1), got {self.recon_pixel_tol}")
        if self.morph_dtype not in precision.COMPUTE_DTYPES:
            raise ValueError(f"morph_dtype must be one of {precision.COMPUTE_DTYPES}, "
                             f"got {self.morph_dtype!r}")

    @classmethod
    def from_config_dataclass(cls, classifier, combo_vae, defense_cfg, **kwargs):
        """Build from a `fmd_tf.config.DefenseConfig`."""
        return cls(
            classifier,
            combo_vae,
            num_morphs=defense_cfg.num_morphs,
            candidates_per_step=defense_cfg.candidates_per_step,
            radius_step=defense_cfg.radius_step,
            max_steps=defense_cfg.max_steps,
            range_percentiles=defense_cfg.range_percentiles,
            selected_codes=defense_cfg.selected_codes,
            threshold_mode=defense_cfg.threshold_mode,
            rho=defense_cfg.rho,
            eta=defense_cfg.eta,
            min_suspicious=defense_cfg.min_suspicious,
            eta_reference_rho=defense_cfg.eta_reference_rho,
            purify_zu=defense_cfg.purify_zu,
            purify_label=defense_cfg.purify_label,
            chunk_size=defense_cfg.chunk_size,
            seed=defense_cfg.seed,
            adaptive_budget=defense_cfg.adaptive_budget,
            adaptive_round=defense_cfg.adaptive_round,
            adaptive_alpha=defense_cfg.adaptive_alpha,
            adaptive_refine_codes=defense_cfg.adaptive_refine_codes,
            adaptive_order=defense_cfg.adaptive_order,
            morph_dtype=defense_cfg.morph_dtype,
            recon_fpr=defense_cfg.recon_fpr,
            recon_metric=defense_cfg.recon_metric,
            recon_pixel_tol=defense_cfg.recon_pixel_tol,
            **kwargs,
        )

    @classmethod
    def from_config(cls, config):
        return super().from_config({"recon_metric": LEGACY_RECON_METRIC, **config})

    STATE_WEIGHTS = ("code_low", "code_high", "theta_r", "theta_d", "theta_e", "calibrated",
                     "search_table")

    def copy_with(self, classifier=None, **changes) -> FMDefense:
        """A built copy with other constructor options (`changes`), sharing this defense's
        combo-VAE and, unless `classifier` is given, its classifier; ranges, thresholds and
        search table are copied. E.g. `fmd.copy_with(adaptive_budget=True)`."""
        config = self.get_config()
        for key in ("classifier", "combo_vae", "name", "trainable", "dtype"):
            config.pop(key, None)
        config.update(changes)
        if config.get("adaptive_budget") and config.get("jit_compile"):
            config["jit_compile"] = None  # the adaptive loop cannot be XLA-compiled
        copy = FMDefense(self.classifier if classifier is None else classifier, self.combo_vae,
                         name=self.name, **config)
        copy.build((None, *self._image_shape))
        for name in self.STATE_WEIGHTS:
            getattr(copy, name).assign(getattr(self, name))
        return copy

    # ----------------------------------------------------------------------------- state
    @property
    def num_codes(self) -> int:
        """m, the number of manipulated codes."""
        return len(self.selected_codes)

    def build(self, input_shape):
        self._image_shape = tuple(int(s) for s in input_shape[1:])
        for model in (self.classifier, self.combo_vae):
            if not model.built:
                model.build((None, *self._image_shape))
        d_s, m = self.combo_vae.shared_dim, self.num_codes
        table = morphs.search_offsets(
            m, self.max_steps, self.candidates_per_step, self.radius_step, self.seed
        )

        def weight(name, shape, init):
            return self.add_weight(
                name=name, shape=shape, initializer=init, trainable=False, dtype="float32"
            )

        self.code_low = weight("code_low", (d_s,), "zeros")
        self.code_high = weight("code_high", (d_s,), "zeros")
        self.theta_r = weight("theta_r", (m,), "zeros")
        self.theta_d = weight("theta_d", (), "zeros")
        self.theta_e = weight("theta_e", (), keras.initializers.Constant(np.inf))
        self.calibrated = weight("calibrated", (), "zeros")
        self.search_table = weight(
            "search_table", table.shape, keras.initializers.Constant(table)
        )
        self.built = True

    def get_build_config(self):
        return {"input_shape": [None, *self._image_shape]} if self._image_shape else {}

    def build_from_config(self, config):
        if config:
            self.build(config["input_shape"])

    @property
    def is_calibrated(self) -> bool:
        return self.built and float(self.calibrated.numpy()) > 0.5

    def _xla_compatible(self) -> bool:
        return not self.adaptive_budget

    # ----------------------------------------------------------------------------- graph
    def _morph_labels(self, latents):
        """Classifier labels of decoder(latents) for latents [M, D], in chunks -> [M] int64."""
        count = tf.shape(latents)[0]
        num_chunks = tf.maximum((count + self.chunk_size - 1) // self.chunk_size, 1)
        # Balanced chunks of at most chunk_size: padding is below num_chunks rows (a single
        # image's 1,000 morphs run as one chunk of 1,000, not as a padded chunk_size).
        chunk = (count + num_chunks - 1) // num_chunks
        padded = tf.pad(latents, [[0, num_chunks * chunk - count], [0, 0]])
        chunks = tf.reshape(padded, [num_chunks, chunk, tf.shape(latents)[1]])

        def label_chunk(z):
            return precision.morph_labels(self.classifier, self.combo_vae.decoder, z,
                                          self.morph_dtype)

        labels = tf.map_fn(
            label_chunk, chunks, fn_output_signature=tf.int64, parallel_iterations=1
        )
        return tf.reshape(labels, [-1])[:count]

    def _resistance(self, mean, zu, label, return_used=False):
        """r [B, m] (and, with `return_used`, morphs drawn per pair [B, m] int32)."""
        if self.adaptive_budget:  # the sequential test once calibrated; all N while calibrating
            r, used = tf.cond(self.calibrated > 0.5,
                              lambda: self._adaptive_resistance(mean, zu, label),
                              lambda: self._full_resistance(mean, zu, label, True))
            return (r, used) if return_used else r
        return self._full_resistance(mean, zu, label, return_used)

    def _adaptive_resistance(self, mean, zu, label):
        """(r [B, m], morphs drawn [B, m]) with the adaptive budget (same first-N morphs)."""
        selected = tf.constant(self.selected_codes, tf.int32)
        values = morphs.natural_morph_codes(
            tf.gather(mean, selected, axis=1), tf.gather(self.code_low, selected),
            tf.gather(self.code_high, selected), self.search_table, self.num_morphs,
        )
        return adaptive.adaptive_resistance(
            mean, zu, label, selected, values, self.theta_r,
            lambda z: precision.morph_labels(self.classifier, self.combo_vae.decoder, z,
                                             self.morph_dtype),
            self.adaptive_round, self.adaptive_alpha, self.chunk_size,
            refine_codes=self.adaptive_refine_codes,
            order=adaptive.draw_order(self.adaptive_order, self.num_morphs, self.seed),
        )

    def _full_resistance(self, mean, zu, label, return_used=False):
        """r [B, m]: share of each code's N morphs that keep `label`."""
        selected = tf.constant(self.selected_codes, tf.int32)
        low = tf.gather(self.code_low, selected)
        high = tf.gather(self.code_high, selected)
        values = morphs.natural_morph_codes(
            tf.gather(mean, selected, axis=1), low, high, self.search_table, self.num_morphs
        )
        zs = morphs.morph_latents(mean, selected, values)  # [B, m, N, d_s]
        batch, m, n = tf.shape(mean)[0], self.num_codes, self.num_morphs
        zu_all = tf.broadcast_to(zu[:, None, None, :], [batch, m, n, tf.shape(zu)[-1]])
        latents = tf.reshape(tf.concat([zs, zu_all], axis=-1), [batch * m * n, -1])
        labels = tf.reshape(self._morph_labels(latents), [batch, m, n])
        same = tf.cast(tf.equal(labels, label[:, None, None]), tf.float32)
        r = tf.reduce_mean(same, axis=-1)
        return (r, tf.fill(tf.shape(r), tf.constant(n, tf.int32))) if return_used else r

    def _defend(self, images, with_stats=False):
        return self._defend_valid(validate_images(images, self._image_shape), with_stats)

    def _defend_valid(self, images, with_stats=False):
        """`_defend` on already validated float32 images (any batch size, 0 included)."""
        label = tf.argmax(self.classifier(images), axis=-1)
        mean, _, zu = self.combo_vae.encode(images)
        resistance, morphs_used = self._resistance(mean, zu, label, return_used=True)
        reconstruction = self.combo_vae.decode(mean, zu)
        purified, purified_label = self._purify_codes(mean, zu, label, reconstruction)
        recon_error = reconstruction_error(images, reconstruction, self.recon_metric,
                                           self.recon_pixel_tol)
        verdict, distance = decide(resistance, self.theta_r, self.theta_d, recon_error,
                                   self.theta_e)
        return {
            "label": final_label(verdict, label, purified_label),
            "verdict": verdict,
            "classifier_label": label,
            "resistance": resistance,
            "distance": distance,
            "purified": purified,
            "recon_error": recon_error,
            **({"morphs_used": morphs_used} if with_stats else {}),
        }

    def _purify_codes(self, mean, zu, label, reconstruction=None):
        """(purified images, purified label int64 [B]) from the codes μs(x), zu(x) and the
        classifier's label of the input, `label` [B] (see `purify_label`; unused, and may be
        None, with the "reconstruction" rule)."""
        if self.purify_zu == "class_mean":
            purified = self.combo_vae.decode(mean, self.combo_vae.dgmm.class_mean(zu))
        else:
            purified = self.combo_vae.decode(mean, zu) if reconstruction is None \
                else reconstruction
        purified_label = tf.argmax(self.classifier(purified), axis=-1)
        if self.purify_label == "corroborated":
            dgmm_label = tf.argmax(self.combo_vae.dgmm.class_logits(zu), axis=-1)
            label = tf.cast(label, purified_label.dtype)
            purified_label = tf.where(dgmm_label == label, label, purified_label)
        return purified, purified_label

    def _purify_valid(self, images):
        """The purifier alone on validated images: {"purified", "label"} (no morph search)."""
        label = tf.argmax(self.classifier(images), axis=-1) \
            if self.purify_label == "corroborated" else None  # only that rule needs it
        mean, _, zu = self.combo_vae.encode(images)
        purified, purified_label = self._purify_codes(mean, zu, label)
        return {"purified": purified, "label": purified_label}

    # ----------------------------------------------------------------------------- numpy API
    def resistance(self, x, batch_size: int = 64) -> np.ndarray:
        """Resistance vectors [n, m] (needs the normal ranges, not the thresholds)."""
        x = self._as_batch(x)
        if not np.any(self.code_high.numpy() > self.code_low.numpy()):
            raise NotCalibratedError("normal ranges are not set: call calibrate(x_val) first")
        parts = [self(x[i : i + batch_size])["resistance"].numpy()
                 for i in range(0, len(x), batch_size)]
        return np.concatenate(parts)

    def morph_images(self, x, code: int, count: int | None = None) -> np.ndarray:
        """The first `count` decoded natural morphs of selected code `code`: [n, count, H, W, C]."""
        x = self._as_batch(x)
        if code not in self.selected_codes:
            raise ValueError(f"code {code} is not one of the selected codes {self.selected_codes}")
        count = self.num_morphs if count is None else min(int(count), self.num_morphs)
        position = self.selected_codes.index(code)
        mean, _, zu = self.combo_vae.encode(x)
        values = morphs.natural_morph_codes(
            mean[:, code : code + 1], self.code_low[code : code + 1],
            self.code_high[code : code + 1], self.search_table[position : position + 1],
            self.num_morphs,
        )[:, 0, :count]  # [n, count]
        zs = morphs.morph_latents(mean, tf.constant([code]), values[:, None, :])[:, 0]
        n = tf.shape(zs)[0]
        flat_zs = tf.reshape(zs, [n * count, -1])
        flat_zu = tf.reshape(tf.repeat(zu[:, None, :], count, axis=1), [n * count, -1])
        images = self.combo_vae.decode(flat_zs, flat_zu).numpy()
        return images.reshape(len(x), count, *images.shape[1:])

    def reconstruction_error(self, x, batch_size: int = 512) -> np.ndarray:
        """[n] error (`recon_metric`) of decoder(μs(x) ‖ zu(x)) against x (the gate's e(x))."""
        x = self._as_batch(x)
        parts = []
        for i in range(0, len(x), batch_size):
            xb = tf.constant(x[i : i + batch_size])
            mean, _, zu = self.combo_vae.encode(xb)
            parts.append(reconstruction_error(xb, self.combo_vae.decode(mean, zu),
                                              self.recon_metric, self.recon_pixel_tol).numpy())
        return np.concatenate(parts)

    def calibrate(self, x_val, batch_size: int = 64, val_resistance=None,
                  verify_rows: int = 32) -> dict:
        """Set normal ranges, θr and θd from clean validation images (ART's `fit`).

        `val_resistance` [n, m]: resistances of `x_val` computed earlier by this very model and
        morph settings (e.g. `val_resistance.npy` from a previous calibration), to change ρ / η /
        the threshold mode without recomputing all n·m·N morphs. The first `verify_rows` rows are
        recomputed and must match exactly, otherwise ValueError.

        Returns the calibration figures (VAL false-positive rate, thresholds, mean resistance).
        """
        x_val = self._as_batch(x_val)
        means = np.concatenate([
            self.combo_vae.shared_encoder(x_val[i : i + 512])[0].numpy()
            for i in range(0, len(x_val), 512)
        ])
        low, high = morphs.normal_ranges(means, self.range_percentiles)
        self.code_low.assign(low)
        self.code_high.assign(high)
        self.calibrated.assign(0.0)  # new ranges: old thresholds are void; full budget below
        if val_resistance is None:
            r_val = self.resistance(x_val, batch_size)
        else:
            r_val = np.asarray(val_resistance, dtype=np.float32)
            if r_val.shape != (len(x_val), self.num_codes):
                raise ValueError(f"val_resistance must be [{len(x_val)}, {self.num_codes}], "
                                 f"got {r_val.shape}")
            k = min(int(verify_rows), len(x_val))
            if not np.array_equal(self.resistance(x_val[:k], batch_size), r_val[:k]):
                raise ValueError("val_resistance does not match this model's resistances on the "
                                 f"first {k} VAL images: recompute it (omit val_resistance)")
        theta_r = calibration.resistance_thresholds(
            r_val, self.rho, self.threshold_mode, self.num_morphs
        )
        theta_d, theta_d_info = calibration.distance_threshold(
            r_val, theta_r, self.eta, self.threshold_mode, self.num_morphs,
            self.min_suspicious, self.eta_reference_rho,
        )
        e_val = self.reconstruction_error(x_val)
        theta_e = calibration.recon_threshold(e_val, self.recon_fpr)
        self.theta_r.assign(theta_r)
        self.theta_d.assign(theta_d)
        self.theta_e.assign(theta_e)
        self.calibrated.assign(1.0)
        flagged = calibration.is_suspicious(r_val, theta_r) | (e_val > theta_e)
        return {
            "num_val": int(len(x_val)),
            "code_low": low.tolist(),
            "code_high": high.tolist(),
            "theta_r": theta_r.tolist(),
            "theta_d": float(theta_d),
            "theta_d_rule": theta_d_info,
            "val_false_positive_rate": float(np.mean(flagged)),
            "val_resistance_false_positive_rate": calibration.false_positive_rate(r_val, theta_r),
            "recon_fpr": self.recon_fpr,
            "theta_e": theta_e if np.isfinite(theta_e) else None,
            "val_recon_rejected_rate": float(np.mean(e_val > theta_e)),
            "val_recon_error_median": float(np.median(e_val)),
            "val_mean_resistance": r_val.mean(axis=0).tolist(),
            "val_share_min_resistance_zero": float(np.mean(r_val.min(axis=1) == 0.0)),
            "val_resistance": r_val,
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            classifier=keras.saving.serialize_keras_object(self.classifier),
            combo_vae=keras.saving.serialize_keras_object(self.combo_vae),
            num_morphs=self.num_morphs,
            candidates_per_step=self.candidates_per_step,
            radius_step=self.radius_step,
            max_steps=self.max_steps,
            range_percentiles=list(self.range_percentiles),
            selected_codes=list(self.selected_codes),
            threshold_mode=self.threshold_mode,
            rho=self.rho,
            eta=self.eta,
            min_suspicious=self.min_suspicious,
            eta_reference_rho=self.eta_reference_rho,
            purify_zu=self.purify_zu,
            purify_label=self.purify_label,
            chunk_size=self.chunk_size,
            seed=self.seed,
            jit_compile=self.jit_compile,
            adaptive_budget=self.adaptive_budget,
            adaptive_round=self.adaptive_round,
            adaptive_alpha=self.adaptive_alpha,
            adaptive_refine_codes=self.adaptive_refine_codes,
            adaptive_order=self.adaptive_order,
            morph_dtype=self.morph_dtype,
            recon_fpr=self.recon_fpr,
            recon_metric=self.recon_metric,
            recon_pixel_tol=self.recon_pixel_tol,
        )
        return config


def reconstruction_error(images, reconstruction, metric="mae", pixel_tol=0.15):
    """e(x) of the reconstruction gate, [B], for `images` and `reconstruction` [B, H, W, C]:
    the mean over the pixels of |x - x̂| ("mae"), of (x - x̂)² ("mse"), or of
    1[|x - x̂| > pixel_tol] ("pixel_share", the share of pixels off by more than τ)."""
    if metric not in RECON_METRICS:
        raise ValueError(f"metric must be one of {RECON_METRICS}, got {metric!r}")
    diff = tf.reshape(images - reconstruction, [tf.shape(images)[0], -1])
    if metric == "mse":
        per_pixel = tf.square(diff)
    elif metric == "mae":
        per_pixel = tf.abs(diff)
    else:
        per_pixel = tf.cast(tf.abs(diff) > pixel_tol, diff.dtype)
    return tf.reduce_mean(per_pixel, axis=-1)


def _maybe_deserialize(obj):
    if isinstance(obj, dict):
        return keras.saving.deserialize_keras_object(obj)
    return obj
