"""Figures (matplotlib, Agg backend): latent traversals and a defense panel."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fmd_tf.files import atomic_path  # noqa: E402


def montage(tiles: np.ndarray, pad: int = 2) -> np.ndarray:
    """One image of a grid of tiles [R, C, H, W, ch] -> [R·(H+pad)-pad, C·(W+pad)-pad, ch],
    separated by white `pad`-pixel lines (one `imshow` instead of R·C axes)."""
    rows, cols, h, w, ch = tiles.shape
    grid = np.ones((rows * (h + pad) - pad, cols * (w + pad) - pad, ch), np.float32)
    for r in range(rows):
        for c in range(cols):
            grid[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = tiles[r, c]
    return grid


def _show(ax, image: np.ndarray) -> None:
    """imshow of [H, W, 1] (gray) or [H, W, 3] (RGB) in [0, 1] without ticks."""
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.clip(image, 0.0, 1.0))
    ax.set_xticks([])
    ax.set_yticks([])


def latent_traversals(combo_vae, images, low, high, path, steps: int = 9) -> None:
    """For each image, every zs code swept from low to high (others and zu fixed); rows = codes.

    Paper Fig. 1 idea: one code changes one semantic feature. All sweeps are decoded in one
    call and drawn as one montage.
    """
    out = combo_vae(images)
    mean, zu = out["mean"].numpy(), out["zu"].numpy()
    n, dim = mean.shape
    d_s = combo_vae.num_codes  # rows: one per code (a dimension, or a feature-map channel)
    sweep = np.linspace(low, high, steps, dtype=np.float32)  # [S, d_s]
    if d_s == dim:
        z = np.repeat(mean[:, None, None, :], d_s, axis=1).repeat(steps, axis=2)  # [n, d_s, S, d_s]
        for i in range(d_s):
            z[:, i, :, i] = sweep[:, i]
    else:
        values = np.broadcast_to(sweep.T[None], (n, d_s, steps))
        z = combo_vae.with_code_values(mean, np.arange(d_s), values).numpy()  # [n, d_s, S, D]
    u = np.broadcast_to(zu[:, None, None, :], (n, d_s, steps, zu.shape[1]))
    decoded = combo_vae.decode(z.reshape(-1, dim), u.reshape(-1, zu.shape[1])).numpy()
    decoded = decoded.reshape(n, d_s, steps, *images.shape[1:])
    originals = np.broadcast_to(np.asarray(images)[:, None, None], (n, d_s, 1, *images.shape[1:]))
    tiles = np.concatenate([originals, decoded], axis=2)  # [n, d_s, S + 1, H, W, C]
    tiles = tiles.transpose(1, 0, 2, 3, 4, 5).reshape(d_s, n * (steps + 1), *images.shape[1:])
    h = images.shape[1]
    fig, ax = plt.subplots(figsize=(n * (steps + 1) * 0.6, d_s * 0.6))
    _show(ax, montage(tiles))
    ax.set_yticks([(h + 2) * i + h / 2 for i in range(d_s)], [f"z{i}" for i in range(d_s)],
                  fontsize=6)
    fig.suptitle("latent traversals: input, then each zs code swept over its normal range")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, bbox_inches="tight")
    plt.close(fig)


def defense_panel(rows, path, title: str = "") -> None:
    """Rows of (name, input [H,W,1], morphs [n,H,W,1], purified [H,W,1], caption)."""
    n_morphs = max(len(r[2]) for r in rows)
    cols = n_morphs + 2
    fig, axes = plt.subplots(len(rows), cols, figsize=(cols * 0.9, len(rows) * 1.1), squeeze=False)
    for i, (name, image, morphs, purified, caption) in enumerate(rows):
        tiles = [image, *morphs, purified]
        for j in range(cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(tiles) - 1 or j == cols - 1:
                tile = purified if j == cols - 1 else tiles[j]
                _show(ax, tile)
        axes[i, 0].set_ylabel(name, fontsize=7)
        axes[i, 0].set_title("input", fontsize=6)
        axes[i, 1].set_title("morphs of one code ->", fontsize=6, loc="left")
        axes[i, -1].set_title("purified", fontsize=6)
        axes[i, -1].set_xlabel(caption, fontsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, bbox_inches="tight")
    plt.close(fig)
