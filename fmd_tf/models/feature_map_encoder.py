"""Feature-map encoder of the class-shared codes zs: C channels of h×w maps, one code per
channel (paper §IV-A and Table I, CelebA column: residual blocks, "each channel is considered
as one latent factor")."""

from __future__ import annotations

import keras
from keras import layers, ops


def halvings(image_side: int, map_side: int) -> int:
    """Stride-2 stages L with ceil(image_side / 2**L) == map_side; ValueError listing the sides
    that work when there is none."""
    side, stages, valid = int(image_side), 0, []
    while True:
        valid.append(side)
        if side == int(map_side):
            return stages
        if side == 1:
            break
        side, stages = -(-side // 2), stages + 1
    raise ValueError(f"feature_map_size {map_side} cannot be reached from a {image_side}-pixel "
                     f"side by halving (stride-2 blocks); choose one of {sorted(set(valid))}")


def stage_widths(filters, stages: int) -> tuple[int, ...]:
    """The width of each of `stages` blocks: `filters` in order, the last repeated."""
    filters = tuple(int(f) for f in filters)
    return tuple(filters[min(i, len(filters) - 1)] for i in range(stages))


@keras.saving.register_keras_serializable(package="fmd_tf")
class FeatureMapEncoder(keras.Model):
    """q_φ(zs|x) over a feature map: mean and log variance [B, h, w, C], returned flattened.

    L residual downsampling blocks take the image to h×w (L from the image side and
    `map_size`, `halvings`): block i is relu(conv3x3 s2 → relu → conv3x3 + conv1x1 s2 skip)
    with `filters[i]` channels (the last width repeated); a 1×1 convolution then gives 2C
    channels, split into mean and log variance.

    Args:
        channels: C, the number of codes (one per channel).
        map_size: h = w, the side of each channel's map.
        filters: widths of the residual blocks.

    `latent_dim` = h·w·C (the size of zs); `num_codes` = C.

    Call: images [B, H, W, c] -> (mean [B, h·w·C], log_var [B, h·w·C]), flattened channel-last
    (dimension p·C + k is position p of channel k).
    """

    def __init__(self, channels=10, map_size=4, filters=(32, 64), **kwargs):
        super().__init__(**kwargs)
        self.channels = int(channels)
        self.map_size = int(map_size)
        self.filters = tuple(int(f) for f in filters)
        if self.channels < 1 or self.map_size < 1 or not self.filters or min(self.filters) < 1:
            raise ValueError("channels, map_size and filters must be positive, got "
                             f"{self.channels}, {self.map_size}, {self.filters}")
        self.blocks = []
        self.head = layers.Conv2D(2 * self.channels, 1, name="mean_log_var")
        self.flatten = layers.Flatten(name="flatten")

    @property
    def latent_dim(self) -> int:
        return self.map_size * self.map_size * self.channels

    @property
    def num_codes(self) -> int:
        return self.channels

    def code_values(self, mean):
        """[B, C] spatial mean of each channel of `mean` [B, h·w·C] (a code's value)."""
        from fmd_tf.defense import morphs

        return morphs.feature_map_code_values(mean, self.channels)

    def with_code_values(self, mean, selected, values):
        """[B, m, N, h·w·C]: `mean` [B, h·w·C] with channel selected[i] shifted as a whole to
        spatial mean values[b, i, j] (`morphs.feature_map_morph_latents`)."""
        from fmd_tf.defense import morphs

        return morphs.feature_map_morph_latents(mean, selected, values, self.channels)

    def code_masks(self, selected):
        """[m, h·w·C] 0/1 masks of the dimensions of codes `selected`."""
        from fmd_tf.defense import morphs

        return morphs.feature_map_code_masks(selected, self.channels, self.latent_dim)

    def build(self, input_shape):
        h, w = int(input_shape[1]), int(input_shape[2])
        stages = halvings(h, self.map_size)
        if halvings(w, self.map_size) != stages:
            raise ValueError(f"images {h}x{w} do not halve to a square {self.map_size}x"
                             f"{self.map_size} map: use square images")
        self.blocks = [
            [layers.Conv2D(f, 3, strides=2, padding="same", activation="relu", name=f"b{i}_a"),
             layers.Conv2D(f, 3, padding="same", name=f"b{i}_b"),
             layers.Conv2D(f, 1, strides=2, padding="same", name=f"b{i}_skip")]
            for i, f in enumerate(stage_widths(self.filters, stages))
        ]
        shape = tuple(input_shape)
        for conv_a, conv_b, skip in self.blocks:
            conv_a.build(shape)
            skip.build(shape)
            shape = conv_a.compute_output_shape(shape)
            conv_b.build(shape)
        self.head.build(shape)
        self.built = True

    def call(self, images, training=False):
        h = images
        for conv_a, conv_b, skip in self.blocks:
            h = ops.relu(conv_b(conv_a(h)) + skip(h))
        mean, log_var = ops.split(self.head(h), 2, axis=-1)
        return self.flatten(mean), self.flatten(log_var)

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels, map_size=self.map_size, filters=list(self.filters))
        return config
