"""A list of Keras layers run in order: the plain stacks inside fmd_tf's subclassed models."""

from __future__ import annotations


def build_layers(layers, input_shape) -> tuple:
    """Build `layers` one after the other from `input_shape`; returns the last output shape.

    Each layer is built on the output shape of the one before, so a model's `build` creates
    every weight without running a forward pass.
    """
    shape = tuple(input_shape)
    for layer in layers:
        layer.build(shape)
        shape = layer.compute_output_shape(shape)
    return shape


def apply_layers(layers, h, **call_kwargs):
    """`h` through `layers` in order; `call_kwargs` (e.g. `training=`) go to every layer."""
    for layer in layers:
        h = layer(h, **call_kwargs)
    return h
