"""β-TC-VAE encoder Es for the class-shared codes zs (paper §III-B, Table I)."""

from __future__ import annotations

import keras
from keras import layers, ops

from fmd_tf.models.layer_stack import apply_layers, build_layers


@keras.saving.register_keras_serializable(package="fmd_tf")
class SharedEncoder(keras.Model):
    """q_φ(zs|x) = N(mean(x), diag exp(log_var(x))).

    Table I: C32k4s2, C32k4s2, C64k4s2, C64k4s2 (ReLU), Dense 128 (ReLU), Dense 2·d_s.

    Args:
        latent_dim: d_s, number of class-shared codes.
        filters: filters of the k4 s2 ReLU convolutions.
        dense_units: width of the hidden dense layer.

    Call: images [B, H, W, C] -> (mean [B, d_s], log_var [B, d_s]).
    """

    def __init__(self, latent_dim=10, filters=(32, 32, 64, 64), dense_units=128, **kwargs):
        super().__init__(**kwargs)
        self.latent_dim = int(latent_dim)
        self.filters = tuple(int(f) for f in filters)
        self.dense_units = int(dense_units)
        self.trunk = [
            layers.Conv2D(f, 4, strides=2, padding="same", activation="relu", name=f"conv{i}")
            for i, f in enumerate(self.filters)
        ]
        self.flatten = layers.Flatten(name="flatten")
        self.hidden = layers.Dense(self.dense_units, activation="relu", name="hidden")
        self.head = layers.Dense(2 * self.latent_dim, name="mean_log_var")

    @property
    def num_codes(self) -> int:
        """d_s: a vector latent has one code per dimension."""
        return self.latent_dim

    def code_values(self, mean):
        """[B, d_s] the codes' values: `mean` itself (one code per dimension)."""
        return mean

    def with_code_values(self, mean, selected, values):
        """[B, m, N, d_s]: `mean` [B, d_s] with code selected[i] set to values[b, i, j]
        (`morphs.morph_latents`)."""
        from fmd_tf.defense import morphs

        return morphs.morph_latents(mean, selected, values)

    def code_masks(self, selected):
        """[m, d_s] one-hot rows of codes `selected`."""
        import tensorflow as tf

        return tf.one_hot(selected, self.latent_dim)

    def build(self, input_shape):
        build_layers([*self.trunk, self.flatten, self.hidden, self.head], input_shape)
        self.built = True

    def call(self, images, training=False):
        h = self.hidden(self.flatten(apply_layers(self.trunk, images)))
        mean, log_var = ops.split(self.head(h), 2, axis=-1)
        return mean, log_var

    def get_config(self):
        config = super().get_config()
        config.update(
            latent_dim=self.latent_dim, filters=list(self.filters), dense_units=self.dense_units
        )
        return config
