"""Reduced-precision evaluation of the morphs (decoder + classifier) for `FMDefense`.

`FMDefense(morph_dtype="bfloat16")` (or `"float16"`) runs the morph path under Keras' mixed
precision: while a morph chunk is traced, every layer of the decoder and the classifier gets
the policy `mixed_<dtype>`, so inputs and activations are `<dtype>` and the float32 variables
are cast to `<dtype>` when read (Keras autocasting). The variables themselves, the models' saved
configs and every other use of the models (the image's own label, encoding, purification) stay
float32: only the traced graph of the morph chunks differs, and `.keras` saving is untouched.

The policies are swapped on the Python objects for the duration of the trace and restored in a
`finally`, so do not trace another function on the same models from another thread at the same
time. Only labels (argmax of the logits) leave the reduced-precision region.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _layers(model):
    return [model, *model._flatten_layers(include_self=False, recursive=True)]


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


def morph_labels(classifier, decoder, latents, compute_dtype: str = "float32"):
    """argmax classifier(decoder(latents)) for latents [M, D] float32 -> [M] int64."""
    with mixed_policy((decoder, classifier), compute_dtype):
        return tf.argmax(classifier(decoder(latents)), axis=-1)
