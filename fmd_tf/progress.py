"""Batched loops over many images, with a Keras progress bar (images/s and time left)."""

from __future__ import annotations

import keras
import numpy as np

__all__ = ["concat_outputs", "in_batches"]


def in_batches(fn, x, batch_size: int, verbose: int = 0) -> list:
    """[fn(x[i : i + batch_size]) for each batch start i], with a `keras.utils.Progbar` over the
    len(x) images when `verbose`. `x` is anything sliceable with a length (an image array, or
    `np.arange(n)` when `fn` needs each batch's offsets)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bar = keras.utils.Progbar(len(x), unit_name="image") if verbose else None
    parts = []
    for i in range(0, len(x), batch_size):
        parts.append(fn(x[i : i + batch_size]))
        if bar is not None:
            bar.update(min(i + batch_size, len(x)))
    return parts


def concat_outputs(parts: list[dict]) -> dict:
    """One dict of arrays from per-batch dicts with the same keys, each concatenated along the
    batch axis (dtype kept)."""
    if not parts:
        raise ValueError("no batches to concatenate")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
