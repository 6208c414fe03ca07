"""Combo-VAE: β-TC-VAE encoder Es + frozen DGMM + decoder on concat(zs, zu) (paper §III-B, D)."""

from __future__ import annotations

import keras
import tensorflow as tf

from fmd_tf import losses
from fmd_tf.config import ComboVAEConfig
from fmd_tf.models.decoder import Decoder
from fmd_tf.models.dgmm import DGMM
from fmd_tf.models.feature_map_decoder import FeatureMapDecoder
from fmd_tf.models.feature_map_encoder import FeatureMapEncoder
from fmd_tf.models.shared_encoder import SharedEncoder
from fmd_tf.models.tc_discriminator import TCDiscriminator


@keras.saving.register_keras_serializable(package="fmd_tf")
class ComboVAE(keras.Model):
    """The combo-VAE and its stage-2 training step.

    Stage 1 trains `dgmm` on its own (`DGMM.fit(x, y)`); stage 2 (`ComboVAE.fit(x)`) keeps it
    frozen and trains, per batch (Eq. 8):

    * encoder Es on L_R + β·L_KL + γ·L_TC,
    * decoder on L_R (L_KL and L_TC do not depend on it),
    * D_tc on its own loss with its own optimizer (`discriminator_optimizer` in `compile`).

    Loss terms are divided by `num_replicas_in_sync` so that `tf.distribute` sums gradients
    correctly.

    Args:
        shared_encoder: `SharedEncoder` (Es; d_s codes, one per dimension) or
            `FeatureMapEncoder` (C channels of h×w maps, one code per channel, flattened).
        dgmm: trained `DGMM`; `compile` freezes it for stage 2.
        decoder: `Decoder` (or `FeatureMapDecoder`) on concat(zs, zu).
        discriminator: `TCDiscriminator`.
        gamma: γ, weight of L_TC.
        beta: weight of L_KL.
        free_bits: floor in nats of each code's batch-mean KL in L_KL (`losses.free_bits_kl`;
            for a feature map the floor is per channel; 0 is Eq. 8's L_KL).
        seed: seed of the reparameterisation noise and of `permute_dims`.
        recon_weight: weight w of L_R (1 in Eq. 8); w = 1/(2σ²) is a Gaussian decoder with
            pixel variance σ², trading KL pressure against reconstruction fidelity.
        consistency_weight: weight of `losses.label_consistency_loss` (not in the paper), a
            decoder-only term: KL between the classifier's outputs on x and on the
            reconstruction. Its gradient reaches the decoder only, never Es, so the encoder
            is not taught the classifier's (attackable) features. Needs the classifier from
            `set_consistency_classifier` at training time; the classifier is not saved.
        latent_cycle_weight: weight of `losses.latent_cycle_loss` (not in the paper), a
            decoder-only term: the encoder's code values of the reconstruction against the
            sampled codes it was decoded from, so that no code is ignored by the decoder.
        code_use_weight: weight of `losses.code_use_loss` (not in the paper), a decoder-only
            hinge: one randomly drawn code of each image shifted by ±`losses.CODE_USE_SHIFT`
            must move its decoded image by `code_use_margin` mean |Δpixel|.
        code_use_margin: τ of `losses.code_use_loss`.

    `fit` takes images, or (images, {"zu": the frozen DGMM's codes, "logits": the classifier's
    logits}) with either key, so that these per-image constants of the loss are computed once
    per image rather than once per epoch (`fmd_tf.training.train_vae` does this).

    Call: images [B, H, W, C] -> dict(mean [B, d_s], log_var [B, d_s], zu [B, K],
    reconstruction [B, H, W, C]) with zs = mean (no sampling).
    """

    def __init__(
        self,
        shared_encoder,
        dgmm,
        decoder,
        discriminator,
        gamma=40.0,
        beta=1.0,
        seed=0,
        recon_weight=1.0,
        consistency_weight=0.0,
        free_bits=0.0,
        latent_cycle_weight=0.0,
        code_use_weight=0.0,
        code_use_margin=ComboVAEConfig.code_use_margin,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.shared_encoder = _maybe_deserialize(shared_encoder)
        self.dgmm = _maybe_deserialize(dgmm)
        self.decoder = _maybe_deserialize(decoder)
        self.discriminator = _maybe_deserialize(discriminator)
        self.gamma = float(gamma)
        self.beta = float(beta)
        self.seed = int(seed)
        self.recon_weight = float(recon_weight)
        self.consistency_weight = float(consistency_weight)
        self.free_bits = float(free_bits)
        self.latent_cycle_weight = float(latent_cycle_weight)
        self.code_use_weight = float(code_use_weight)
        self.code_use_margin = float(code_use_margin)
        self.discriminator_optimizer = None
        # A plain callable, not an attribute Keras tracks: the classifier is not part of the
        # saved combo-VAE.
        self._consistency_fn = None
        self.trackers = {
            name: keras.metrics.Mean(name=name)
            for name in ("loss", "recon_loss", "kl_loss", "tc", "disc_loss", "consistency",
                         "latent_cycle", "code_use")
        }

    @property
    def shared_dim(self) -> int:
        return self.shared_encoder.latent_dim

    @property
    def unique_dim(self) -> int:
        return self.dgmm.latent_dim

    @property
    def num_codes(self) -> int:
        """The number of class-shared codes the detector can morph: d_s for a vector latent
        (`SharedEncoder`), C for a feature map (`FeatureMapEncoder`, one code per channel).
        `shared_dim` is the size of zs in both cases."""
        return self.shared_encoder.num_codes

    def code_values(self, mean):
        """[B, num_codes] the value of each code of μs(x) `mean` [B, shared_dim]."""
        return self.shared_encoder.code_values(mean)

    def with_code_values(self, mean, selected, values):
        """[B, m, N, shared_dim]: `mean` with code selected[i] moved to value values[b, i, j]
        and the other codes unchanged (a natural morph's zs, §III-C)."""
        return self.shared_encoder.with_code_values(mean, selected, values)

    def code_masks(self, selected):
        """[m, shared_dim] 0/1 masks of the dimensions that codes `selected` occupy."""
        return self.shared_encoder.code_masks(selected)

    def build(self, input_shape):
        shapes = {
            self.shared_encoder: input_shape,
            self.dgmm: input_shape,
            self.decoder: (None, self.shared_dim + self.unique_dim),
            self.discriminator: (None, self.shared_dim),
        }
        for model, shape in shapes.items():
            if not model.built:
                model.build(shape)
        self.built = True

    def compile(self, optimizer="adam", discriminator_optimizer=None, **kwargs):
        """Prepare stage 2: freezes the DGMM; `optimizer` trains Es + decoder."""
        self.dgmm.trainable = False
        super().compile(optimizer=optimizer, **kwargs)
        self.discriminator_optimizer = keras.optimizers.get(
            discriminator_optimizer or keras.optimizers.Adam(1e-4, beta_1=0.5, beta_2=0.9)
        )
        if self.built:
            self.discriminator_optimizer.build(self.discriminator.trainable_variables)

    def set_consistency_classifier(self, classifier):
        """Use `classifier` (frozen) for the consistency term during `fit`; None clears it."""
        if classifier is None:
            self._consistency_fn = None
            return
        classifier.trainable = False
        self._consistency_fn = lambda x: classifier(x, training=False)

    def encode(self, images):
        """(mean [B, d_s], log_var [B, d_s], zu [B, K]) of a batch of images."""
        mean, log_var = self.shared_encoder(images)
        return mean, log_var, self.dgmm(images)

    def decode(self, zs, zu):
        """Images [B, H, W, C] from zs [B, d_s] and zu [B, K]."""
        return self.decoder(tf.concat([_float32(zs), _float32(zu)], axis=-1))

    def call(self, images, training=False):
        mean, log_var, zu = self.encode(images)
        return {
            "mean": mean,
            "log_var": log_var,
            "zu": zu,
            "reconstruction": self.decode(mean, zu),
        }

    def _step_seed(self):
        return replica_step_seed(self.seed, self.optimizer)

    def _forward(self, x, seed, training, targets=None):
        targets = targets or {}
        # The losses take float32: outputs of sub-models that compute in a mixed policy
        # (`build_combo_vae(policy=)`) are cast back here.
        mean, log_var = (_float32(t) for t in self.shared_encoder(x, training=training))
        eps = tf.random.stateless_normal(tf.shape(mean), seed=seed)
        zs = mean + tf.exp(0.5 * log_var) * eps
        zu = targets["zu"] if "zu" in targets else self.dgmm(x, training=False)
        zu = tf.stop_gradient(_float32(zu))
        x_hat = _float32(self.decode(zs, zu))
        l_r = tf.reduce_mean(losses.reconstruction_loss(x, x_hat))
        l_kl = tf.reduce_mean(losses.gaussian_kl(mean, log_var))
        # What the encoder is trained on; the tracked kl_loss stays the plain KL.
        kl_penalty = l_kl if self.free_bits <= 0.0 else \
            losses.free_bits_kl(mean, log_var, self.free_bits, self.num_codes)
        l_tc = losses.total_correlation_estimate(
            _float32(self.discriminator(zs, training=training)))
        l_c = tf.zeros([])
        if self.consistency_weight > 0.0:
            if self._consistency_fn is None:
                raise ValueError("consistency_weight > 0 needs set_consistency_classifier()")
            clean_logits = targets["logits"] if "logits" in targets else self._consistency_fn(x)
            l_c = tf.reduce_mean(losses.label_consistency_loss(
                _float32(clean_logits), _float32(self._consistency_fn(x_hat))
            ))
        l_cyc = tf.zeros([])
        if self.latent_cycle_weight > 0.0:
            recovered, _ = self.shared_encoder(x_hat, training=training)
            l_cyc = tf.reduce_mean(losses.latent_cycle_loss(
                self.code_values(zs), self.code_values(_float32(recovered))))
        l_use = tf.zeros([])
        if self.code_use_weight > 0.0:
            l_use = tf.reduce_mean(losses.code_use_loss(
                x_hat, _float32(self.decode(self._shift_one_code(zs, seed), zu)),
                self.code_use_margin))
        zs_fixed = tf.stop_gradient(zs)
        permuted = losses.permute_dims(zs_fixed, seed + tf.constant([0, 1], tf.int32))
        l_d = losses.tc_discriminator_loss(
            _float32(self.discriminator(zs_fixed, training=training)),
            _float32(self.discriminator(permuted, training=training)),
        )
        return (l_r, l_kl, l_tc, l_d, l_c, l_cyc, l_use), kl_penalty

    def _shift_one_code(self, zs, seed):
        """[B, shared_dim]: zs with one code per image, drawn uniformly, moved by
        ±`losses.CODE_USE_SHIFT` (sign drawn per image; all of a feature-map code's
        positions)."""
        batch = tf.shape(zs)[:1]
        code = tf.random.stateless_uniform(batch, seed + tf.constant([0, 2], tf.int32),
                                           maxval=self.num_codes, dtype=tf.int32)
        draw = tf.random.stateless_uniform(batch, seed + tf.constant([0, 3], tf.int32))
        sign = tf.where(draw < 0.5, -1.0, 1.0)
        masks = tf.gather(tf.cast(self.code_masks(tf.range(self.num_codes)), zs.dtype), code)
        return zs + losses.CODE_USE_SHIFT * sign[:, None] * masks

    def _decoder_terms(self, l_c, l_cyc, l_use):
        """The weighted sum of the decoder-only terms."""
        return (self.consistency_weight * l_c + self.latent_cycle_weight * l_cyc
                + self.code_use_weight * l_use)

    def _update_trackers(self, l_r, l_kl, l_tc, l_d, l_c, l_cyc, l_use):
        values = {
            "loss": self.recon_weight * l_r + self.beta * l_kl + self.gamma * l_tc
            + self._decoder_terms(l_c, l_cyc, l_use),
            "recon_loss": l_r,
            "kl_loss": l_kl,
            "tc": l_tc,
            "disc_loss": l_d,
            "consistency": l_c,
            "latent_cycle": l_cyc,
            "code_use": l_use,
        }
        for name, value in values.items():
            self.trackers[name].update_state(value)
        return {m.name: m.result() for m in self.metrics}

    @staticmethod
    def _unpack(data):
        """(images, targets dict or None) of a batch: x, (x,) or (x, targets)."""
        if isinstance(data, (tuple, list)):
            return data[0], (data[1] if len(data) > 1 else None)
        return data, None

    def train_step(self, data):
        x, targets = self._unpack(data)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        enc_vars = self.shared_encoder.trainable_variables
        dec_vars = self.decoder.trainable_variables
        disc_vars = self.discriminator.trainable_variables
        with tf.GradientTape(persistent=True) as tape:
            terms, kl_penalty = self._forward(x, self._step_seed(), training=True,
                                              targets=targets)
            l_r, l_kl, l_tc, l_d, l_c, l_cyc, l_use = terms
            vae_loss = (self.recon_weight * l_r + self.beta * kl_penalty
                        + self.gamma * l_tc) / replicas
            dec_loss = vae_loss + self._decoder_terms(l_c, l_cyc, l_use) / replicas
            disc_loss = l_d / replicas
        enc_grads = tape.gradient(vae_loss, enc_vars)
        dec_grads = tape.gradient(dec_loss, dec_vars)
        disc_grads = tape.gradient(disc_loss, disc_vars)
        del tape
        self.optimizer.apply(enc_grads + dec_grads, enc_vars + dec_vars)
        self.discriminator_optimizer.apply(disc_grads, disc_vars)
        return self._update_trackers(*terms)

    def test_step(self, data):
        x, targets = self._unpack(data)
        seed = tf.constant([self.seed, 0], tf.int32)
        terms, _ = self._forward(x, seed, training=False, targets=targets)
        return self._update_trackers(*terms)

    @property
    def metrics(self):
        return list(self.trackers.values())

    def get_compile_config(self):
        # Training-only state (two optimizers); a loaded combo-VAE is for inference.
        return None

    def get_config(self):
        config = super().get_config()
        config.update(
            shared_encoder=keras.saving.serialize_keras_object(self.shared_encoder),
            dgmm=keras.saving.serialize_keras_object(self.dgmm),
            decoder=keras.saving.serialize_keras_object(self.decoder),
            discriminator=keras.saving.serialize_keras_object(self.discriminator),
            seed=self.seed,
            **{name: getattr(self, name) for name in LOSS_OPTIONS},
        )
        if self.code_use_weight == 0.0:
            # A combo-VAE trained without the hinge keeps the config it had before the option
            # existed: the evaluation cache keys defenses and their attacks on it.
            del config["code_use_weight"], config["code_use_margin"]
        return config


# The loss settings of `ComboVAE`: constructor arguments, `get_config` entries and
# `ComboVAEConfig` fields of the same names.
LOSS_OPTIONS = ("gamma", "beta", "recon_weight", "consistency_weight", "free_bits",
                "latent_cycle_weight", "code_use_weight", "code_use_margin")


def replica_step_seed(seed: int, optimizer):
    """Stateless seed int32 [2] of a training step: (`seed` + 7919·replica id, the optimizer's
    step), so that each step and each `tf.distribute` replica draws its own noise."""
    ctx = tf.distribute.get_replica_context()
    replica = ctx.replica_id_in_sync_group if ctx is not None else 0
    base = tf.constant(seed, tf.int32) + 7919 * tf.cast(replica, tf.int32)
    return tf.stack([base, tf.cast(optimizer.iterations, tf.int32)])


def _float32(t):
    return tf.cast(t, tf.float32)


def _maybe_deserialize(obj):
    if isinstance(obj, dict):
        return keras.saving.deserialize_keras_object(obj)
    return obj


def build_combo_vae(combo_cfg, image_shape, num_classes, seed=0, policy=None) -> ComboVAE:
    """A fresh, built combo-VAE from a `ComboVAEConfig`; `policy` (e.g. "mixed_bfloat16") is
    the dtype policy of the encoder, decoder and discriminator (stage 2), the DGMM keeps the
    current one (stage 1 trains it in float32)."""
    from fmd_tf.defense.precision import dtype_policy

    dgmm = DGMM(
        num_classes=num_classes,
        latent_dim=combo_cfg.unique_dim,
        filters=combo_cfg.encoder_filters,
        dense_units=combo_cfg.encoder_dense,
        lambda_lkd=combo_cfg.lambda_lkd,
        name="dgmm",
    )
    latent = getattr(combo_cfg, "latent", "vector")
    with dtype_policy(policy):
        if latent == "feature_map":
            shared_encoder = FeatureMapEncoder(
                combo_cfg.shared_dim, combo_cfg.feature_map_size,
                combo_cfg.feature_map_encoder_filters, name="shared_encoder")
            decoder = FeatureMapDecoder(
                image_shape, combo_cfg.shared_dim, combo_cfg.feature_map_size,
                combo_cfg.feature_map_decoder_filters, name="decoder")
        elif latent == "vector":
            shared_encoder = SharedEncoder(combo_cfg.shared_dim, combo_cfg.encoder_filters,
                                           combo_cfg.encoder_dense, name="shared_encoder")
            decoder = Decoder(image_shape, combo_cfg.decoder_dense, combo_cfg.decoder_filters,
                              name="decoder")
        else:
            raise ValueError(f"latent must be 'vector' or 'feature_map', got {latent!r}")
        discriminator = TCDiscriminator(combo_cfg.discriminator_units, name="tc_discriminator")
    model = ComboVAE(
        shared_encoder=shared_encoder,
        dgmm=dgmm,
        decoder=decoder,
        discriminator=discriminator,
        seed=seed,
        name="combo_vae",
        **{name: getattr(combo_cfg, name) for name in LOSS_OPTIONS},
    )
    model.build((None, *image_shape))
    return model
