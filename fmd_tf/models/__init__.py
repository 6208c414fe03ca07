"""Models: target classifier (and its adversarial trainer), β-TC-VAE encoder, TC discriminator,
DGMM, decoder, feature-map encoder and decoder, combo-VAE."""

from fmd_tf.models.classifier import Classifier
from fmd_tf.models.combo_vae import ComboVAE, build_combo_vae
from fmd_tf.models.decoder import Decoder
from fmd_tf.models.dgmm import DGMM
from fmd_tf.models.feature_map_decoder import FeatureMapDecoder
from fmd_tf.models.feature_map_encoder import FeatureMapEncoder
from fmd_tf.models.robust_trainer import RobustTrainer
from fmd_tf.models.shared_encoder import SharedEncoder
from fmd_tf.models.tc_discriminator import TCDiscriminator

__all__ = [
    "Classifier", "ComboVAE", "DGMM", "Decoder", "FeatureMapDecoder", "FeatureMapEncoder",
    "RobustTrainer", "SharedEncoder",
    "TCDiscriminator",
    "build_combo_vae",
]
