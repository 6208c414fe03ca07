"""DGMM: deep Gaussian-mixture encoder for the class-unique codes zu (paper §III-D, Eq. 9-12)."""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

from fmd_tf import losses
from fmd_tf.models.layer_stack import apply_layers, build_layers

LOG_VAR_BOUNDS = (-6.0, 4.0)  # keeps Σ_c away from 0 and ∞ so that L_lkd cannot diverge


@keras.saving.register_keras_serializable(package="fmd_tf")
class DGMM(keras.Model):
    """Conv trunk x -> zu [B, K] with a learned Gaussian-mixture prior p(zu|c) = N(μ_c, diag Σ_c).

    The prior is rebuilt on every call from the `class_means` / `class_log_vars` weights with
    `tensorflow_probability.distributions` (`fmd_tf.losses.gm_mixture_log_prob`; the component
    densities `gm_log_prob` equal `tfd.MultivariateNormalDiag.log_prob`); p(c) = 1/C.
    `class_logits(zu)` is log q(c|zu) up to a constant, so `argmax` predicts the label of an
    unlabeled input, and `class_mean(zu)` picks μ of the most likely class.

    Args:
        num_classes: C.
        latent_dim: K, number of class-unique codes.
        filters: k4 s2 ReLU convolution filters (Table I "Encoder/DGMM").
        dense_units: hidden dense width.
        lambda_lkd: λ_lkd of Eq. 12 (used by `train_step`).

    Call: images [B, H, W, C] -> zu [B, K].
    """

    def __init__(
        self,
        num_classes=10,
        latent_dim=10,
        filters=(32, 32, 64, 64),
        dense_units=128,
        lambda_lkd=0.1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.latent_dim = int(latent_dim)
        self.filters = tuple(int(f) for f in filters)
        self.dense_units = int(dense_units)
        self.lambda_lkd = float(lambda_lkd)
        self.trunk = [
            layers.Conv2D(f, 4, strides=2, padding="same", activation="relu", name=f"conv{i}")
            for i, f in enumerate(self.filters)
        ]
        self.trunk += [
            layers.Flatten(name="flatten"),
            layers.Dense(self.dense_units, activation="relu", name="hidden"),
            layers.Dense(self.latent_dim, name="zu"),
        ]
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.cls_tracker = keras.metrics.Mean(name="cls_loss")
        self.lkd_tracker = keras.metrics.Mean(name="lkd_loss")
        self.acc_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    def build(self, input_shape):
        build_layers(self.trunk, input_shape)
        self.class_means = self.add_weight(
            shape=(self.num_classes, self.latent_dim),
            initializer=keras.initializers.RandomNormal(stddev=1.0),
            name="class_means",
        )
        self.class_log_vars = self.add_weight(
            shape=(self.num_classes, self.latent_dim), initializer="zeros", name="class_log_vars"
        )
        self.built = True

    def call(self, images, training=False):
        return apply_layers(self.trunk, images)

    def prior_params(self):
        """(means [C, K], log_vars [C, K]) of p(zu|c), log-variances clipped to LOG_VAR_BOUNDS."""
        log_vars = tf.clip_by_value(self.class_log_vars, *LOG_VAR_BOUNDS)
        return tf.convert_to_tensor(self.class_means), log_vars

    def class_logits(self, zu):
        """log q(c|zu) + const, [B, C] (Eq. 10)."""
        return losses.gm_class_logits(zu, *self.prior_params())

    def class_mean(self, zu):
        """μ of the most likely class of each zu, [B, K]."""
        means, _ = self.prior_params()
        return tf.gather(means, tf.argmax(self.class_logits(zu), axis=-1))

    def _compute_losses(self, x, y, training):
        zu = self(x, training=training)
        means, log_vars = self.prior_params()
        l_cls = losses.dgmm_cls_loss(zu, y, means, log_vars)
        l_lkd = losses.dgmm_lkd_loss(zu, y, means, log_vars)
        total = l_cls + self.lambda_lkd * l_lkd
        return zu, total, l_cls, l_lkd

    def _update_metrics(self, zu, y, total, l_cls, l_lkd):
        self.loss_tracker.update_state(total)
        self.cls_tracker.update_state(l_cls)
        self.lkd_tracker.update_state(l_lkd)
        self.acc_tracker.update_state(y, self.class_logits(zu))
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            zu, total, l_cls, l_lkd = self._compute_losses(x, y, training=True)
            scaled = total / replicas
        grads = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        return self._update_metrics(zu, y, total, l_cls, l_lkd)

    def test_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        zu, total, l_cls, l_lkd = self._compute_losses(x, y, training=False)
        return self._update_metrics(zu, y, total, l_cls, l_lkd)

    @property
    def metrics(self):
        return [self.loss_tracker, self.cls_tracker, self.lkd_tracker, self.acc_tracker]

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            latent_dim=self.latent_dim,
            filters=list(self.filters),
            dense_units=self.dense_units,
            lambda_lkd=self.lambda_lkd,
        )
        return config
