"""Baseline adversarial-example defenses compared with FM-Defense: MagNet, Feature Squeezing and
Defense-GAN.

All follow FM-Defense's verdict convention (0 passed, 2 rejected; label -1 when rejected) and
are calibrated on clean VAL images to a target false-positive rate (FM-Defense: 1 - ρ).
Importing this package registers `MagNetAutoencoder`, `WGANGenerator`, `WGANCritic` and `WGANGP`
for ``keras.models.load_model``.
"""

from fmd_tf.baselines.defense_gan import (
    WGANGP,
    DefenseGAN,
    WGANCritic,
    WGANGenerator,
)
from fmd_tf.baselines.feature_squeezing import (
    SQUEEZER_CANDIDATES,
    FeatureSqueezing,
    choose_squeezers,
    median_filter,
    reduce_bit_depth,
)
from fmd_tf.baselines.magnet import (
    DEFAULT_EPOCHS,
    MagNet,
    MagNetAutoencoder,
    calibrate_thresholds,
)

__all__ = [
    "DEFAULT_EPOCHS", "SQUEEZER_CANDIDATES", "DefenseGAN", "FeatureSqueezing", "MagNet",
    "MagNetAutoencoder", "WGANCritic", "WGANGP", "WGANGenerator", "calibrate_thresholds",
    "choose_squeezers", "median_filter", "reduce_bit_depth",
]
