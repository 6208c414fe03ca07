"""Total-correlation discriminator D_tc (FactorVAE density-ratio trick, paper Eq. 6-8)."""

from __future__ import annotations

import keras
from keras import layers, ops

from fmd_tf.models.layer_stack import apply_layers, build_layers


@keras.saving.register_keras_serializable(package="fmd_tf")
class TCDiscriminator(keras.Model):
    """MLP telling samples of q(z) (label 1) from samples of the product of marginals (label 0).

    Args:
        units: widths of the LeakyReLU hidden layers.

    Call: codes [B, D] -> logit [B] of D(z) = P(z drawn from q(z)).
    """

    def __init__(self, units=(256, 256, 256), **kwargs):
        super().__init__(**kwargs)
        self.units = tuple(int(u) for u in units)
        self.hidden = [
            layers.Dense(u, activation="leaky_relu", name=f"hidden{i}")
            for i, u in enumerate(self.units)
        ]
        self.out = layers.Dense(1, name="logit")

    def build(self, input_shape):
        build_layers([*self.hidden, self.out], input_shape)
        self.built = True

    def call(self, codes, training=False):
        return ops.squeeze(self.out(apply_layers(self.hidden, codes)), axis=-1)

    def get_config(self):
        config = super().get_config()
        config.update(units=list(self.units))
        return config
