"""Decoder p_θ(x | zs, zu) for a feature-map zs (paper Table I, CelebA column: residual
upsampling blocks)."""

from __future__ import annotations

import keras
from keras import layers, ops

from fmd_tf.models.feature_map_encoder import halvings, stage_widths


@keras.saving.register_keras_serializable(package="fmd_tf")
class FeatureMapDecoder(keras.Model):
    """zs reshaped to its h×w×C map, zu tiled over the h×w positions and concatenated (C + K
    channels), L residual upsampling blocks (nearest 2× upsampling, then
    relu(conv3x3 → relu → conv3x3 + conv1x1 skip)), a 3×3 sigmoid convolution to the image's
    channels, cropped to H×W.

    Args:
        image_shape: (H, W, c) of the output; L is the number of halvings from H to `map_size`
            (`feature_map_encoder.halvings`).
        channels: C of zs.
        map_size: h = w.
        filters: widths of the upsampling blocks, first block first (the last repeated).

    Call: codes [B, h·w·C + K] (zs flattened channel-last, then zu) -> images [B, H, W, c] in
    (0, 1).
    """

    def __init__(self, image_shape=(28, 28, 1), channels=10, map_size=4, filters=(64, 32),
                 **kwargs):
        super().__init__(**kwargs)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.channels = int(channels)
        self.map_size = int(map_size)
        self.filters = tuple(int(f) for f in filters)
        h, w, c = self.image_shape
        if min(h, w) < 1 or c < 1:
            raise ValueError(f"image_shape must be positive (H, W, C), got {self.image_shape}")
        self.stages = halvings(h, self.map_size)
        if halvings(w, self.map_size) != self.stages:
            raise ValueError(f"images {h}x{w} do not halve to a square {self.map_size}x"
                             f"{self.map_size} map: use square images")
        self.blocks = [
            [layers.UpSampling2D(2, name=f"up{i}"),
             layers.Conv2D(f, 3, padding="same", activation="relu", name=f"b{i}_a"),
             layers.Conv2D(f, 3, padding="same", name=f"b{i}_b"),
             layers.Conv2D(f, 1, padding="same", name=f"b{i}_skip")]
            for i, f in enumerate(stage_widths(self.filters, self.stages))
        ]
        self.image = layers.Conv2D(c, 3, padding="same", activation="sigmoid", name="image")

    @property
    def zs_dim(self) -> int:
        return self.map_size * self.map_size * self.channels

    def build(self, input_shape):
        unique = int(input_shape[-1]) - self.zs_dim
        if unique < 0:
            raise ValueError(f"codes have {input_shape[-1]} dims, fewer than zs's "
                             f"{self.map_size}x{self.map_size}x{self.channels}")
        shape = (None, self.map_size, self.map_size, self.channels + unique)
        for up, conv_a, conv_b, skip in self.blocks:
            shape = up.compute_output_shape(shape)
            conv_a.build(shape)
            skip.build(shape)
            shape = conv_a.compute_output_shape(shape)
            conv_b.build(shape)
            shape = conv_b.compute_output_shape(shape)
        self.image.build(shape)
        self.built = True

    def call(self, codes, training=False):
        side = self.map_size
        zs = ops.reshape(codes[:, : self.zs_dim], (-1, side, side, self.channels))
        zu = codes[:, self.zs_dim :]
        zu_map = ops.tile(zu[:, None, None, :], (1, side, side, 1))
        h = ops.concatenate([zs, zu_map], axis=-1)
        for up, conv_a, conv_b, skip in self.blocks:
            h = up(h)
            h = ops.relu(conv_b(conv_a(h)) + skip(h))
        h = self.image(h)
        return h[:, : self.image_shape[0], : self.image_shape[1], :]

    def get_config(self):
        config = super().get_config()
        config.update(image_shape=list(self.image_shape), channels=self.channels,
                      map_size=self.map_size, filters=list(self.filters))
        return config
