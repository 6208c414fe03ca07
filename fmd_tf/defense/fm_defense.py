"""FMDefense: the detector-purifier of the paper as one Keras model (§III-A, C, D; Eq. 5)."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from fmd_tf import options as _options
from fmd_tf.config import (  # noqa: F401  (PURIFY_*: re-exported, defined with the options)
    LEGACY_DEFAULTS,
    PURIFY_LABELS,
    PURIFY_ZU,
    RECON_METRICS,
    DefenseConfig,
)
from fmd_tf.defense import adaptive_budget as adaptive
from fmd_tf.defense import calibration, morphs, precision
from fmd_tf.loading import SAVE_FORMAT, check_save_format
from fmd_tf.progress import in_batches

VERDICT_PASSED, VERDICT_PURIFIED, VERDICT_REJECTED = 0, 1, 2
OUTPUT_KEYS = ("label", "verdict", "classifier_label", "resistance", "distance", "purified",
               "recon_error")

# Keyword arguments of FMDefense that go to keras.Model, not to the DefenseConfig.
_KERAS_KWARGS = ("name", "trainable", "dtype", "autocast", "activity_regularizer")
_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(DefenseConfig))


class NotCalibratedError(RuntimeError):
    """The defense was used before `calibrate` set its ranges and thresholds."""


def _check_images_static(images, image_shape):
    """Python-side checks that need no data: dtype, rank, image size (`image_shape` None: a
    model not built yet, dtype and rank only)."""
    dtype = getattr(images, "dtype", None)
    if dtype is not None:
        try:
            tf_dtype = tf.as_dtype(dtype)
        except TypeError:  # numpy dtypes TensorFlow has no counterpart for (datetime64, ...)
            tf_dtype = None
        # numpy's own name: an object array would read "string" (what TensorFlow maps it to)
        name = dtype.name if isinstance(dtype, np.dtype) else tf_dtype.name
        if tf_dtype is None or not tf_dtype.is_floating or name == "object":
            hint = " (divide uint8 images by 255 first)" if tf_dtype is not None and \
                tf_dtype.is_integer else ""
            raise TypeError(f"images must be float32 in [0, 1], got dtype {name}{hint}")
    shape = tuple(images.shape)
    size = "H, W, C" if image_shape is None else ", ".join(map(str, image_shape))
    if len(shape) != 4:
        raise ValueError(f"images must have rank 4 [batch, {size}], got shape {shape}")
    if image_shape is not None and shape[1:] != tuple(image_shape) and None not in shape[1:]:
        raise ValueError(f"images must be [batch, {', '.join(map(str, image_shape))}], got {shape}")


def check_image_values(x) -> np.ndarray:
    """A non-empty numpy batch as float32, finite and in [0, 1]; ValueError naming the problem
    (nothing is clipped)."""
    if len(x) == 0:
        raise ValueError("images: empty batch")
    # The values as given, before the cast: a float64 1e300 is out of [0, 1], not an Inf.
    x = np.asarray(x)
    if not np.all(np.isfinite(x)):
        raise ValueError("images contain NaN or Inf")
    if x.min() < 0.0 or x.max() > 1.0:
        raise ValueError(
            f"images must be in [0, 1], found values in [{x.min():.3g}, {x.max():.3g}]"
        )
    return x.astype(np.float32, copy=False)


def validate_images(images, image_shape):
    """Graph-side checks (InvalidArgumentError naming the problem); returns float32 images.

    In order, each stage only once the previous one passed, so that the first problem is the
    one reported: rank and image size, empty batch, NaN / Inf, range. (A graph fed a batch of
    another rank - a SavedModel signature does not check the rank of what it is given - failed
    inside the size comparison with "Incompatible shapes: [3] vs. [2]", or in a reduction.)

    The checks read the batch through a `PlaceholderWithDefault` of unknown shape: otherwise
    the signature's static shape [None, *image_shape] lets the rank test be folded away at
    trace time, and a batch of another rank failed in the folded ops ("must be a scalar")."""
    images = tf.cast(images, tf.float32)
    rank = len(image_shape) + 1
    unshaped = tf.raw_ops.PlaceholderWithDefault(input=images, shape=tf.TensorShape(None))
    shape = tf.shape(unshaped)
    # H, W, C whatever the rank (padded with -1), so that the comparison itself cannot fail.
    dims = tf.concat([shape, tf.fill([rank], -1)], 0)[1:rank]
    fits = tf.logical_and(tf.equal(tf.size(shape), rank),
                          tf.reduce_all(tf.equal(dims, tf.constant(image_shape, tf.int32))))
    stages = [
        lambda: [tf.debugging.assert_equal(
            tf.cast(fits, tf.int32), 1,
            message=f"images must be [batch, {', '.join(map(str, image_shape))}]")],
        lambda: [tf.debugging.assert_positive(shape[0], message="images: empty batch")],
        lambda: [tf.debugging.assert_all_finite(unshaped, message="images contain NaN or Inf")],
        lambda: [
            tf.debugging.assert_greater_equal(
                tf.reduce_min(unshaped), 0.0,
                message="images must be in [0, 1]: found a value < 0"),
            tf.debugging.assert_less_equal(
                tf.reduce_max(unshaped), 1.0,
                message="images must be in [0, 1]: found a value > 1"),
        ],
    ]
    checks = []
    for stage in stages:
        with tf.control_dependencies(checks):
            checks = stage()
    with tf.control_dependencies(checks):
        return tf.identity(images)


def decide(resistance, theta_r, theta_d, recon_error=None, theta_e=None, margin=None,
           theta_m=None):
    """Verdicts of the detector-purifier from resistance vectors (§III-A, Eq. 5).

    Args:
        resistance: [B, m] float32.
        theta_r: [m] resistance thresholds; a row is normal iff r(i) > θr(i) for all i.
        theta_d: scalar distance threshold; suspicious rows with Dis <= θd are purified.
        recon_error, theta_e: optional reconstruction gate (not in the paper): rows with
            recon_error [B] > θe are rejected whatever their resistance.
        margin, theta_m: optional classifier-margin gate (not in the paper): rows with logit
            margin [B] < θm are rejected whatever their resistance.

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
    if margin is not None:
        verdict = tf.where(margin < theta_m, VERDICT_REJECTED, verdict)
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

    def get_config(self):
        from fmd_tf import __version__

        return {**super().get_config(), "fmd_tf_format": SAVE_FORMAT,
                "fmd_tf_version": __version__}

    # The constructor's jit_compile as given: None stays None ("auto" by our rule in
    # `_compiled`). keras.Model's own property would resolve None to True on any machine with a
    # GPU, also for graphs XLA cannot compile (the adaptive budget, the ensemble's member draw).
    @property
    def jit_compile(self):
        return getattr(self, "_jit_setting", None)

    @jit_compile.setter
    def jit_compile(self, value):
        self._jit_setting = value

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
            # autograph off: the graph code uses tf.cond / tf.while_loop itself, and converting
            # every Keras layer's call made the first call (tracing) about twice as slow.
            self._graph_fn = tf.function(self._defend, jit_compile=jit, reduce_retracing=True,
                                         autograph=False)
        return self._graph_fn

    def __call__(self, images, *args, **kwargs):
        # numpy input (eager use from Python): checked here, so that a bad image raises a
        # ValueError / TypeError that names the problem instead of a graph error (tensors
        # keep the in-graph checks of `validate_images`, which the SavedModel runs too). Numpy
        # scalars and nested lists too: Keras would fail on them with messages of its own.
        if isinstance(images, (np.ndarray, np.generic, list, tuple, float, int)):
            images = self._as_batch(images)
        return super().__call__(images, *args, **kwargs)

    def call(self, images):
        if self._image_shape is not None:
            _check_images_static(images, self._image_shape)
        if tf.executing_eagerly():
            return self._compiled()(images)
        return self._defend(images)

    # ----------------------------------------------------------------------------- numpy API
    def _as_batch(self, x) -> np.ndarray:
        try:
            x = np.asarray(x)
        except ValueError as e:  # nested lists of uneven lengths
            raise ValueError(f"images must be an array [batch, H, W, C]: {e}") from None
        # dtype and rank before a first build (which takes the image shape from `x`): a model
        # built from a rank-3 batch failed in Keras, with a message about kernel shapes.
        _check_images_static(x, self._image_shape if self.built else None)
        if not self.built:
            self.build((None, *x.shape[1:]))
        return check_image_values(x)

    def defend(self, x, batch_size: int = 64, verbose: int = 0) -> dict:
        """`call` on a numpy array of any length, in batches; numpy outputs. `verbose` shows
        a progress bar."""
        x = self._as_batch(x)
        self._require_calibrated()
        return self._passes(x, batch_size, verbose, self.output_keys)

    def defend_with_stats(self, x, batch_size: int = 64, verbose: int = 0,
                          outcomes: bool = False) -> dict:
        """`defend` plus `morphs_used` int32 [n, m], the morphs drawn per (image, code) pair.

        `outcomes`: run the full budget whatever the model's own, and add `morph_outcomes`
        bool [n, m, N] (morph j of code i kept the label), from which
        `adaptive_resistance_on_outcomes` replays any adaptive budget.
        """
        if outcomes and not hasattr(self, "_full_outcomes"):
            raise ValueError(f"{type(self).__name__} has no morph outcomes of its own: ask "
                             "each member (FMDefense) for them")
        x = self._as_batch(x)
        self._require_calibrated()
        if outcomes:
            keys = (*self.output_keys, "morphs_used", "morph_outcomes")
            return self._passes(x, batch_size, verbose, keys, with_outcomes=True)
        return self._passes(x, batch_size, verbose, (*self.output_keys, "morphs_used"),
                            with_stats=True)

    def _passes(self, x, batch_size: int, verbose: int, keys, **flags) -> dict:
        """{key: numpy [n, ...]} of the graph (`_defend` with `flags`) over the float32 numpy
        images `x` in batches."""
        fn = self._compiled()
        # One trace for any batch size (a shorter last batch would otherwise trace again).
        fn.get_concrete_function(tf.TensorSpec([None, *x.shape[1:]], tf.float32), **flags)
        parts = in_batches(lambda b: fn(tf.constant(b), **flags), x, batch_size, verbose)
        return {k: np.concatenate([p[k].numpy() for p in parts]) for k in keys}

    def logit_margins(self, x, batch_size: int = 512) -> np.ndarray:
        """[n] the classifier's logit margin m(x) (top-1 minus top-2 logit; the margin gate's
        score) of each image of `x`."""
        x = self._as_batch(x)
        return np.concatenate([
            calibration.logit_margin(self.classifier(tf.constant(x[i : i + batch_size])))
            .numpy() for i in range(0, len(x), batch_size)])

    def detect(self, x, batch_size: int = 64, verbose: int = 0):
        """ART-style detection: (report dict, is_adversarial [n] bool = verdict != passed).
        `verbose` shows a progress bar."""
        out = self.defend(x, batch_size, verbose)
        return out, out["verdict"] != VERDICT_PASSED


@keras.saving.register_keras_serializable(package="fmd_tf")
class FMDefense(BatchedDefense, keras.Model):
    """Classifier + combo-VAE + calibration state; `call` detects and purifies a batch.

    For each image: label y0 = classifier(x); codes μs(x), zu(x); for every selected code i,
    N natural morphs (`morphs.natural_morph_codes`) decoded with the other codes and zu fixed;
    resistance r(i) = share of morphs classified y0. Verdict: passed if r(i) > θr(i) for all i;
    else purified if Dis(r, θr) <= θd (label = classifier(decoder(μs(x) ‖ zu))); else rejected
    (label -1). With `recon_fpr` > 0 (not in the paper) an input whose reconstruction error
    exceeds θe is rejected first, and with `margin_fpr` > 0 (not in the paper) one whose
    classifier logit margin is below θm. See `fmd_tf.defense.calibration` for how θr, θd, θe
    and θm are set.

    All B·m·N morphs run through decoder and classifier in chunks of `chunk_size` inside one
    graph (`tf.map_fn`), so memory is bounded and there is no Python loop at run time. The
    search offsets are drawn from `seed` when the model is built and saved as a weight: the same
    model and image give the same outputs in any process, whatever the rest of the batch.

    Args:
        classifier: Keras model, images -> logits.
        combo_vae: trained `ComboVAE`.
        config: a `fmd_tf.config.DefenseConfig` (None: its defaults): N, the natural-morph
            search, calibration, purification, the adaptive budget and the reconstruction gate.
            Each option's meaning, default and valid range is declared once there.
        jit_compile: XLA for the graph; None = on when a GPU is visible (XLA was ~3x slower on
            CPU) and `adaptive_budget` is off. Not with `adaptive_budget` (data-dependent
            shapes).
        **options: DefenseConfig fields overriding `config`, e.g. `FMDefense(clf, combo,
            rho=0.95, num_morphs=8)`; besides them only keras.Model's name, trainable, dtype.
            An unknown name is a TypeError.

    Every option is a read-only attribute (`fmd.rho`, `fmd.recon_metric`, ...) and `fmd.config`
    is the whole DefenseConfig, with `selected_codes` resolved (None -> all d_s codes).
    `get_config()` stores the options flat, as files always did; files saved before an option
    existed load with its default, except `recon_metric`, which they load as "mse" (the gate's
    error before the option existed). `copy_with(**changes)` makes a copy with other options.

    Call: images float32 [B, H, W, C] in [0, 1] -> dict with `label` int64 [B] (-1 when
    rejected), `verdict` int32 [B] (0 passed, 1 purified, 2 rejected), `classifier_label` int64
    [B], `resistance` float32 [B, m], `distance` float32 [B], `purified` float32 [B, H, W, C],
    `recon_error` float32 [B] (`recon_metric` error of decoder(μs(x) ‖ zu(x)) against x). The
    classifier's logit margin, the margin gate's score, is `logit_margins(x)`.
    """

    def __init__(self, classifier, combo_vae, config=None, jit_compile=None, **options):
        keras_kwargs = {k: options.pop(k) for k in _KERAS_KWARGS if k in options}
        unknown = [k for k in options if k not in _OPTION_NAMES]
        if unknown:
            raise _options.unknown_option_error(DefenseConfig, unknown)
        if config is None:
            config = DefenseConfig()
        elif not isinstance(config, DefenseConfig):
            raise TypeError(f"config must be a DefenseConfig, got {type(config).__name__}")
        super().__init__(**keras_kwargs)
        self.classifier = _maybe_deserialize(classifier)
        self.combo_vae = _maybe_deserialize(combo_vae)
        self.jit_compile = jit_compile
        config = dataclasses.replace(config, **options)
        if config.selected_codes is None:
            config = dataclasses.replace(
                config, selected_codes=tuple(range(self.combo_vae.num_codes)))
        self._check_arguments(config, self.combo_vae.num_codes, jit_compile)
        self._config = config
        self._image_shape = None
        self._graph_fn = None
        self._decisions_fn = None

    @property
    def config(self) -> DefenseConfig:
        """The options (a frozen `fmd_tf.config.DefenseConfig`, selected codes resolved)."""
        return self._config

    @staticmethod
    def _check_arguments(config, num_codes, jit_compile):
        """The DefenseConfig's own checks, then those that need the model."""
        _options.validate(config)
        if max(config.selected_codes) >= num_codes:
            raise _options.OptionError(
                "selected_codes", f"must be in [0, {num_codes}) (the combo-VAE's class-shared "
                f"codes: d_s = {num_codes})", config.selected_codes)
        m = len(config.selected_codes)
        if config.adaptive_refine_codes > m:
            raise _options.OptionError("adaptive_refine_codes",
                                       f"must be in [0, {m}] (the number of selected codes)",
                                       config.adaptive_refine_codes)
        dynamic = _dynamic_shapes(config) if jit_compile else ""
        if dynamic:
            raise ValueError(f"{dynamic} has data-dependent shapes: jit_compile "
                             f"must be None or False, or use copy_with(**FMDefense.XLA_OPTIONS)")

    @classmethod
    def from_config_dataclass(cls, classifier, combo_vae, defense_cfg, **kwargs):
        """Build from a `fmd_tf.config.DefenseConfig` (same as `cls(classifier, combo_vae,
        defense_cfg, **kwargs)`)."""
        return cls(classifier, combo_vae, defense_cfg, **kwargs)

    @staticmethod
    def upgrade_config(config: dict) -> dict:
        """A saved config (`get_config()` of any version) as today's: options missing from an
        old file take the value they had before they existed (`LEGACY_DEFAULTS`, e.g. θe was
        calibrated on the squared error), or else their default in the constructor."""
        return {**LEGACY_DEFAULTS, **check_save_format(config)}

    @classmethod
    def from_config(cls, config):
        return super().from_config(cls.upgrade_config(config))

    def get_config(self):
        config = super().get_config()
        config.update(
            classifier=keras.saving.serialize_keras_object(self.classifier),
            combo_vae=keras.saving.serialize_keras_object(self.combo_vae),
            jit_compile=self.jit_compile,
        )
        # The options flat, tuples as lists (the layout of every saved file).
        for name in _OPTION_NAMES:
            value = getattr(self._config, name)
            config[name] = list(value) if isinstance(value, tuple) else value
        return config

    # In the order `build` adds them (the order of a saved file's variables).
    STATE_WEIGHTS = ("code_low", "code_high", "theta_r", "theta_d", "theta_e", "calibrated",
                     "search_table", "theta_m")

    def copy_with(self, classifier=None, **changes) -> FMDefense:
        """A built copy with other constructor options (`changes`: DefenseConfig fields or
        jit_compile), sharing this defense's combo-VAE and, unless `classifier` is given, its
        classifier; ranges, thresholds and search table are copied. E.g.
        `fmd.copy_with(adaptive_budget=True)`."""
        jit_compile = changes.pop("jit_compile", self.jit_compile)
        if jit_compile and _dynamic_shapes(dataclasses.replace(self._config, **{
                k: v for k, v in changes.items() if k in _OPTION_NAMES})):
            jit_compile = None  # data-dependent shapes cannot be XLA-compiled
        changes.setdefault("name", self.name)
        copy = FMDefense(self.classifier if classifier is None else classifier, self.combo_vae,
                         self._config, jit_compile=jit_compile, **changes)
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
        d_s, m = self.combo_vae.num_codes, self.num_codes
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
        self.theta_m = weight("theta_m", (), keras.initializers.Constant(-np.inf))
        self.built = True

    def load_own_variables(self, store):
        # A file saved before the margin gate existed has every state weight but θm (the last
        # one): it loads with the gate off (θm = -inf), as it behaved.
        own = self._trainable_variables + self._non_trainable_variables
        if len(store.keys()) == len(own) - 1 and own[-1] is self.theta_m:
            for i, variable in enumerate(own[:-1]):
                variable.assign(store[f"{i}"])
            self.theta_m.assign(-np.inf)
            return
        super().load_own_variables(store)

    def get_build_config(self):
        return {"input_shape": [None, *self._image_shape]} if self._image_shape else {}

    def build_from_config(self, config):
        if config:
            self.build(config["input_shape"])

    def purify_threshold(self):
        """The θd that `decide` gets (`calibration.purify_threshold`): the calibrated one, or
        -inf with `suspicious` "reject"."""
        return calibration.purify_threshold(self.theta_d, self.suspicious)

    @property
    def is_calibrated(self) -> bool:
        return self.built and float(self.calibrated.numpy()) > 0.5

    # The paper's inference path, the reference of the default one: all m·N morphs, in float32.
    FULL_BUDGET = {"adaptive_budget": False, "morph_dtype": "float32"}
    # Options of a copy whose graph has fixed shapes (XLA): the full budget's.
    XLA_OPTIONS = FULL_BUDGET

    def _xla_compatible(self) -> bool:
        return not _dynamic_shapes(self._config)

    def _labels_of(self, latents):
        """Classifier labels [M] int64 of decoder(latents [M, D]) in `morph_dtype`."""
        return precision.morph_labels(self.classifier, self.combo_vae.decoder, latents,
                                      self.morph_dtype, self.morph_check_margin)

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
            return self._labels_of(z)

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
        current = tf.gather(self.combo_vae.code_values(mean), selected, axis=1)  # [B, m]
        values = morphs.natural_morph_codes(
            current, tf.gather(self.code_low, selected),
            tf.gather(self.code_high, selected), self.search_table, self.num_morphs,
        )
        return adaptive.adaptive_resistance(
            mean, zu, label, selected, values, self.theta_r,
            self._labels_of,
            self.adaptive_round, self.adaptive_alpha, self.chunk_size,
            refine_codes=self.adaptive_refine_codes,
            order=adaptive.draw_order(self.adaptive_order, self.num_morphs, self.seed),
            current=current, code_masks=self.combo_vae.code_masks(selected),
        )

    def adaptive_resistance_on_outcomes(self, outcomes):
        """(r [n, m] float32, morphs drawn [n, m] int32) that this model's adaptive budget
        (its round, α, refined codes, draw order and θr) gives on images whose full-budget morph
        outcomes [n, m, N] bool are `outcomes` (`defend_with_stats(x, outcomes=True)`),
        replayed without the model (`adaptive_budget.adaptive_resistance_on_outcomes`)."""
        r, used = adaptive.adaptive_resistance_on_outcomes(
            outcomes, self.theta_r, self.adaptive_round, self.adaptive_alpha,
            refine_codes=self.adaptive_refine_codes,
            order=adaptive.draw_order(self.adaptive_order, self.num_morphs, self.seed))
        return r.numpy(), used.numpy()

    def _full_resistance(self, mean, zu, label, return_used=False):
        """r [B, m]: share of each code's N morphs that keep `label`."""
        r, used = self._resistance_of(self._full_outcomes(mean, zu, label))
        return (r, used) if return_used else r

    def _resistance_of(self, outcomes):
        """(r [B, m], morphs drawn [B, m] int32 = N) of full-budget outcomes [B, m, N]."""
        r = adaptive.full_resistance(outcomes)
        return r, tf.fill(tf.shape(r), tf.constant(self.num_morphs, tf.int32))

    def morph_latents(self, mean, zu):
        """Decoder inputs of all N natural morphs of every selected code: concat(zs, zu)
        [B, m, N, D + K] for μs(x) `mean` [B, D] and zu(x) `zu` [B, K] (§III-C); the codes'
        values and morphs come from the combo-VAE (`code_values`, `with_code_values`: one
        dimension per code for a vector latent, a whole channel for a feature map)."""
        selected = tf.constant(self.selected_codes, tf.int32)
        low = tf.gather(self.code_low, selected)
        high = tf.gather(self.code_high, selected)
        values = morphs.natural_morph_codes(
            tf.gather(self.combo_vae.code_values(mean), selected, axis=1), low, high,
            self.search_table, self.num_morphs
        )
        zs = self.combo_vae.with_code_values(mean, selected, values)  # [B, m, N, D]
        batch, m, n = tf.shape(mean)[0], self.num_codes, self.num_morphs
        zu_all = tf.broadcast_to(zu[:, None, None, :], [batch, m, n, tf.shape(zu)[-1]])
        return tf.concat([zs, zu_all], axis=-1)

    def _full_outcomes(self, mean, zu, label):
        """[B, m, N] bool: morph j of code i keeps `label` (all N natural morphs)."""
        latents = self.morph_latents(mean, zu)
        batch, m, n = tf.shape(mean)[0], self.num_codes, self.num_morphs
        labels = tf.reshape(self._morph_labels(tf.reshape(latents, [batch * m * n, -1])),
                            [batch, m, n])
        return tf.equal(labels, label[:, None, None])

    def _defend(self, images, with_stats=False, with_outcomes=False):
        return self._defend_valid(validate_images(images, self._image_shape), with_stats,
                                  with_outcomes)

    def _defend_valid(self, images, with_stats=False, with_outcomes=False):
        """`_defend` on already validated float32 images (any batch size, 0 included);
        `with_outcomes`: the full budget, and its morph outcomes [B, m, N] bool."""
        logits, label, mean, zu, reconstruction, recon_error = self._gate_inputs(images)
        if with_outcomes:
            outcomes = self._full_outcomes(mean, zu, label)
            resistance, morphs_used = self._resistance_of(outcomes)
        else:
            resistance, morphs_used = self._resistance(mean, zu, label, return_used=True)
        purified, purified_label = self._purify_codes(mean, zu, label, reconstruction)
        verdict, distance = decide(resistance, self.theta_r, self.purify_threshold(),
                                   recon_error, self.theta_e,
                                   calibration.logit_margin(logits), self.theta_m)
        return {
            "label": final_label(verdict, label, purified_label),
            "verdict": verdict,
            "classifier_label": label,
            "resistance": resistance,
            "distance": distance,
            "purified": purified,
            "recon_error": recon_error,
            **({"morphs_used": morphs_used} if with_stats or with_outcomes else {}),
            **({"morph_outcomes": outcomes} if with_outcomes else {}),
        }

    def _gate_inputs(self, images):
        """(logits [B, K], label int64 [B], μs(x) [B, d_s], zu(x) [B, d_u], reconstruction
        decoder(μs ‖ zu) [B, H, W, C], its `recon_metric` error [B]) of validated images:
        what the gates decide on and the morphs start from."""
        logits = self.classifier(images)
        mean, _, zu = self.combo_vae.encode(images)
        reconstruction = self.combo_vae.decode(mean, zu)
        recon_error = reconstruction_error(images, reconstruction, self.recon_metric,
                                           self.recon_pixel_tol)
        return logits, tf.argmax(logits, axis=-1), mean, zu, reconstruction, recon_error

    def _gate_decisions(self, images):
        """`_defend`'s label, verdict and classifier_label with every resistance taken as 0:
        the same as `_defend`'s when no θr(i) can flag (`resistance_can_flag`), since then no
        resistance is suspicious and only the reconstruction and margin gates decide."""
        images = validate_images(images, self._image_shape)
        logits, label, _, _, _, recon_error = self._gate_inputs(images)
        never = tf.zeros([tf.shape(images)[0], tf.shape(self.theta_r)[0]], tf.float32)
        verdict, _ = decide(never, self.theta_r, self.purify_threshold(), recon_error,
                            self.theta_e, calibration.logit_margin(logits), self.theta_m)
        return {"label": final_label(verdict, label, label), "verdict": verdict,
                "classifier_label": label}

    def decisions(self, x, batch_size: int = 64) -> dict:
        """`defend`'s `label`, `verdict` and `classifier_label` [n] without the morphs, for a
        defense whose resistance thresholds cannot flag (every θr(i) < 0, as ρ 0.999 leaves
        them on the robust mode): then nothing is suspicious or purified and only the gates
        reject, so these are exactly `defend`'s answers at a fraction of its cost (what a
        decision-based attacker of the endpoint sees). ValueError when a threshold can flag."""
        from fmd_tf.operating_point import resistance_can_flag

        x = self._as_batch(x)
        self._require_calibrated()
        if resistance_can_flag(self):
            raise ValueError("a resistance threshold can flag: the verdicts need the morphs "
                             "(use defend)")
        if self._decisions_fn is None:
            self._decisions_fn = tf.function(self._gate_decisions, reduce_retracing=True,
                                             autograph=False)
        parts = in_batches(lambda b: self._decisions_fn(tf.constant(b)), x, batch_size, 0)
        return {k: np.concatenate([p[k].numpy() for p in parts])
                for k in ("label", "verdict", "classifier_label")}

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
    def resistance(self, x, batch_size: int = 64, verbose: int = 0) -> np.ndarray:
        """Resistance vectors [n, m] (needs the normal ranges, not the thresholds)."""
        x = self._as_batch(x)
        if not np.any(self.code_high.numpy() > self.code_low.numpy()):
            raise NotCalibratedError("normal ranges are not set: call calibrate(x_val) first")
        return self._passes(x, batch_size, verbose, ("resistance",))["resistance"]

    def morph_images(self, x, code: int, count: int | None = None) -> np.ndarray:
        """The first `count` decoded natural morphs of selected code `code`: [n, count, H, W, C]."""
        x = self._as_batch(x)
        if code not in self.selected_codes:
            raise ValueError(f"code {code} is not one of the selected codes {self.selected_codes}")
        count = self.num_morphs if count is None else min(int(count), self.num_morphs)
        position = self.selected_codes.index(code)
        mean, _, zu = self.combo_vae.encode(x)
        values = morphs.natural_morph_codes(
            self.combo_vae.code_values(mean)[:, code : code + 1],
            self.code_low[code : code + 1], self.code_high[code : code + 1],
            self.search_table[position : position + 1], self.num_morphs,
        )[:, 0, :count]  # [n, count]
        zs = self.combo_vae.with_code_values(mean, tf.constant([code]), values[:, None, :])[:, 0]
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
                  verify_rows: int = 32, verbose: int = 0) -> dict:
        """Set normal ranges, θr, θd, θe and θm from clean validation images (ART's `fit`).

        `val_resistance` [n, m]: resistances of `x_val` computed earlier by this very model and
        morph settings (e.g. `val_resistance.npy` from a previous calibration), to change ρ / η /
        the threshold mode without recomputing all n·m·N morphs. The first `verify_rows` rows are
        recomputed and must match exactly, otherwise ValueError.

        `verbose` shows a progress bar over the VAL images.

        Returns the calibration figures (VAL false-positive rate, thresholds, mean resistance),
        `val_resistance` [n, m] and, when computed here, `val_morph_outcomes` [n, m, N] bool.
        """
        x_val = self._as_batch(x_val)
        means = np.concatenate([  # [n, codes]: each code's value (normal ranges are over them)
            self.combo_vae.code_values(self.combo_vae.shared_encoder(x_val[i : i + 512])[0])
            .numpy() for i in range(0, len(x_val), 512)
        ])
        low, high = morphs.normal_ranges(means, self.range_percentiles)
        self.code_low.assign(low)
        self.code_high.assign(high)
        self.calibrated.assign(0.0)  # new ranges: old thresholds are void; full budget below
        outcomes = None
        if val_resistance is None:
            full = self._passes(x_val, batch_size, verbose, ("resistance", "morph_outcomes"),
                                with_outcomes=True)
            r_val, outcomes = full["resistance"], full["morph_outcomes"]
        else:
            r_val = np.asarray(val_resistance, dtype=np.float32)
            if r_val.shape != (len(x_val), self.num_codes):
                raise ValueError(f"val_resistance must be [{len(x_val)}, {self.num_codes}], "
                                 f"got {r_val.shape}")
            k = min(int(verify_rows), len(x_val))
            if k > 0 and not np.array_equal(self.resistance(x_val[:k], batch_size), r_val[:k]):
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
        m_val = self.logit_margins(x_val)
        theta_m = calibration.margin_threshold(m_val, self.margin_fpr)
        self.theta_r.assign(theta_r)
        self.theta_d.assign(theta_d)
        self.theta_e.assign(theta_e)
        self.theta_m.assign(theta_m)
        self.calibrated.assign(1.0)
        flagged = (calibration.is_suspicious(r_val, theta_r) | (e_val > theta_e)
                   | (m_val < theta_m))
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
            "margin_fpr": self.margin_fpr,
            "theta_m": theta_m if np.isfinite(theta_m) else None,
            "val_margin_rejected_rate": float(np.mean(m_val < theta_m)),
            "val_mean_resistance": r_val.mean(axis=0).tolist(),
            "val_share_min_resistance_zero": float(np.mean(r_val.min(axis=1) == 0.0)),
            "val_resistance": r_val,
            **({} if outcomes is None else {"val_morph_outcomes": outcomes}),
        }


def _dynamic_shapes(config: DefenseConfig) -> str:
    """The options of `config` that give the graph data-dependent shapes (not XLA-compatible),
    as text ("" if none): the adaptive budget, checked reduced-precision morphs."""
    reasons = []
    if config.adaptive_budget:
        reasons.append("adaptive_budget")
    if precision.resolve_dtype(config.morph_dtype) != "float32" and config.morph_check_margin > 0:
        reasons.append(f"morph_dtype={config.morph_dtype!r} with morph_check_margin > 0")
    return " and ".join(reasons)


def _option_property(name: str) -> property:
    return property(lambda self: getattr(self._config, name),
                    doc=f"{_options.option_help(DefenseConfig, name)} (read-only: see "
                        "`copy_with`)")


for _name in _OPTION_NAMES:  # fmd.rho, fmd.recon_metric, ...: the DefenseConfig's fields
    setattr(FMDefense, _name, _option_property(_name))
del _name


def reconstruction_error(images, reconstruction, metric=DefenseConfig.recon_metric,
                         pixel_tol=DefenseConfig.recon_pixel_tol):
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
