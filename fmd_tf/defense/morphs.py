"""Natural-morph generation (paper §III-C) as fixed-shape tensor functions.

Notation: B images, d_s class-shared codes, m selected codes, N morphs per code, J = S·Bc
search candidates per code (S search steps of Bc candidates each).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def normal_ranges(
    code_means: np.ndarray, percentiles=(1.0, 99.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Normal value range of every code on clean data.

    Args:
        code_means: [n, d_s] encoder means μs(x) of clean validation images.
        percentiles: (low, high) percentiles that bound the range.

    Returns:
        (low [d_s], high [d_s]) float32.
    """
    lo, hi = percentiles
    if not 0.0 <= lo < hi <= 100.0:
        raise ValueError(
            f"range_percentiles must satisfy 0 <= low < high <= 100, got {percentiles}"
        )
    low = np.percentile(code_means, lo, axis=0).astype(np.float32)
    high = np.percentile(code_means, hi, axis=0).astype(np.float32)
    return low, high


def search_offsets(
    num_codes: int, steps: int, candidates_per_step: int, radius_step: float, seed: int
) -> np.ndarray:
    """Candidate offsets of the iterative stochastic search, in units of the range width.

    Step t (t = 1..S) draws Bc offsets uniformly in [-t·Δr, t·Δr]: the search radius grows by
    Δr per step (§III-C). The table is drawn once from `seed` and saved with the model, so a
    morph depends only on the image's own code, never on the batch.

    Returns:
        [num_codes, S·Bc] float32, step-major (all of step 1, then step 2, ...).
    """
    rng = np.random.default_rng(seed)
    radius = radius_step * np.repeat(np.arange(1, steps + 1), candidates_per_step)
    unit = rng.uniform(-1.0, 1.0, size=(num_codes, steps * candidates_per_step))
    return (unit * radius[None, :]).astype(np.float32)


def natural_morph_codes(codes, low, high, offsets, num_morphs: int):
    """The first N search candidates of each code that stay inside its normal range.

    Candidate j of code i is codes[b, i] + offsets[i, j]·(high[i] - low[i]); candidates are
    taken in search order (smallest radius first) and only if low <= value <= high. If fewer
    than N candidates are valid (a code far outside its range), the remaining slots take the
    earliest invalid candidates clipped into the range, so the shape is always fixed.

    Args:
        codes: [B, m] the input's values of the selected codes.
        low, high: [m] normal range of the selected codes.
        offsets: [m, J] from `search_offsets`, J >= N.
        num_morphs: N.

    Returns:
        [B, m, N] morph values, all inside [low, high].
    """
    width = high - low
    candidates = codes[:, :, None] + offsets[None, :, :] * width[None, :, None]  # [B, m, J]
    valid = (candidates >= low[None, :, None]) & (candidates <= high[None, :, None])
    num_candidates = tf.shape(offsets)[-1]
    order = tf.range(num_candidates)
    # Valid candidates first, each group in search order: ascending key.
    key = tf.where(valid, order[None, None, :], order[None, None, :] + num_candidates)
    _, first = tf.math.top_k(-key, k=num_morphs, sorted=True)  # [B, m, N]
    chosen = tf.gather(candidates, first, batch_dims=2)
    return tf.clip_by_value(chosen, low[None, :, None], high[None, :, None])


def morph_latents(code_means, selected, morph_values):
    """Latent vectors of all morphs: μs(x) with one selected code replaced by a morph value.

    Args:
        code_means: [B, d_s] μs(x).
        selected: [m] int indices of the manipulated codes.
        morph_values: [B, m, N].

    Returns:
        [B, m, N, d_s].
    """
    d_s = tf.shape(code_means)[-1]
    one_hot = tf.one_hot(selected, d_s, dtype=code_means.dtype)  # [m, d_s]
    current = tf.gather(code_means, selected, axis=1)  # [B, m]
    delta = morph_values - current[:, :, None]  # [B, m, N]
    return code_means[:, None, None, :] + delta[..., None] * one_hot[None, :, None, :]
