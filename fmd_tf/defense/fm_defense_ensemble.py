"""FMDefenseEnsemble: the randomized defense the paper's conclusion proposes (§V).

K independently trained combo-VAEs, each calibrated as its own `FMDefense`, defend one shared
classifier. Every image is answered by one member, drawn from the model's secret
`selection_key` and the image itself:

    member(x) = SipHash-2-4_key(uint8 pixels of x) mod K      (`select_members`)

(`tf.strings.to_hash_bucket_strong` over the image's pixels rounded to 1/255). Without the key,
which member judges an input cannot be predicted, and any change of a pixel by at least 1/255
draws the member anew, so an attacker who perturbs an input faces a uniformly random member:
the attack has to fool all of them in expectation (EOT over the ensemble, see
`fmd_tf.attacks.adaptive`). With the key the draw is deterministic: the same model and image
give the same outputs in any process, whatever the rest of the batch.

The key of a model published with its weights is public. Deployers re-key the model they serve
(`FMDefenseEnsemble(members, selection_key=secret)`, or `scripts/train.py --ensemble-key`).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from fmd_tf.defense.fm_defense import (
    OUTPUT_KEYS,
    BatchedDefense,
    FMDefense,
    _maybe_deserialize,
    validate_images,
)
from fmd_tf.loading import FORMAT_KEYS, check_save_format

_MEMBER_OWN_CONFIG = ("classifier", "name", "trainable", "dtype", *FORMAT_KEYS)


def select_members(images, num_members: int, key) -> tf.Tensor:
    """Member index int32 [B] of each image: keyed SipHash of its 8-bit pixels mod K.

    Args:
        images: float32 [B, H, W, C] in [0, 1].
        num_members: K >= 1.
        key: two non-negative ints, the SipHash key.
    """
    pixels = tf.cast(tf.round(tf.convert_to_tensor(images, tf.float32) * 255.0), tf.int32)
    flat = tf.reshape(pixels, [tf.shape(pixels)[0], -1])
    text = tf.strings.reduce_join(tf.strings.as_string(flat), axis=-1, separator=",")
    bucket = tf.strings.to_hash_bucket_strong(text, num_members, key=[int(k) for k in key])
    return tf.cast(bucket, tf.int32)


def _partitioned(fn, images, member, num_members, empty):
    """Run fn_k(images of member k) for every k and put the rows back in order.

    A member without rows is not run (convolutions on an empty batch fail on CPU); `empty`
    gives its outputs instead: {key: (dtype, shape of one row)}.
    """
    rows = tf.range(tf.shape(images)[0])
    parts = tf.dynamic_partition(images, member, num_members)
    indices = tf.dynamic_partition(rows, member, num_members)

    def nothing():
        return {key: tf.zeros([0, *shape], dtype) for key, (dtype, shape) in empty.items()}

    def run(k, part):
        out = fn(k, part)  # traced once per member: the graph holds one copy of its defense
        return {key: out[key] for key in empty}

    outs = [tf.cond(tf.shape(part)[0] > 0, lambda k=k, part=part: run(k, part), nothing)
            for k, part in enumerate(parts)]
    return {key: tf.dynamic_stitch(indices, [o[key] for o in outs]) for key in empty}


@keras.saving.register_keras_serializable(package="fmd_tf")
class FMDefenseEnsemble(BatchedDefense, keras.Model):
    """K calibrated `FMDefense` members sharing one classifier; one member per image.

    Args:
        members: list of K >= 1 built `FMDefense` with the same classifier weights, image shape
            and number of selected codes. Members holding their own copy of the classifier
            (e.g. loaded from separate files) are rebuilt around the first member's classifier
            (same weights required: ValueError otherwise).
        selection_key: the two SipHash key words of the member draw (`select_members`).
        jit_compile: XLA for the graph; None = off (the member draw hashes strings, which XLA
            does not compile).

    Call: images float32 [B, H, W, C] in [0, 1] -> the outputs of `FMDefense` (each row from
    its member) plus `member` int32 [B].
    """

    output_keys = (*OUTPUT_KEYS, "member")

    def __init__(self, members, selection_key=(0, 0), jit_compile=None, **kwargs):
        super().__init__(**kwargs)
        members = [_maybe_deserialize(m) for m in members]
        if not members:
            raise ValueError("members: an ensemble needs at least one FMDefense")
        for i, m in enumerate(members):
            if not isinstance(m, FMDefense):
                raise TypeError(f"members[{i}] must be an FMDefense, got {type(m).__name__}")
            if not m.built:
                raise ValueError(f"members[{i}] is not built: calibrate or load it first")
        key = tuple(int(k) for k in selection_key)
        if len(key) != 2 or min(key) < 0:
            raise ValueError(f"selection_key must be two non-negative ints, got {selection_key}")
        first = members[0]
        for i, m in enumerate(members[1:], start=1):
            if m.num_codes != first.num_codes or m._image_shape != first._image_shape:
                raise ValueError(
                    f"members[{i}] has {m.num_codes} codes and image shape {m._image_shape}; "
                    f"members[0] has {first.num_codes} and {first._image_shape}"
                )
        self.members = [_share_classifier(m, first.classifier, i) for i, m in enumerate(members)]
        self.classifier = first.classifier
        self.selection_key = key
        self.jit_compile = jit_compile
        self._image_shape = first._image_shape
        self._graph_fn = None
        self.built = True

    # ----------------------------------------------------------------------------- state
    @property
    def num_members(self) -> int:
        return len(self.members)

    @property
    def num_codes(self) -> int:
        return self.members[0].num_codes

    @property
    def num_morphs(self) -> int:
        return self.members[0].num_morphs

    @property
    def is_calibrated(self) -> bool:
        return all(m.is_calibrated for m in self.members)

    def theta_r_rows(self, member) -> np.ndarray:
        """θr [n, m] of each row's member (`member` int [n], e.g. the `member` output)."""
        stack = np.stack([m.theta_r.numpy() for m in self.members])
        return stack[np.asarray(member, dtype=np.int64)]

    def _xla_compatible(self) -> bool:
        return False

    def build(self, input_shape):
        self.built = True

    # ----------------------------------------------------------------------------- graph
    def member_of(self, images) -> tf.Tensor:
        """Member index int32 [B] of each (validated) image."""
        return select_members(images, self.num_members, self.selection_key)

    def _defend(self, images, with_stats=False):
        images = validate_images(images, self._image_shape)
        member = self.member_of(images)
        m, image = self.num_codes, list(self._image_shape)
        empty = {"label": (tf.int64, []), "verdict": (tf.int32, []),
                 "classifier_label": (tf.int64, []), "resistance": (tf.float32, [m]),
                 "distance": (tf.float32, []), "purified": (tf.float32, image),
                 "recon_error": (tf.float32, [])}
        if with_stats:
            empty["morphs_used"] = (tf.int32, [m])
        out = _partitioned(lambda k, part: self.members[k]._defend_valid(part, with_stats),
                           images, member, self.num_members, empty)
        return {**out, "member": member}

    def _purify_valid(self, images):
        """Each image purified by its own member: {"purified", "label"}."""
        empty = {"purified": (tf.float32, list(self._image_shape)), "label": (tf.int64, [])}
        return _partitioned(lambda k, part: self.members[k]._purify_valid(part),
                            images, self.member_of(images), self.num_members, empty)

    def reconstruction_error(self, x, batch_size: int = 512) -> np.ndarray:
        """[n] reconstruction error of each image under its own member."""
        x = self._as_batch(x)
        member = np.concatenate([self.member_of(tf.constant(x[i : i + batch_size])).numpy()
                                 for i in range(0, len(x), batch_size)])
        errors = np.empty(len(x), np.float32)
        for k, m in enumerate(self.members):
            rows = np.flatnonzero(member == k)
            if len(rows):
                errors[rows] = m.reconstruction_error(x[rows], batch_size)
        return errors

    def get_config(self):
        config = super().get_config()
        config.update(
            classifier=keras.saving.serialize_keras_object(self.classifier),
            members=[{k: v for k, v in m.get_config().items() if k not in _MEMBER_OWN_CONFIG}
                     for m in self.members],
            member_names=[m.name for m in self.members],
            image_shape=list(self._image_shape),
            selection_key=list(self.selection_key),
            jit_compile=self.jit_compile,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = check_save_format(config)
        classifier = _maybe_deserialize(config.pop("classifier"))
        names = config.pop("member_names", None) or [None] * len(config["members"])
        image_shape = tuple(config.pop("image_shape"))
        members = []
        for member_config, name in zip(config.pop("members"), names, strict=True):
            member = FMDefense(classifier, name=name, **FMDefense.upgrade_config(member_config))
            member.build((None, *image_shape))
            members.append(member)
        return cls(members, **config)


def _share_classifier(member: FMDefense, classifier, index: int) -> FMDefense:
    """`member` itself if it uses `classifier`, else a copy around `classifier` (same weights
    required) carrying the member's combo-VAE and calibration weights."""
    if member.classifier is classifier:
        return member
    mine, shared = member.classifier.get_weights(), classifier.get_weights()
    same = len(mine) == len(shared) and all(
        np.array_equal(a, b) for a, b in zip(mine, shared, strict=True))
    if not same:
        raise ValueError(f"members[{index}] defends another classifier (different weights): "
                         "an ensemble shares one classifier")
    return member.copy_with(classifier=classifier)
