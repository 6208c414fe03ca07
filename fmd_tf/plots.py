"""Figures (matplotlib, Agg backend): latent traversals and a defense panel."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def latent_traversals(combo_vae, images, low, high, path, steps: int = 9) -> None:
    """For each image, every zs code swept from low to high (others and zu fixed); rows = codes.

    Paper Fig. 1 idea: one code changes one semantic feature.
    """
    out = combo_vae(images)
    mean, zu = out["mean"].numpy(), out["zu"].numpy()
    d_s = mean.shape[1]
    fig, axes = plt.subplots(
        d_s, len(images) * (steps + 1), figsize=(len(images) * (steps + 1) * 0.6, d_s * 0.6)
    )
    for k, (m, u) in enumerate(zip(mean, zu, strict=True)):
        for i in range(d_s):
            z = np.repeat(m[None], steps, axis=0)
            z[:, i] = np.linspace(low[i], high[i], steps)
            decoded = combo_vae.decode(z, np.repeat(u[None], steps, axis=0)).numpy()
            col0 = k * (steps + 1)
            axes[i, col0].imshow(images[k, ..., 0], cmap="gray", vmin=0, vmax=1)
            for j in range(steps):
                axes[i, col0 + j + 1].imshow(decoded[j, ..., 0], cmap="gray", vmin=0, vmax=1)
            axes[i, col0].set_ylabel(f"z{i}", rotation=0, fontsize=6, labelpad=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("latent traversals: input, then each zs code swept over its normal range")
    fig.savefig(path, dpi=80, bbox_inches="tight")
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
                ax.imshow(tile[..., 0], cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_ylabel(name, fontsize=7)
        axes[i, 0].set_title("input", fontsize=6)
        axes[i, 1].set_title("morphs of one code ->", fontsize=6, loc="left")
        axes[i, -1].set_title("purified", fontsize=6)
        axes[i, -1].set_xlabel(caption, fontsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
