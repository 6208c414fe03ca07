"""Target classifier: the Carlini & Wagner (2017) MNIST network, returning logits."""

from __future__ import annotations

import keras
from keras import layers

from fmd_tf.models.layer_stack import apply_layers, build_layers


@keras.saving.register_keras_serializable(package="fmd_tf")
class Classifier(keras.Model):
    """conv32-conv32-pool-conv64-conv64-pool-fc200-fc200-logits (C&W 2017), configurable.

    Args:
        num_classes: number of output logits.
        conv_filters: filters of the 3x3 ReLU convolutions; a 2x2 max-pool follows every second one.
        dense_units: widths of the ReLU fully connected layers.
        dropout: dropout rate after each dense layer (training only).

    Call: images float32 [B, H, W, C] in [0, 1] -> logits float32 [B, num_classes].
    """

    def __init__(
        self,
        num_classes=10,
        conv_filters=(32, 32, 64, 64),
        dense_units=(200, 200),
        dropout=0.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.conv_filters = tuple(int(f) for f in conv_filters)
        self.dense_units = tuple(int(u) for u in dense_units)
        self.dropout = float(dropout)
        self.feature_layers = []
        for i, f in enumerate(self.conv_filters):
            self.feature_layers.append(layers.Conv2D(f, 3, activation="relu", name=f"conv{i}"))
            if i % 2 == 1:
                self.feature_layers.append(layers.MaxPooling2D(2, name=f"pool{i // 2}"))
        self.feature_layers.append(layers.Flatten(name="flatten"))
        for i, u in enumerate(self.dense_units):
            self.feature_layers.append(layers.Dense(u, activation="relu", name=f"fc{i}"))
            if self.dropout > 0:
                self.feature_layers.append(layers.Dropout(self.dropout, name=f"dropout{i}"))
        self.logits_layer = layers.Dense(self.num_classes, name="logits")

    def build(self, input_shape):
        build_layers([*self.feature_layers, self.logits_layer], input_shape)
        self.built = True

    def call(self, images, training=False):
        return self.logits_layer(apply_layers(self.feature_layers, images, training=training))

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            conv_filters=list(self.conv_filters),
            dense_units=list(self.dense_units),
            dropout=self.dropout,
        )
        return config
