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


def feature_map_code_values(latents, num_channels: int):
    """Code values of flattened feature-map latents: the spatial mean of each channel.

    A feature-map latent holds C channels of h×w maps, flattened channel-last (dimension
    d = p·C + c is position p of channel c); "each channel is considered as one latent factor"
    (paper §IV-A, CelebA), so code c's value is v_c = mean_p z[p, c].

    Args:
        latents: [B, h·w·C].
        num_channels: C.

    Returns:
        [B, C].
    """
    batch = tf.shape(latents)[0]
    return tf.reduce_mean(tf.reshape(latents, [batch, -1, num_channels]), axis=1)


def feature_map_morph_latents(latents, selected, morph_values, num_channels: int):
    """Morphs of feature-map latents: channel selected[i] shifted as a whole so that its spatial
    mean becomes each morph value, the other channels unchanged:

        z' = z + (v - v_c(z)) · 1_{channel c}   (1_{channel c} [h·w·C]: 1 on channel c's h·w dims)

    The channel moves as a whole, not per position: its spatial pattern (where the factor
    acts) is kept and only its strength changes, one code stays one latent factor as in the
    paper, and the search keeps its one-value-per-code form (normal ranges, offsets, θr per
    code); morphing positions separately would make h·w codes of each channel and h·w times
    the morphs.

    Args:
        latents: [B, h·w·C] flattened channel-last (`feature_map_code_values`).
        selected: [m] int channel indices.
        morph_values: [B, m, N] new spatial means.
        num_channels: C.

    Returns:
        [B, m, N, h·w·C].
    """
    positions = tf.shape(latents)[-1] // num_channels
    one_hot = tf.one_hot(selected, num_channels, dtype=latents.dtype)  # [m, C]
    mask = tf.tile(one_hot, [1, positions])  # [m, h·w·C], channel-last like the latents
    current = tf.gather(feature_map_code_values(latents, num_channels), selected, axis=1)
    delta = morph_values - current[:, :, None]  # [B, m, N]
    return latents[:, None, None, :] + delta[..., None] * mask[None, :, None, :]


def feature_map_code_masks(selected, num_channels: int, latent_dim: int):
    """[m, h·w·C] 0/1 masks of the dimensions of channels `selected` (flattened channel-last)."""
    one_hot = tf.one_hot(selected, num_channels)
    return tf.tile(one_hot, [1, latent_dim // num_channels])
