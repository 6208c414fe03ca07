"""Decoder p_θ(x | zs, zu) on concat(zs, zu) (paper §III-D, Table I decoder, any image size)."""

from __future__ import annotations

import keras
from keras import layers

from fmd_tf.models.layer_stack import apply_layers, build_layers


@keras.saving.register_keras_serializable(package="fmd_tf")
class Decoder(keras.Model):
    """Dense 128 (ReLU), Dense h/4·w/4·f0 (ReLU), DC k4 s2 (LeakyReLU) per filter, C k3 sigmoid.

    Args:
        image_shape: (H, W, C) of the output. The transposed convolutions upsample a
            ceil(H / 2**L) x ceil(W / 2**L) seed (L = len(filters)); when H or W is not divisible
            by 2**L the last rows / columns are cropped.
        dense_units: width of the first dense layer.
        filters: filters of the stride-2 transposed convolutions.

    Call: codes [B, d_s + K] -> images [B, H, W, C] in (0, 1).
    """

    def __init__(self, image_shape=(28, 28, 1), dense_units=128, filters=(64, 32), **kwargs):
        super().__init__(**kwargs)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.dense_units = int(dense_units)
        self.filters = tuple(int(f) for f in filters)
        scale = 2 ** len(self.filters)
        h, w, c = self.image_shape
        if min(h, w) < 1 or c < 1:
            raise ValueError(f"image_shape must be positive (H, W, C), got {self.image_shape}")
        self.seed_shape = (-(-h // scale), -(-w // scale), self.filters[0])
        self.crop = (self.seed_shape[0] * scale != h) or (self.seed_shape[1] * scale != w)
        self.stack = [
            layers.Dense(self.dense_units, activation="relu", name="hidden"),
            layers.Dense(
                self.seed_shape[0] * self.seed_shape[1] * self.seed_shape[2],
                activation="relu", name="seed",
            ),
            layers.Reshape(self.seed_shape, name="reshape"),
        ]
        self.stack += [
            layers.Conv2DTranspose(
                f, 4, strides=2, padding="same", activation="leaky_relu", name=f"deconv{i}"
            )
            for i, f in enumerate(self.filters)
        ]
        self.stack.append(
            layers.Conv2D(c, 3, padding="same", activation="sigmoid", name="image")
        )

    def build(self, input_shape):
        build_layers(self.stack, input_shape)
        self.built = True

    def call(self, codes, training=False):
        h = apply_layers(self.stack, codes)
        if self.crop:
            h = h[:, : self.image_shape[0], : self.image_shape[1], :]
        return h

    def get_config(self):
        config = super().get_config()
        config.update(
            image_shape=list(self.image_shape),
            dense_units=self.dense_units,
            filters=list(self.filters),
        )
        return config
