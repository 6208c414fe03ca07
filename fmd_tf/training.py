"""Training stages used by `scripts/train.py`: classifier -> DGMM -> combo-VAE -> FM-Defense.

Each stage is a function that builds its model inside the given `tf.distribute` strategy scope,
trains it with Keras `fit` (progress bars, TensorBoard logs) and returns the model with the
figures that go into the model card.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from fmd_tf.config import DGMM_LR_SCHEDULES, TRAIN_PRECISIONS, VAE_DATA, ExperimentConfig
from fmd_tf.defense.precision import dtype_policy, resolve_auto
from fmd_tf.models.classifier import Classifier
from fmd_tf.models.combo_vae import ComboVAE, build_combo_vae
from fmd_tf.models.dgmm import DGMM
from fmd_tf.models.robust_trainer import RobustTrainer

STRATEGIES = ("default", "mirrored", "multiworker")


def get_strategy(name: str) -> tf.distribute.Strategy:
    """The `tf.distribute` strategy named on the command line."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")


def _callbacks(log_dir: str | None, name: str):
    if not log_dir:
        return []
    return [keras.callbacks.TensorBoard(log_dir=os.path.join(log_dir, name), write_graph=False)]


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    """Share of `x` whose argmax logit equals `y`."""
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def epoch_batches(inputs, targets, batch_size: int):
    """(An endless tf.data.Dataset of (inputs, targets) batches, steps per epoch) for
    `Model.fit(dataset, epochs=E, steps_per_epoch=steps)`.

    Each epoch is one fresh permutation of the N images cut into ceil(N / batch_size) batches
    (the last one partial), like `fit` on numpy arrays with `shuffle=True`; the permutation
    follows the global seed. `fit` on numpy arrays builds a new input iterator per epoch, and
    on 2 CPU cores the main thread then waited up to 9 s, idle, at the start of about every
    other epoch (stages went 25-35 % over their summed step times); one endless iterator
    waits once.

    inputs: array [N, ...]; targets: array [N, ...], a dict of them, or None.
    """
    data = inputs if targets is None else (inputs, targets)
    n = len(inputs)
    indices = tf.data.Dataset.range(n).shuffle(n, reshuffle_each_iteration=True) \
        .batch(batch_size).repeat()
    dataset = tf.data.Dataset.zip((indices, tf.data.Dataset.from_tensors(data).repeat()))
    dataset = dataset.map(lambda i, d: tf.nest.map_structure(lambda a: tf.gather(a, i), d),
                          num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    return dataset.with_options(options).prefetch(2), -(-n // batch_size)


def _fit(model, inputs, targets, batch_size: int, epochs: int, verbose, callbacks):
    if model.optimizer is not None and not model.optimizer.built:
        # Built before the first step (as Keras does only under an explicit strategy): a step
        # that creates the optimizer's variables is traced twice by tf.function.
        with model.distribute_strategy.scope():
            model.optimizer.build(model.trainable_variables)
    dataset, steps = epoch_batches(inputs, targets, batch_size)
    return model.fit(dataset, epochs=epochs, steps_per_epoch=steps, verbose=verbose,
                     callbacks=callbacks, shuffle=False)  # the dataset shuffles


def training_precision(name: str) -> str:
    """The Keras dtype policy that `ClassifierConfig.precision` `name` trains with."""
    return resolve_auto(name, TRAIN_PRECISIONS, "mixed_bfloat16", "precision")


def new_classifier(cfg: ExperimentConfig, steps: int) -> Classifier:
    """The built, compiled classifier of `cfg` (sparse cross-entropy on logits, Adam with the
    rate cosine-decayed over `steps`), in the current dtype policy and strategy scope."""
    c = cfg.classifier
    model = Classifier(num_classes=cfg.num_classes, conv_filters=c.conv_filters,
                       dense_units=c.dense_units, dropout=c.dropout, name="classifier")
    model.build((None, *cfg.image_shape))
    model.compile(
        optimizer=_classifier_optimizer(c, steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _classifier_optimizer(c, steps: int):
    return keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(
        c.learning_rate, decay_steps=max(int(steps), 1), alpha=0.01))


def robust_trainer(cfg: ExperimentConfig, classifier: Classifier, steps: int,
                   seed: int = 0) -> RobustTrainer:
    """The compiled `RobustTrainer` of `cfg.classifier.training` ("pgd_at" or "trades") around
    `classifier`, with the classifier's optimizer schedule over `steps`."""
    c = cfg.classifier
    trainer = RobustTrainer(classifier, c.training, eps=c.adversarial_eps,
                            steps=c.adversarial_steps, beta=c.trades_beta, seed=seed,
                            name="robust_trainer")
    trainer.build((None, *cfg.image_shape))
    trainer.compile(optimizer=_classifier_optimizer(c, steps))
    return trainer


def train_classifier(
    cfg: ExperimentConfig,
    x_train: np.ndarray,
    y_train: np.ndarray,
    strategy: tf.distribute.Strategy,
    log_dir: str | None = None,
    verbose: int | str = "auto",
) -> Classifier:
    """Train the target classifier (Adam, cosine-decayed rate) with the dtype policy of
    `training_precision(cfg.classifier.precision)`: sparse cross-entropy on logits, or, for
    `cfg.classifier.training` "pgd_at" / "trades", through `robust_trainer`. Save its
    `inference_copy` (float32)."""
    c = cfg.classifier
    if c.train_size is not None:
        x_train, y_train = x_train[: c.train_size], y_train[: c.train_size]
    policy = training_precision(c.precision)
    if verbose:
        print(f"classifier: {c.training} training with the {policy} dtype policy", flush=True)
    steps = c.epochs * int(np.ceil(len(x_train) / c.batch_size))
    with dtype_policy(policy), strategy.scope():
        model = new_classifier(cfg, steps=steps)
        if c.init is not None:
            start_from(model, c.init)
        trained = model if c.training == "standard" else robust_trainer(cfg, model, steps)
    _fit(trained, x_train, y_train, c.batch_size, c.epochs, verbose,
         _callbacks(log_dir, "classifier"))
    return model


def start_from(model: keras.Model, path: str) -> None:
    """Set the weights of `model` to those of the saved model at `path` (fine-tuning); a
    ValueError says what differs when the two architectures do not match."""
    if not os.path.isfile(path):
        raise ValueError(f"classifier init {path!r} is not a file: give a saved classifier "
                         "(.keras)")
    saved = keras.models.load_model(path, compile=False)
    theirs, ours = saved.get_weights(), model.get_weights()
    shapes = [w.shape for w in theirs], [w.shape for w in ours]
    if shapes[0] != shapes[1]:
        raise ValueError(f"classifier init {path!r} has weights of shapes {shapes[0]}, the "
                         f"classifier of this configuration {shapes[1]}: give a classifier "
                         "of the same architecture (conv_filters, dense_units, image shape, "
                         "classes)")
    model.set_weights(theirs)


def _float32_config(config):
    """`config` (a nested Keras config) with every mixed dtype policy replaced by float32."""
    if isinstance(config, list):
        return [_float32_config(v) for v in config]
    if not isinstance(config, dict):
        return config
    out = {k: _float32_config(v) for k, v in config.items()}
    policy = out.get("dtype")
    name = policy.get("config", {}).get("name") if isinstance(policy, dict) else policy
    if isinstance(name, str) and name.startswith("mixed_"):
        out["dtype"] = "float32"
    return out


def inference_copy(model: keras.Model) -> keras.Model:
    """An uncompiled float32 copy with the same weights (drops the optimizer state and a
    mixed-precision training policy, also of nested models, before saving)."""
    config = _float32_config(model.get_config())
    if "dtype" in config:
        config["dtype"] = "float32"
    with dtype_policy("float32"):
        copy = model.__class__.from_config(config)
    copy.build(model.get_build_config()["input_shape"])
    copy.set_weights(model.get_weights())
    return copy


def dgmm_learning_rate(combo_cfg, steps: int):
    """Stage-1 learning rate: `learning_rate`, constant or cosine-decayed to 1 % over `steps`."""
    schedule = combo_cfg.dgmm_lr_schedule
    if schedule not in DGMM_LR_SCHEDULES:
        raise ValueError(
            f"dgmm_lr_schedule must be one of {DGMM_LR_SCHEDULES}, got {schedule!r}"
        )
    if schedule == "constant":
        return combo_cfg.learning_rate
    return keras.optimizers.schedules.CosineDecay(
        combo_cfg.learning_rate, decay_steps=max(int(steps), 1), alpha=0.01
    )


def dgmm_training_data(combo_cfg, split, full):
    """Stage-1 (images, labels): all of the labeled training set `full` when
    `combo_cfg.dgmm_train_size` is None, else the first k of the TRAIN split `split`."""
    k = combo_cfg.dgmm_train_size
    return full if k is None else (split[0][:k], split[1][:k])


def vae_training_images(combo_cfg, x_train_split: np.ndarray, x_train_full: np.ndarray):
    """Stage-2 images [N, H, W, C] chosen by `combo_cfg.vae_data` ("train" or "full")."""
    if combo_cfg.vae_data not in VAE_DATA:
        raise ValueError(f"vae_data must be one of {VAE_DATA}, got {combo_cfg.vae_data!r}")
    return x_train_full if combo_cfg.vae_data == "full" else x_train_split


def train_dgmm(
    cfg: ExperimentConfig,
    model: ComboVAE,
    x_train: np.ndarray,
    y_train: np.ndarray,
    log_dir: str | None = None,
    verbose: int | str = "auto",
) -> DGMM:
    """Stage 1: the DGMM of `model` on labeled clean images with L_GM (Eq. 12).

    The learning rate follows `cfg.combo.dgmm_lr_schedule` (see `dgmm_learning_rate`).
    """
    c = cfg.combo
    dgmm = model.dgmm
    dgmm.trainable = True
    steps = c.dgmm_epochs * int(np.ceil(len(x_train) / c.batch_size))
    dgmm.compile(optimizer=keras.optimizers.Adam(dgmm_learning_rate(c, steps)))
    _fit(dgmm, x_train, y_train, c.batch_size, c.dgmm_epochs, verbose,
         _callbacks(log_dir, "dgmm"))
    return dgmm


def train_vae(
    cfg: ExperimentConfig,
    model: ComboVAE,
    x_train: np.ndarray,
    log_dir: str | None = None,
    verbose: int | str = "auto",
    classifier: keras.Model | None = None,
) -> ComboVAE:
    """Stage 2: Es + decoder + D_tc with the DGMM frozen (Eq. 8).

    `classifier` feeds the decoder's label-consistency term; it is required when
    `cfg.combo.consistency_weight` > 0.
    """
    c = cfg.combo
    if c.consistency_weight > 0 and classifier is None:
        raise ValueError("consistency_weight > 0 needs the classifier")
    model.set_consistency_classifier(classifier if c.consistency_weight > 0 else None)
    model.compile(
        optimizer=keras.optimizers.Adam(c.learning_rate),
        discriminator_optimizer=keras.optimizers.Adam(
            c.discriminator_learning_rate, beta_1=0.5, beta_2=0.9
        ),
    )
    # The DGMM and the classifier are frozen: their outputs on the training images are
    # computed once here, not once per epoch inside the loss.
    targets = {"zu": model.dgmm.predict(x_train, batch_size=512, verbose=0)}
    if c.consistency_weight > 0:
        targets["logits"] = classifier.predict(x_train, batch_size=512, verbose=0)
    targets = {k: v.astype(np.float32) for k, v in targets.items()}
    _fit(model, x_train, targets, c.batch_size, c.vae_epochs, verbose,
         _callbacks(log_dir, "combo_vae"))
    return model


# The parts of ExperimentConfig that each training stage uses (the rest apply to every run).
STAGE_HYPERPARAMETERS = {"classifier": ("classifier",), "combo": ("dgmm", "vae"),
                         "defense": ("defense",)}


def card_hyperparameters(current: dict, previous: dict | None, stages) -> dict:
    """A model card's `hyperparameters` after a run of `stages`.

    current: this run's config as a dict (`config.to_dict`); previous: the card's entry before
    the run (None for a new model). A part of `STAGE_HYPERPARAMETERS` that no stage of this run
    trained keeps the earlier entry as it was written then (a model trained before an option
    existed is not described with that option's present default); everything else is
    `current`'s.
    """
    merged = dict(current)
    for part, part_stages in STAGE_HYPERPARAMETERS.items():
        if previous and part in previous and not set(part_stages) & set(stages):
            merged[part] = previous[part]
    return merged


def new_combo_vae(cfg: ExperimentConfig, strategy: tf.distribute.Strategy, seed: int) -> ComboVAE:
    """The built combo-VAE of `cfg` in `strategy`'s scope: encoder, decoder and discriminator
    in the dtype policy of `training_precision(cfg.combo.vae_precision)`, the DGMM in float32."""
    with strategy.scope():
        return build_combo_vae(cfg.combo, cfg.image_shape, cfg.num_classes, seed=seed,
                               policy=training_precision(cfg.combo.vae_precision))


def combo_vae_metrics(
    classifier: keras.Model, model: ComboVAE, x: np.ndarray, y: np.ndarray, batch_size: int = 512
) -> dict:
    """DGMM accuracy, reconstruction MSE and reconstruction label agreement on (x, y)."""

    @tf.function(autograph=False, reduce_retracing=True)
    def figures(xb):
        out = model(xb)
        rec = out["reconstruction"]
        return (tf.argmax(model.dgmm.class_logits(out["zu"]), axis=-1),
                tf.reduce_mean(tf.square(rec - xb), axis=[1, 2, 3]),
                tf.equal(tf.argmax(classifier(rec), -1), tf.argmax(classifier(xb), -1)))

    parts = [[t.numpy() for t in figures(tf.constant(x[i : i + batch_size]))]
             for i in range(0, len(x), batch_size)]
    dgmm_pred, mse, agree = (np.concatenate(p) for p in zip(*parts, strict=True))
    return {
        "dgmm_test_accuracy": float(np.mean(dgmm_pred == y)),
        "recon_mse": float(np.mean(mse)),
        "recon_label_agreement": float(np.mean(agree)),
    }
