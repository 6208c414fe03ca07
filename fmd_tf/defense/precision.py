"""Reduced-precision evaluation of the morphs (decoder + classifier) for `FMDefense`.

`FMDefense(morph_dtype="bfloat16")` (or `"float16"`; `"auto"` = bfloat16 where the machine
computes it natively, `bfloat16_is_fast`, else float32) runs the morph path under Keras' mixed
precision: while a morph chunk is traced, every layer of the decoder and the classifier gets
the policy `mixed_<dtype>`, so inputs and activations are `<dtype>` and the float32 variables
are cast to `<dtype>` when read (Keras autocasting). The variables themselves, the models' saved
configs and every other use of the models (the image's own label, encoding, purification) stay
float32: only the traced graph of the morph chunks differs, and `.keras` saving is untouched.

The policies are swapped on the Python objects for the duration of the trace and restored in a
`finally`, so do not trace another function on the same models from another thread at the same
time. Only labels (argmax of the logits) leave the reduced-precision region.

**Checked labels** (`check_margin` > 0, `DefenseConfig.morph_check_margin`). A reduced-precision
label can differ from float32's only where the two largest outputs are close: if every output's
rounding error is below ε, the argmax is float32's whenever the top-two margin exceeds 2ε. The
morphs whose reduced-precision margin is below `check_margin` are therefore evaluated again in
float32 (a gather of those rows; attacked images have more close calls than clean ones) and take
float32's label, so the labels are float32's unless some output's error exceeds
`check_margin` / 2. `scripts/bench.py`, section `bfloat16_vs_float32`, counts the morphs whose
checked label differs from float32's (0 of 512,000 on the shipped model). The margin is in
logit units: for a classifier that outputs probabilities (a softmax layer), it is taken between
the logarithms of the two largest (`output_margin`), the same logit margin.
"""

from __future__ import annotations

import contextlib
import functools

import tensorflow as tf

from fmd_tf.config import COMPUTE_DTYPES

__all__ = ["COMPUTE_DTYPES", "bfloat16_is_fast", "dtype_policy", "resolve_auto", "resolve_dtype",
           "mixed_policy",
           "output_margin", "morph_labels"]


@functools.cache
def bfloat16_is_fast() -> bool:
    """Whether this machine computes bfloat16 natively: a GPU of compute capability >= 8.0,
    else a CPU with AVX512-BF16 or AMX-BF16 (from /proc/cpuinfo). A fixed rule, not a timing
    probe, so that the choice does not depend on what else the machine is doing; looked up
    once per process (every trace of a morph chunk asks)."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return tuple(details.get("compute_capability", (0, 0))) >= (8, 0)
    try:
        with open("/proc/cpuinfo") as f:
            flags = {word for line in f if line.startswith("flags") for word in line.split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_auto(name: str, choices, reduced: str, what: str) -> str:
    """`name`, checked against `choices` (ValueError naming `what`), with "auto" resolved on
    this machine: `reduced` where `bfloat16_is_fast`, else "float32"."""
    if name not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {name!r}")
    if name != "auto":
        return name
    return reduced if bfloat16_is_fast() else "float32"


def resolve_dtype(name: str) -> str:
    """The compute dtype that `morph_dtype` `name` means on this machine ("auto" resolved)."""
    return resolve_auto(name, COMPUTE_DTYPES, "bfloat16", "compute dtype")


def _layers(model):
    return [model, *model._flatten_layers(include_self=False, recursive=True)]


@contextlib.contextmanager
def dtype_policy(name: str | None):
    """Keras' global dtype policy set to `name` inside the block (layers built there use it);
    None leaves it as it is."""
    import keras

    before = keras.config.dtype_policy()
    if name is not None:
        keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)


@contextlib.contextmanager
def mixed_policy(models, compute_dtype: str):
    """Within the block, the layers of `models` compute in `compute_dtype` (float32 weights)."""
    if compute_dtype == "float32":
        yield
        return
    saved = []
    try:
        for model in models:
            for layer in _layers(model):
                saved.append((layer, layer.dtype_policy))
                layer.dtype_policy = f"mixed_{compute_dtype}"
        yield
    finally:
        for layer, policy in reversed(saved):
            layer.dtype_policy = policy


def _labels(classifier, decoder, latents):
    return tf.argmax(classifier(decoder(latents)), axis=-1)


def output_margin(outputs):
    """Top-two margin [M] of classifier outputs [M, C] float32, in logit units: the difference
    of the two largest logits, or, where every row is a probability vector (non-negative, sums
    to 1 within 0.05: a softmax output), the difference of their logarithms, which is the
    same logit margin."""
    probabilities = tf.logical_and(
        tf.reduce_all(outputs >= 0.0),
        tf.reduce_all(tf.abs(tf.reduce_sum(outputs, axis=-1) - 1.0) < 0.05))
    scores = tf.cond(probabilities, lambda: tf.math.log(tf.maximum(outputs, 1e-30)),
                     lambda: outputs)
    top2 = tf.math.top_k(scores, k=2, sorted=True).values
    return top2[:, 0] - top2[:, 1]


def morph_labels(classifier, decoder, latents, compute_dtype: str = "float32",
                 check_margin: float = 0.0):
    """argmax classifier(decoder(latents)) for latents [M, D] float32 -> [M] int64.

    `compute_dtype` is resolved on this machine (`resolve_dtype`); with a reduced dtype and
    `check_margin` > 0 the rows whose top-two output margin is below it are evaluated again in
    float32 (module docstring, "Checked labels").
    """
    compute_dtype = resolve_dtype(compute_dtype)
    if compute_dtype == "float32":
        return _labels(classifier, decoder, latents)
    with mixed_policy((decoder, classifier), compute_dtype):
        outputs = tf.cast(classifier(decoder(latents)), tf.float32)
    labels = tf.argmax(outputs, axis=-1)
    if check_margin <= 0:
        return labels
    unsure = tf.where(output_margin(outputs) < check_margin)  # [U, 1]

    def recheck():
        exact = _labels(classifier, decoder, tf.gather_nd(latents, unsure))
        return tf.tensor_scatter_nd_update(labels, unsure, exact)

    # oneDNN's convolution fails on an empty batch, so a chunk with no close call skips it.
    return tf.cond(tf.size(unsure) > 0, recheck, lambda: labels)
