"""Adversarial training of a classifier: PGD adversarial training (Madry et al., 2018) and
TRADES (Zhang et al., 2019), with the adversarial images made inside each training step."""

from __future__ import annotations

import keras
import tensorflow as tf

from fmd_tf import losses
from fmd_tf.models.combo_vae import replica_step_seed

METHODS = ("pgd_at", "trades")


@keras.saving.register_keras_serializable(package="fmd_tf")
class RobustTrainer(keras.Model):
    """Trains `classifier` (its variables, in place) on L∞ adversarial images.

    Per batch (x, y), with the classifier in inference mode (dropout off) for the attack:

    * "pgd_at": x' = PGD maximising CE(y, f(x')) from a uniform start in the ε-ball; the
      update minimises CE(y, f(x')) (Madry et al., Eq. 2.1).
    * "trades": x' = PGD maximising KL(p(x) || p(x')) from x + 0.001·N(0, 1); the update
      minimises `losses.trades_loss` (CE on x + β·KL).

    PGD: `steps` signed-gradient steps of `step_size` (default 2.5·ε / steps), each projected
    onto the ε-ball around x and onto [0, 1]. Losses are divided by `num_replicas_in_sync`
    for `tf.distribute`; the random starts are stateless, seeded by (seed, replica, step).
    The classifier may compute in a mixed dtype policy: logits are cast to float32.

    Call: images -> the classifier's logits. Only the classifier is meant to be saved.
    """

    def __init__(self, classifier, method="pgd_at", eps=0.1, steps=10, step_size=None,
                 beta=6.0, seed=0, **kwargs):
        super().__init__(**kwargs)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not eps > 0 or int(steps) < 1 or beta < 0:
            raise ValueError(f"need eps > 0, steps >= 1 and beta >= 0, got eps={eps}, "
                             f"steps={steps}, beta={beta}")
        if isinstance(classifier, dict):
            classifier = keras.saving.deserialize_keras_object(classifier)
        self.classifier = classifier
        self.method = method
        self.eps = float(eps)
        self.steps = int(steps)
        self.step_size = float(step_size) if step_size is not None else 2.5 * self.eps / self.steps
        self.beta = float(beta)
        self.seed = int(seed)
        self.trackers = {name: keras.metrics.Mean(name=name)
                         for name in ("loss", "accuracy", "adv_accuracy")}

    def build(self, input_shape):
        if not self.classifier.built:
            self.classifier.build(input_shape)
        self.built = True

    def call(self, images, training=False):
        return self.classifier(images, training=training)

    def _logits(self, x, training):
        return tf.cast(self.classifier(x, training=training), tf.float32)

    def perturb(self, x, y, seed):
        """Adversarial images [B, H, W, C] for (x, y) under `method` (gradient-free output)."""
        x = tf.convert_to_tensor(x, tf.float32)
        if self.method == "pgd_at":
            start = tf.random.stateless_uniform(tf.shape(x), seed, -self.eps, self.eps)

            def objective(x_adv):
                return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    labels=tf.cast(tf.reshape(y, [-1]), tf.int32),
                    logits=self._logits(x_adv, False)))
        else:
            start = 0.001 * tf.random.stateless_normal(tf.shape(x), seed)
            clean = tf.stop_gradient(self._logits(x, False))

            def objective(x_adv):
                return tf.reduce_sum(losses.label_consistency_loss(
                    clean, self._logits(x_adv, False)))
        x_adv = tf.clip_by_value(x + start, 0.0, 1.0)
        for _ in range(self.steps):
            with tf.GradientTape() as tape:
                tape.watch(x_adv)
                value = objective(x_adv)
            step = self.step_size * tf.sign(tape.gradient(value, x_adv))
            x_adv = tf.clip_by_value(x_adv + step, x - self.eps, x + self.eps)
            x_adv = tf.clip_by_value(x_adv, 0.0, 1.0)
        return tf.stop_gradient(x_adv)

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        labels = tf.cast(tf.reshape(y, [-1]), tf.int32)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        x_adv = self.perturb(x, labels, replica_step_seed(self.seed, self.optimizer))
        variables = self.classifier.trainable_variables
        with tf.GradientTape() as tape:
            logits_adv = self._logits(x_adv, True)
            if self.method == "pgd_at":
                logits = None
                per_sample = tf.nn.sparse_softmax_cross_entropy_with_logits(
                    labels=labels, logits=logits_adv)
            else:
                logits = self._logits(x, True)
                per_sample = losses.trades_loss(logits, logits_adv, labels, self.beta)
            loss = tf.reduce_mean(per_sample)
            scaled = loss / replicas
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        if logits is None:
            logits = self._logits(x, False)
        hits = {"accuracy": logits, "adv_accuracy": logits_adv}
        self.trackers["loss"].update_state(loss)
        for name, out in hits.items():
            self.trackers[name].update_state(tf.cast(
                tf.equal(tf.argmax(out, -1, output_type=tf.int32), labels), tf.float32))
        return {name: m.result() for name, m in self.trackers.items()}

    @property
    def metrics(self):
        return list(self.trackers.values())

    def get_config(self):
        config = super().get_config()
        config.update(classifier=keras.saving.serialize_keras_object(self.classifier),
                      method=self.method, eps=self.eps, steps=self.steps,
                      step_size=self.step_size, beta=self.beta, seed=self.seed)
        return config
