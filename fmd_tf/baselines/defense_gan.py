"""Defense-GAN baseline (Samangouei, Kabkab & Chellappa, ICLR 2018).

Defense-GAN trains a Wasserstein GAN on clean images only and, at test time, replaces an input
x by the closest image the generator G can make:

    z* = argmin_z ||G(z) - x||²₂,    purified image G(z*),    label = classifier(G(z*)).

The minimisation is not convex: it is run from R random starts z0 ~ N(0, I) with L gradient-
descent steps each, and the end point with the smallest distance is kept (paper §3.2, Fig. 2).
The detector of paper §3.3 ("Defense-GAN's reconstruction distance") flags x as adversarial
iff ``||G(z*) - x||²₂`` is above a threshold; here the threshold is set on clean VAL images at
a target false-positive rate, like MagNet's and Feature Squeezing's
(:func:`fmd_tf.baselines.magnet.calibrate_thresholds`). Decision (FM-Defense convention):
verdict 0 (passed) with label = classifier(G(z*)), or verdict 2 (rejected) with label -1.

GAN (the paper's MNIST setting is a WGAN, Gulrajani et al.'s WGAN-GP training):

* `WGANGenerator`: z [B, d] -> Dense to ceil(H/4) x ceil(W/4) x 64 (ReLU) -> 5x5 stride-2
  transposed conv, 32 filters (ReLU) -> 5x5 stride-2 transposed conv, C filters -> centre crop
  to H x W -> sigmoid, so images are in [0, 1] for any H, W >= 8. No batch norm (as
  Gulrajani et al.'s WGAN-GP MNIST generator), so G(z) of one row does not depend on the rest
  of the batch. d = 64, small enough to keep the latent search cheap on a CPU.
* `WGANCritic`: 5x5 stride-2 convs of 32 and 64 filters, LeakyReLU(0.2), Dense(1); no batch
  norm, which the per-example gradient penalty forbids.
* `WGANGP` trains them: each train step takes n_critic x B images, makes n_critic = 5 critic
  updates on its B-image slices, then one generator update, all in one compiled graph:

      critic:    L_D = mean D(G(z)) - mean D(x) + λ·mean (||∇D(x̂)||₂ - 1)²,
                 x̂ = ε·x + (1 - ε)·G(z), ε ~ U[0, 1] per image, λ = 10;
      generator: L_G = -mean D(G(z)),

  Adam(1e-4, β1 = 0.5, β2 = 0.9) for both (Gulrajani et al., Algorithm 1). Noise is stateless,
  seeded by (seed, replica, the generator optimizer's step, the update's index), so a run is
  reproducible. An epoch is one pass of the critic over the shuffled TRAIN images (n / (5·B)
  generator steps: 62 for 20,000 images at B = 64). Defense-GAN trained its MNIST WGAN for
  200,000 generator steps; the default `DEFAULT_GAN_EPOCHS` = 30 (1,860 steps, 10-15 min on
  2 busy CPU cores) is a CPU budget (the epochs used are recorded in the saved report): more
  epochs (a GPU) make a stronger baseline.

Latent search (`latent_search`), following the Defense-GAN reference code: the per-pixel mean
squared error of each (image, restart) row is minimised by gradient descent with momentum 0.7
(``v <- 0.7·v + ∇z, z <- z - lr·v``) at learning rate ``rec_lr`` = 10, divided by 10 after
ceil(0.8·L) steps; L = ``rec_iters`` = 200 and R = ``rec_restarts`` = 10 are the paper's MNIST
values. All B images x R restarts of a batch are one [B·R, d] tensor and the L steps a
``tf.while_loop`` inside one ``tf.function``. The starts are stateless normal draws seeded by
(seed, the batch's offset in the call), so outputs are deterministic and the clean and attacked
versions of a set, batched alike, share their starts.

Cost per image: R·(L + 1) generator forward passes and R·L backward passes (to z only), i.e.
2,010 forward and 2,000 backward passes at the defaults, against one classifier pass for the
label: Defense-GAN is by far the slowest baseline to evaluate (and to attack adaptively, since
every attack step re-runs the search). On 2 busy CPU cores a 28 x 28 image takes 0.3-0.7 s at
the defaults (100 images per batch); `rec_iters` / `rec_restarts` trade purification quality
for time. Learning rate: on a 10-epoch Fashion-MNIST generator, 10 and 30 reached the lowest
distances after 200 steps (1 and 3 clearly higher ones), so the reference value 10 is kept.

Adaptive attacks (`adaptive_surface`): BPDA (Athalye et al., ICML 2018): the forward pass runs
the full search, the backward pass treats purification as the identity,
``classifier(x + stop_gradient(G(z*) - x))``, and the detector ratio ``||G(z*) - x||² /
threshold`` is differentiated in x with z* held fixed.
"""

from __future__ import annotations

import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from fmd_tf.baselines.magnet import (
    calibrate_thresholds,
    check_fpr,
    check_images,
    union_false_positive_rate,
)
from fmd_tf.baselines.threshold_detector import ThresholdDetector
from fmd_tf.defense.fm_defense import VERDICT_PASSED, VERDICT_REJECTED
from fmd_tf.files import atomic_path, write_json
from fmd_tf.models.combo_vae import replica_step_seed
from fmd_tf.models.layer_stack import apply_layers, build_layers
from fmd_tf.progress import concat_outputs, in_batches

__all__ = [
    "DEFAULT_GAN_EPOCHS",
    "DEFAULT_REC_ITERS",
    "DEFAULT_REC_LR",
    "DEFAULT_REC_RESTARTS",
    "DefenseGAN",
    "WGANCritic",
    "WGANGP",
    "WGANGenerator",
    "gradient_penalty",
    "latent_search",
    "squared_distance",
]

DEFAULT_GAN_EPOCHS = 30  # a CPU budget; Defense-GAN: 200,000 generator steps
DEFAULT_LATENT_DIM = 64
DEFAULT_REC_ITERS = 200  # L (paper, MNIST)
DEFAULT_REC_RESTARTS = 10  # R (paper, MNIST)
DEFAULT_REC_LR = 10.0  # Defense-GAN reference code
REC_MOMENTUM = 0.7  # Defense-GAN reference code
REC_DECAY_AT = 0.8  # the learning rate is divided by 10 after this share of the L steps
GP_WEIGHT = 10.0  # λ (Gulrajani et al.)
N_CRITIC = 5  # critic updates per generator update (Gulrajani et al.)
MIN_IMAGE_SIZE = 8
_JSON_NAME = "defense_gan.json"
_GENERATOR_NAME = "generator.keras"


def _check_image_shape(image_shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape[:2]) < MIN_IMAGE_SIZE or shape[2] < 1:
        raise ValueError(f"image_shape must be [H, W, C] with H, W >= {MIN_IMAGE_SIZE} and "
                         f"C >= 1, got {tuple(image_shape)}")
    return shape


def _positive_ints(values, name, count) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    if len(values) != count or min(values) < 1:
        raise ValueError(f"{name} must be {count} integers >= 1, got {values}")
    return values


# --------------------------------------------------------------------------------- models
@keras.saving.register_keras_serializable(package="fmd_tf")
class WGANGenerator(keras.Model):
    """WGAN generator: latent codes z [B, latent_dim] -> images [B, H, W, C] in [0, 1].

    Args:
        image_shape: [H, W, C] of the images (H, W >= 8).
        latent_dim: d, the size of z.
        filters: (f0, f1): the Dense layer makes ceil(H/4) x ceil(W/4) x f0 maps, the first
            5x5 stride-2 transposed conv f1 maps; the second makes the C channels.

    The 4·ceil(H/4) x 4·ceil(W/4) output is centre-cropped to H x W before the sigmoid.
    """

    def __init__(self, image_shape=(28, 28, 1), latent_dim=DEFAULT_LATENT_DIM, filters=(64, 32),
                 **kwargs):
        super().__init__(**kwargs)
        self.image_shape = _check_image_shape(image_shape)
        self.latent_dim = int(latent_dim)
        self.filters = _positive_ints(filters, "filters", 2)
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        height, width, channels = self.image_shape
        self.base_shape = (math.ceil(height / 4), math.ceil(width / 4), self.filters[0])
        self.gen_layers = [
            layers.Dense(int(np.prod(self.base_shape)), activation="relu", name="dense"),
            layers.Reshape(self.base_shape, name="reshape"),
            layers.Conv2DTranspose(self.filters[1], 5, strides=2, padding="same",
                                   activation="relu", name="up0"),
            layers.Conv2DTranspose(channels, 5, strides=2, padding="same", name="up1"),
        ]

    def build(self, input_shape):
        shape = tuple(input_shape)
        if len(shape) != 2 or shape[-1] != self.latent_dim:
            raise ValueError(f"WGANGenerator(latent_dim={self.latent_dim}) needs input shape "
                             f"[B, {self.latent_dim}], got {shape}")
        build_layers(self.gen_layers, shape)
        self.built = True

    def call(self, z, training=False):
        h = apply_layers(self.gen_layers, z, training=training)
        height, width, _ = self.image_shape
        top = (4 * self.base_shape[0] - height) // 2
        left = (4 * self.base_shape[1] - width) // 2
        return keras.ops.sigmoid(h[:, top : top + height, left : left + width, :])

    def get_config(self):
        config = super().get_config()
        config.update(image_shape=list(self.image_shape), latent_dim=self.latent_dim,
                      filters=list(self.filters))
        return config


@keras.saving.register_keras_serializable(package="fmd_tf")
class WGANCritic(keras.Model):
    """WGAN critic: images [B, H, W, C] -> scores [B, 1] (unbounded; no batch norm).

    Args:
        image_shape: [H, W, C] of the images.
        filters: filters of the 5x5 stride-2 convolutions, each followed by LeakyReLU(0.2);
            then Flatten and Dense(1).
    """

    def __init__(self, image_shape=(28, 28, 1), filters=(32, 64), **kwargs):
        super().__init__(**kwargs)
        self.image_shape = _check_image_shape(image_shape)
        self.filters = tuple(int(f) for f in filters)
        if not self.filters or min(self.filters) < 1:
            raise ValueError(f"filters must be integers >= 1, got {filters}")
        self.critic_layers = []
        for i, f in enumerate(self.filters):
            self.critic_layers += [
                layers.Conv2D(f, 5, strides=2, padding="same", name=f"conv{i}"),
                layers.LeakyReLU(0.2, name=f"lrelu{i}"),
            ]
        self.critic_layers += [layers.Flatten(name="flatten"), layers.Dense(1, name="score")]

    def build(self, input_shape):
        shape = tuple(input_shape)
        if len(shape) != 4 or tuple(shape[1:]) != self.image_shape:
            raise ValueError(f"WGANCritic(image_shape={self.image_shape}) needs input shape "
                             f"[B, {', '.join(map(str, self.image_shape))}], got {shape}")
        build_layers(self.critic_layers, shape)
        self.built = True

    def call(self, images, training=False):
        return apply_layers(self.critic_layers, images, training=training)

    def get_config(self):
        config = super().get_config()
        config.update(image_shape=list(self.image_shape), filters=list(self.filters))
        return config


# --------------------------------------------------------------------------------- maths
def gradient_penalty(critic, x_hat, weight: float = GP_WEIGHT):
    """WGAN-GP penalty λ·mean_b (||∇_x D(x̂_b)||₂ - 1)² (Gulrajani et al. 2017, Eq. 3).

    Args:
        critic: images [B, ...] -> scores [B, 1] (or [B]); each row's score must depend on
            that row only (no batch norm), so the gradient of the summed scores is per row.
        x_hat: points [B, ...] the gradient is taken at (real/fake interpolates).
        weight: λ.

    Returns a float32 scalar, differentiable in the critic's weights (second order).
    """
    x_hat = tf.convert_to_tensor(x_hat, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x_hat)
        total = tf.reduce_sum(tf.cast(critic(x_hat), tf.float32))
    grad = tape.gradient(total, x_hat)
    grad = tf.reshape(grad, [tf.shape(grad)[0], -1])
    # 1e-12 keeps the root differentiable where the gradient vanishes.
    norm = tf.sqrt(tf.reduce_sum(tf.square(grad), axis=1) + 1e-12)
    return weight * tf.reduce_mean(tf.square(norm - 1.0))


def squared_distance(a, b):
    """Per-row squared L2 distance ||a - b||²₂ of image batches [B, H, W, C] -> [B]."""
    return tf.reduce_sum(tf.square(a - b), axis=[1, 2, 3])


def latent_search(generator, images, z0, iters: int, learning_rate: float = DEFAULT_REC_LR,
                  momentum: float = REC_MOMENTUM, decay_at: float = REC_DECAY_AT):
    """Defense-GAN's search for z* = argmin_z ||G(z) - x||²₂ from R starts per image.

    Each (image b, restart r) row minimises the per-pixel mean squared error
    ``e(z) = mean((G(z) - x_b)²)`` by ``iters`` = L steps of gradient descent with momentum,
    ``v <- momentum·v + ∇e(z), z <- z - lr_t·v``, ``lr_t = learning_rate·0.1^floor(t / ceil(
    decay_at·L))``; rows do not interact (the summed loss has a per-row gradient). Then, per
    image, the restart with the smallest final ``||G(z) - x_b||²₂`` is kept.

    Args:
        generator: z [N, d] -> images [N, H, W, C] (row-wise, no batch norm).
        images: x float32 [B, H, W, C].
        z0: starts float32 [B, R, d].
        iters: L >= 0 (0 keeps the best start).

    Returns:
        (z* [B, d], distance [B] = ||G(z*) - x||²₂, distances [B, R] of every restart's end
        point). Cost: R·(L + 1) generator forward and R·L backward passes per image.
    """
    images = tf.convert_to_tensor(images, tf.float32)
    z0 = tf.convert_to_tensor(z0, tf.float32)
    batch, restarts, latent_dim = tf.shape(z0)[0], tf.shape(z0)[1], tf.shape(z0)[2]
    targets = tf.repeat(images, restarts, axis=0)  # row b·R + r is image b
    z = tf.reshape(z0, [batch * restarts, latent_dim])
    iters = int(iters)
    decay_every = float(max(1, math.ceil(decay_at * iters)))

    def body(t, z, velocity):
        with tf.GradientTape() as tape:
            tape.watch(z)
            fake = tf.cast(generator(z), tf.float32)
            loss = tf.reduce_sum(tf.reduce_mean(tf.square(fake - targets), axis=[1, 2, 3]))
        velocity = momentum * velocity + tape.gradient(loss, z)
        rate = learning_rate * tf.pow(0.1, tf.floor(tf.cast(t, tf.float32) / decay_every))
        return t + 1, z - rate * velocity, velocity

    if iters > 0:
        _, z, _ = tf.while_loop(lambda t, z, v: t < iters, body,
                                (tf.constant(0), z, tf.zeros_like(z)))
    distances = tf.reshape(
        squared_distance(tf.cast(generator(z), tf.float32), targets), [batch, restarts])
    best = tf.argmin(distances, axis=1, output_type=tf.int32)
    z_star = tf.gather(tf.reshape(z, [batch, restarts, latent_dim]), best, batch_dims=1)
    return z_star, tf.reduce_min(distances, axis=1), distances


# --------------------------------------------------------------------------------- training
@keras.saving.register_keras_serializable(package="fmd_tf")
class WGANGP(keras.Model):
    """WGAN-GP training of `generator` and `critic` (their variables, in place).

    Each batch holds n_critic x B images; a train step makes n_critic critic updates, one per
    B-image slice, then one generator update on B fresh codes (module docstring). `compile`
    takes the generator's optimizer (`optimizer`) and the critic's (`critic_optimizer`), both
    Adam(1e-4, β1 = 0.5, β2 = 0.9) by default. Losses are divided by `num_replicas_in_sync` for
    `tf.distribute`. Metrics (the train step's last critic update and its generator update):
    `critic_loss` (L_D), `wasserstein` (mean D(x) - mean D(G(z)), the critic's estimate of
    the Wasserstein distance), `gradient_penalty`, `generator_loss` (L_G).

    Call: z [B, d] -> G(z). Only the generator is meant to be saved.
    """

    def __init__(self, generator, critic, n_critic=N_CRITIC, gp_weight=GP_WEIGHT, seed=0,
                 **kwargs):
        super().__init__(**kwargs)
        if isinstance(generator, dict):
            generator = keras.saving.deserialize_keras_object(generator)
        if isinstance(critic, dict):
            critic = keras.saving.deserialize_keras_object(critic)
        self.generator = generator
        self.critic = critic
        self.n_critic = int(n_critic)
        self.gp_weight = float(gp_weight)
        self.seed = int(seed)
        if self.n_critic < 1 or self.gp_weight < 0:
            raise ValueError(f"need n_critic >= 1 and gp_weight >= 0, got {n_critic}, "
                             f"{gp_weight}")
        self.critic_optimizer = None
        self.trackers = {name: keras.metrics.Mean(name=name) for name in (
            "critic_loss", "wasserstein", "gradient_penalty", "generator_loss")}

    def build(self, input_shape):
        if not self.generator.built:
            self.generator.build(input_shape)
        if not self.critic.built:
            self.critic.build((None, *self.generator.image_shape))
        self.built = True

    def call(self, z, training=False):
        return self.generator(z, training=training)

    def compile(self, optimizer=None, critic_optimizer=None, **kwargs):
        def adam():
            return keras.optimizers.Adam(1e-4, beta_1=0.5, beta_2=0.9)

        super().compile(optimizer=optimizer or adam(), **kwargs)
        self.critic_optimizer = keras.optimizers.get(critic_optimizer or adam())
        if self.built:
            self.optimizer.build(self.generator.trainable_variables)
            self.critic_optimizer.build(self.critic.trainable_variables)

    def _noise(self, batch, seed):
        return tf.random.stateless_normal([batch, self.generator.latent_dim], seed)

    def _critic_update(self, real, seed, replicas):
        batch = tf.shape(real)[0]
        fake = tf.cast(self.generator(self._noise(batch, seed), training=True), tf.float32)
        eps = tf.random.stateless_uniform([batch, 1, 1, 1],
                                          tf.random.experimental.stateless_fold_in(seed, 1))
        x_hat = eps * real + (1.0 - eps) * fake
        variables = self.critic.trainable_variables
        with tf.GradientTape() as tape:
            d_real = tf.cast(self.critic(real, training=True), tf.float32)
            d_fake = tf.cast(self.critic(fake, training=True), tf.float32)
            wasserstein = tf.reduce_mean(d_real) - tf.reduce_mean(d_fake)
            penalty = gradient_penalty(lambda t: self.critic(t, training=True), x_hat,
                                       self.gp_weight)
            loss = penalty - wasserstein
            scaled = loss / replicas
        self.critic_optimizer.apply(tape.gradient(scaled, variables), variables)
        return loss, wasserstein, penalty

    def _generator_update(self, batch, seed, replicas):
        variables = self.generator.trainable_variables
        with tf.GradientTape() as tape:
            fake = self.generator(self._noise(batch, seed), training=True)
            loss = -tf.reduce_mean(tf.cast(self.critic(fake, training=True), tf.float32))
            scaled = loss / replicas
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        return loss

    def train_step(self, data):
        x = data[0] if isinstance(data, (tuple, list)) else data
        x = tf.cast(x, tf.float32)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        tf.debugging.assert_equal(
            tf.shape(x)[0] % self.n_critic, 0,
            message=f"WGANGP batches must hold n_critic = {self.n_critic} x B images")
        slices = tf.reshape(x, [self.n_critic, -1, *self.generator.image_shape])
        seed = replica_step_seed(self.seed, self.optimizer)  # one generator step per train step
        for i in range(self.n_critic):
            critic_loss, wasserstein, penalty = self._critic_update(
                slices[i], tf.random.experimental.stateless_fold_in(seed, i), replicas)
        generator_loss = self._generator_update(
            tf.shape(slices)[1], tf.random.experimental.stateless_fold_in(seed, self.n_critic),
            replicas)
        values = {"critic_loss": critic_loss, "wasserstein": wasserstein,
                  "gradient_penalty": penalty, "generator_loss": generator_loss}
        for name, value in values.items():
            self.trackers[name].update_state(value)
        return {name: m.result() for name, m in self.trackers.items()}

    @property
    def metrics(self):
        return list(self.trackers.values())

    def get_compile_config(self):
        # Training-only state (two optimizers); only the generator is kept.
        return None

    def get_config(self):
        config = super().get_config()
        config.update(generator=keras.saving.serialize_keras_object(self.generator),
                      critic=keras.saving.serialize_keras_object(self.critic),
                      n_critic=self.n_critic, gp_weight=self.gp_weight, seed=self.seed)
        return config


# --------------------------------------------------------------------------------- defense
class DefenseGAN(ThresholdDetector):
    """Defense-GAN purifier + reconstruction-distance detector around a classifier (numpy API).

    Args:
        classifier: Keras model (or callable), images -> logits; needed by `defend` and
            `adaptive_surface` only (None for purification / detection only).
        image_shape: [H, W, C] of the images (H, W >= 8).
        latent_dim: d, the size of z (default 64).
        generator_filters, critic_filters: see `WGANGenerator` / `WGANCritic`.
        epochs: GAN training epochs (one critic pass over TRAIN each; default
            `DEFAULT_GAN_EPOCHS`).
        batch_size: B, images per critic update (a train step uses n_critic·B).
        n_critic: critic updates per generator update (5).
        gp_weight: λ of the gradient penalty (10).
        learning_rate: Adam learning rate of both networks (1e-4; β1 0.5, β2 0.9).
        seed: seed of the weight initialisation, shuffling, training noise and search starts.
        rec_iters: L, gradient-descent steps per restart (paper: 200).
        rec_restarts: R, random starts per image (paper: 10).
        rec_lr: learning rate of the latent search (reference code: 10, momentum 0.7).
        generator: a trained `WGANGenerator` to use instead of a new one.

    Usage::

        dgan = DefenseGAN(classifier)
        dgan.fit(x_train, x_val, fpr=0.001)  # or dgan.calibrate(x_val, fpr) if trained
        out = dgan.defend(x)                 # label (-1 when rejected), verdict (0 or 2)
    """

    _calibrate_call = "fit(x_train, x_val, fpr) or calibrate(x_val, fpr)"
    # Images per latent-search call of `defend`; the search starts are seeded per batch.
    _batch_size = 100

    def __init__(
        self,
        classifier=None,
        image_shape=(28, 28, 1),
        latent_dim=DEFAULT_LATENT_DIM,
        generator_filters=(64, 32),
        critic_filters=(32, 64),
        epochs=DEFAULT_GAN_EPOCHS,
        batch_size=64,
        n_critic=N_CRITIC,
        gp_weight=GP_WEIGHT,
        learning_rate=1e-4,
        seed=0,
        rec_iters=DEFAULT_REC_ITERS,
        rec_restarts=DEFAULT_REC_RESTARTS,
        rec_lr=DEFAULT_REC_LR,
        generator=None,
    ):
        self.classifier = classifier
        self.image_shape = _check_image_shape(image_shape)
        self.latent_dim = int(latent_dim)
        self.generator_filters = _positive_ints(generator_filters, "generator_filters", 2)
        self.critic_filters = tuple(int(f) for f in critic_filters)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.n_critic = int(n_critic)
        self.gp_weight = float(gp_weight)
        self.learning_rate = float(learning_rate)
        self.seed = int(seed)
        self.rec_iters = int(rec_iters)
        self.rec_restarts = int(rec_restarts)
        self.rec_lr = float(rec_lr)
        if self.epochs < 1 or self.batch_size < 1 or self.n_critic < 1:
            raise ValueError(f"epochs, batch_size and n_critic must be >= 1, got {epochs}, "
                             f"{batch_size}, {n_critic}")
        if self.learning_rate <= 0 or self.rec_lr <= 0:
            raise ValueError(f"learning_rate and rec_lr must be > 0, got {learning_rate}, "
                             f"{rec_lr}")
        if self.rec_iters < 0 or self.rec_restarts < 1:
            raise ValueError(f"need rec_iters >= 0 and rec_restarts >= 1, got {rec_iters}, "
                             f"{rec_restarts}")
        if generator is None:
            generator = self._new_generator()
        if not isinstance(generator, WGANGenerator) or generator.image_shape != \
                self.image_shape or generator.latent_dim != self.latent_dim:
            raise ValueError(f"generator must be a WGANGenerator of image_shape "
                             f"{self.image_shape} and latent_dim {self.latent_dim}")
        if not generator.built:
            generator.build((None, self.latent_dim))
        self.generator = generator
        self.critic = None  # set by `train`; not saved (not needed to purify)
        self.threshold: float | None = None
        self.fpr: float | None = None
        self.report: dict = {}
        self._search_fn = None

    def _new_generator(self):
        gen = WGANGenerator(self.image_shape, self.latent_dim, self.generator_filters,
                            name="defense_gan_generator")
        gen.build((None, self.latent_dim))
        return gen

    def _require_classifier(self, what):
        if self.classifier is None:
            raise ValueError(f"DefenseGAN.{what} needs a classifier (DefenseGAN(classifier, ...))")

    # ----------------------------------------------------------------------------- training
    def train(self, x_train, verbose=0) -> dict:
        """Train a new WGAN-GP on clean images `x_train`; returns the per-epoch metrics.

        The trained generator replaces the current one (the critic is kept in `critic`) and any
        calibration is dropped. Calls ``keras.utils.set_random_seed(seed)`` (weight
        initialisation), which resets the global random state.
        """
        x_train = check_images(x_train, self.image_shape)
        batch = min(self.batch_size, len(x_train) // self.n_critic)
        if batch < 1:
            raise ValueError(f"DefenseGAN.train needs at least n_critic = {self.n_critic} "
                             f"images, got {len(x_train)}")
        keras.utils.set_random_seed(self.seed)
        generator = self._new_generator()
        critic = WGANCritic(self.image_shape, self.critic_filters, name="defense_gan_critic")
        trainer = WGANGP(generator, critic, self.n_critic, self.gp_weight, self.seed)
        trainer.build((None, self.latent_dim))

        def adam():
            return keras.optimizers.Adam(self.learning_rate, beta_1=0.5, beta_2=0.9)

        trainer.compile(optimizer=adam(), critic_optimizer=adam())
        data = tf.data.Dataset.from_tensor_slices(x_train).shuffle(
            min(len(x_train), 20_000), seed=self.seed, reshuffle_each_iteration=True
        ).batch(self.n_critic * batch, drop_remainder=True).prefetch(2)
        fit = trainer.fit(data, epochs=self.epochs, verbose=verbose, shuffle=False)
        self.generator, self.critic = generator, critic
        self._search_fn = None
        self.threshold = None
        self.fpr = None
        history = {k: [float(v) for v in vals] for k, vals in fit.history.items()}
        history["batch_size"] = batch
        history["generator_steps"] = int(trainer.optimizer.iterations.numpy())
        return history

    def fit(self, x_train, x_val, fpr, verbose=0) -> dict:
        """Train the GAN on `x_train`, then calibrate on clean `x_val` at `fpr` (ART's `fit`)."""
        fpr = check_fpr(fpr)
        started = time.time()
        history = self.train(x_train, verbose=verbose)
        train_seconds = time.time() - started
        report = self.calibrate(x_val, fpr, verbose=verbose)
        report.update(history=history, epochs=self.epochs, num_train=int(len(x_train)),
                      train_seconds=train_seconds)
        self.report = {k: v for k, v in report.items() if k != "val_scores"}
        return report

    # ----------------------------------------------------------------------------- purifying
    def _search(self, images, seed):
        z0 = tf.random.stateless_normal(
            [tf.shape(images)[0], self.rec_restarts, self.latent_dim], seed)
        z_star, distance, _ = latent_search(
            lambda z: self.generator(z, training=False), images, z0, self.rec_iters,
            self.rec_lr)
        return z_star, distance

    def _searcher(self):
        if self._search_fn is None:
            self._search_fn = tf.function(self._search, input_signature=[
                tf.TensorSpec([None, *self.image_shape], tf.float32),
                tf.TensorSpec([2], tf.int32)])
        return self._search_fn

    def reconstruct(self, x, batch_size: int = 100, verbose: int = 0) -> dict:
        """The latent search on every image: {"z": z* float32 [n, d], "purified": G(z*)
        float32 [n, H, W, C], "distance": ||G(z*) - x||²₂ float32 [n]}.

        Batches of `batch_size` images (B·R rows each); the starts of the batch at offset i are
        seeded by (seed, i). `verbose` shows a progress bar over the images.
        """
        x = check_images(x, self.image_shape)
        search = self._searcher()

        def batch(rows):
            start = int(rows[0])
            z, d = search(tf.constant(x[start : start + len(rows)]),
                          tf.constant([self.seed, start], tf.int32))
            return {"z": z.numpy(), "purified": self.generator(z, training=False).numpy(),
                    "distance": d.numpy()}

        found = concat_outputs(in_batches(batch, np.arange(len(x)), batch_size, verbose))
        return {k: v.astype(np.float32) for k, v in found.items()}

    def purify(self, x, batch_size: int = 100, verbose: int = 0) -> np.ndarray:
        """G(z*) float32 [n, H, W, C], the purified images."""
        return self.reconstruct(x, batch_size, verbose)["purified"]

    def score(self, x, batch_size: int = 100, verbose: int = 0) -> np.ndarray:
        """Reconstruction distances ||G(z*) - x||²₂, float32 [n] (larger = more suspicious)."""
        return self.reconstruct(x, batch_size, verbose)["distance"]

    def calibrate(self, x_val, fpr, verbose: int = 0) -> dict:
        """Set the threshold on clean `x_val` so that the VAL FPR is <= `fpr` (tight);
        `verbose` shows a progress bar over the latent searches."""
        fpr = check_fpr(fpr)
        val_scores = self.score(x_val, verbose=verbose)
        threshold = calibrate_thresholds({"score": val_scores}, fpr)["score"]
        self.threshold = threshold
        self.fpr = fpr
        report = {
            "num_val": int(len(val_scores)),
            "fpr_target": fpr,
            "threshold": threshold,
            "val_false_positive_rate": union_false_positive_rate(
                {"score": val_scores}, {"score": threshold}),
            "score": "squared L2 reconstruction distance ||G(z*) - x||^2",
            "rec_iters": self.rec_iters,
            "rec_restarts": self.rec_restarts,
            "val_scores": val_scores,
        }
        self.report = {**self.report, **{k: v for k, v in report.items() if k != "val_scores"}}
        return report

    # ----------------------------------------------------------------------------- decisions
    def detect(self, x, batch_size: int = 100, verbose: int = 0):
        """ART-style detection: (scores float32 [n], is_adversarial bool [n])."""
        self._require_calibrated()
        scores = self.score(x, batch_size, verbose)
        return scores, scores > self.threshold

    def measure(self, x, batch_size: int | None = None, verbose: int = 0) -> dict:
        """The latent searches, no threshold (`verbose`: a progress bar over them): `score`
        float32 [n] (||G(z*) - x||²₂), `purified` float32 [n, H, W, C] (G(z*)),
        `purified_label` int64 [n] (classifier(G(z*))), `classifier_label` int64 [n]
        (classifier(x), no defense)."""
        self._require_classifier("measure (and defend)")
        batch_size = batch_size or self._batch_size
        x = check_images(x, self.image_shape)
        rec = self.reconstruct(x, batch_size, verbose)
        return {"score": rec["distance"], "purified": rec["purified"],
                "purified_label": self._labels(rec["purified"], batch_size),
                "classifier_label": self._labels(x, batch_size)}

    def decide(self, measured: dict) -> dict:
        """`defend`'s outputs: `label` int64 [n] (classifier(G(z*)); -1 when rejected),
        `verdict` int32 [n] (0 passed, 2 rejected), `score` float32 [n] (||G(z*) - x||²₂;
        rejected iff > `threshold`), `classifier_label` int64 [n] (classifier(x), no defense),
        `purified` float32 [n, H, W, C] (G(z*))."""
        self._require_calibrated()
        flagged = measured["score"] > self.threshold
        return {
            "label": np.where(flagged, -1, measured["purified_label"]).astype(np.int64),
            "verdict": np.where(flagged, VERDICT_REJECTED, VERDICT_PASSED).astype(np.int32),
            "score": measured["score"],
            "classifier_label": measured["classifier_label"],
            "purified": measured["purified"],
        }

    def _measurement_settings(self) -> dict:
        return {"image_shape": list(self.image_shape), "seed": self.seed,
                "rec_iters": self.rec_iters, "rec_restarts": self.rec_restarts,
                "rec_lr": self.rec_lr, "search_batch": self._batch_size}

    def _measurement_models(self) -> list:
        return [self.generator]

    def adaptive_surface(self, x):
        """Differentiable white-box view for adaptive attacks (tensors in, tensors out), BPDA.

        Returns (logits [B, K] of classifier(x + stop_gradient(G(z*) - x)): the label a passed
        input gets, with the identity as purification's gradient; ratio [B] = ||G(z*) - x||²₂ /
        threshold, differentiable in x with z* fixed: the input is rejected iff > 1). z* is
        searched with the starts of `defend`'s first batch (seed, 0).
        """
        self._require_calibrated()
        self._require_classifier("adaptive_surface")
        x = tf.convert_to_tensor(x, tf.float32)
        z_star, _ = self._searcher()(tf.stop_gradient(x),
                                     tf.constant([self.seed, 0], tf.int32))
        purified = tf.cast(self.generator(tf.stop_gradient(z_star), training=False), tf.float32)
        logits = self.classifier(x + tf.stop_gradient(purified - x), training=False)
        ratio = squared_distance(purified, x) / max(self.threshold, 1e-12)
        return tf.convert_to_tensor(logits, tf.float32), ratio

    # ----------------------------------------------------------------------------- saving
    def _settings(self) -> dict:
        return {
            "image_shape": list(self.image_shape),
            "latent_dim": self.latent_dim,
            "generator_filters": list(self.generator_filters),
            "critic_filters": list(self.critic_filters),
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "n_critic": self.n_critic,
            "gp_weight": self.gp_weight,
            "learning_rate": self.learning_rate,
            "seed": self.seed,
            "rec_iters": self.rec_iters,
            "rec_restarts": self.rec_restarts,
            "rec_lr": self.rec_lr,
        }

    def save(self, directory: str) -> None:
        """Write generator.keras and defense_gan.json (settings, threshold, report)."""
        os.makedirs(directory, exist_ok=True)
        with atomic_path(os.path.join(directory, _GENERATOR_NAME)) as tmp:
            self.generator.save(tmp)
        state = {"settings": self._settings(), **self._calibration_state()}
        write_json(os.path.join(directory, _JSON_NAME), state, sort_keys=True)

    @classmethod
    def load(cls, directory: str, classifier=None) -> DefenseGAN:
        """Inverse of `save`; `classifier` is needed for `defend` only."""
        state = cls._read_state(os.path.join(directory, _JSON_NAME))
        generator = keras.models.load_model(os.path.join(directory, _GENERATOR_NAME),
                                            compile=False)
        dgan = cls(classifier, generator=generator, **state["settings"])
        dgan._restore_calibration(state)
        return dgan
