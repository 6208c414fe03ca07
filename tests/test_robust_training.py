"""Adversarial training of the classifier: `losses.trades_loss`, `RobustTrainer` (PGD-AT and
TRADES) and the `--classifier-training` option of scripts/train.py."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_case import FmdTestCase

from fmd_tf import losses
from fmd_tf.models import Classifier, RobustTrainer


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_trades_loss_closed_form():
    rng = np.random.default_rng(0)
    logits, logits_adv = rng.normal(size=(2, 5, 4)).astype(np.float32)
    labels = np.array([0, 3, 1, 2, 2])
    p, q = _softmax(logits), _softmax(logits_adv)
    ce = -np.log(p[np.arange(5), labels])
    kl = np.sum(p * (np.log(p) - np.log(q)), axis=-1)
    np.testing.assert_allclose(losses.trades_loss(logits, logits_adv, labels, 0.0), ce,
                               rtol=1e-5)
    np.testing.assert_allclose(losses.trades_loss(logits, logits_adv, labels, 6.0),
                               ce + 6.0 * kl, rtol=1e-5)
    np.testing.assert_allclose(losses.trades_loss(logits, logits, labels, 6.0), ce, rtol=1e-5)


def _digits():
    """(x [N, 8, 8, 1] in [0, 1], y [N]) of scikit-learn's real 8x8 digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images[..., None] / 16.0).astype(np.float32), d.target.astype(np.int64)


def _classifier(seed=0):
    keras.utils.set_random_seed(seed)
    clf = Classifier(conv_filters=(16, 16), dense_units=(64,), dropout=0.0, name="clf")
    clf.build((None, 8, 8, 1))
    return clf


def _pgd_accuracy(clf, x, y, eps=0.1, steps=20):
    """Accuracy of `clf` under an independent L∞ PGD (fmd_tf.attacks.pgd)."""
    from fmd_tf.attacks import pgd

    keras.utils.set_random_seed(1)
    x_adv = pgd(clf, x, eps=eps, eps_iter=2.5 * eps / steps, nb_iter=steps, y=y)
    return float(np.mean(np.argmax(clf.predict(x_adv, verbose=0), -1) == y))


@pytest.mark.parametrize("method", ["pgd_at", "trades"])
def test_perturb_stays_in_the_ball_and_raises_its_objective(method):
    x, y = _digits()
    x, y = x[:64], y[:64]
    clf = _classifier()
    trainer = RobustTrainer(clf, method, eps=0.1, steps=5)
    x_adv = trainer.perturb(x, y, tf.constant([3, 4])).numpy()
    assert x_adv.dtype == np.float32 and x_adv.shape == x.shape
    assert np.max(np.abs(x_adv - x)) <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    clean, adv = (clf(t).numpy() for t in (x, x_adv))
    if method == "pgd_at":
        value = [np.mean(-np.log(_softmax(z)[np.arange(64), y])) for z in (clean, adv)]
        assert value[1] > value[0] + 0.05, value
    else:
        p, q = _softmax(clean), _softmax(adv)
        kl = np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
        noise = np.clip(x + np.random.default_rng(0).uniform(-0.1, 0.1, x.shape), 0, 1)
        q_noise = _softmax(clf(noise.astype(np.float32)).numpy())
        kl_noise = np.mean(np.sum(p * (np.log(p) - np.log(q_noise)), -1))
        assert kl > 3 * kl_noise, (kl, kl_noise)
    with pytest.raises(ValueError, match="method"):
        RobustTrainer(clf, "fgsm_at")
    with pytest.raises(ValueError, match="eps"):
        RobustTrainer(clf, method, eps=0.0)


def _trained_on_digits(method, eps=0.15):
    """(clean, PGD-ε) test accuracy of a classifier trained by `method` for 30 epochs on the
    first 1,200 of scikit-learn's real 8x8 digits, tested on the other 597."""
    from fmd_tf import training
    from fmd_tf.config import get_config
    from fmd_tf.pipeline import experiment_config

    x, y = _digits()
    x_train, y_train, x_test, y_test = x[:1200], y[:1200], x[1200:], y[1200:]
    base = experiment_config((8, 8, 1), 10, "full", "digits", get_config("fmnist"))
    cfg = dataclasses.replace(base, classifier=dataclasses.replace(
        base.classifier, training=method, epochs=30, batch_size=64, adversarial_eps=eps,
        adversarial_steps=5, precision="float32", conv_filters=(16, 16), dense_units=(64,),
        dropout=0.0))
    keras.utils.set_random_seed(0)
    clf = training.train_classifier(cfg, x_train, y_train, training.get_strategy("default"),
                                    verbose=0)
    assert isinstance(clf, Classifier)  # the trainer is not what is returned
    return training.accuracy(clf, x_test, y_test), _pgd_accuracy(clf, x_test, y_test, eps)


@pytest.mark.parametrize("method", ["pgd_at", pytest.param("trades", marks=pytest.mark.slow)])
def test_adversarial_training_makes_the_classifier_robust(method):
    """Measured: standard 0.91 clean / 0.23 under PGD ε 0.15; PGD-AT 0.90 / 0.50; TRADES
    0.91 / 0.58."""
    standard = _trained_on_digits("standard")
    clean, robust = _trained_on_digits(method)
    assert clean > 0.85 and standard[0] > 0.85, (clean, standard)
    assert robust > standard[1] + 0.15, (robust, standard)


def test_training_starts_from_the_init_classifier(tmp_path):
    """`ClassifierConfig.init`: the weights of a saved classifier start the training (at a
    learning rate of ~0 they are what comes out); another architecture or a missing file is a
    ValueError that says so."""
    from fmd_tf import training
    from fmd_tf.config import get_config
    from fmd_tf.pipeline import experiment_config

    x, y = _digits()
    saved = _classifier(seed=5)
    saved.save(tmp_path / "start.keras")
    base = experiment_config((8, 8, 1), 10, "full", "digits", get_config("fmnist"))

    def config(**changes):
        fields = dict(epochs=1, batch_size=64, precision="float32", conv_filters=(16, 16),
                      dense_units=(64,), dropout=0.0)
        return dataclasses.replace(base, classifier=dataclasses.replace(
            base.classifier, **{**fields, **changes}))

    strategy = training.get_strategy("default")
    keras.utils.set_random_seed(0)
    for method in ("standard", "trades"):
        clf = training.train_classifier(
            config(init=str(tmp_path / "start.keras"), learning_rate=1e-12, training=method,
                   adversarial_steps=1), x[:128], y[:128], strategy, verbose=0)
        for a, b in zip(clf.get_weights(), saved.get_weights(), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)
    fresh = training.train_classifier(config(learning_rate=1e-12), x[:128], y[:128], strategy,
                                      verbose=0)
    assert max(np.max(np.abs(a - b)) for a, b in
               zip(fresh.get_weights(), saved.get_weights(), strict=True)) > 0.01
    with pytest.raises(ValueError, match="same architecture"):
        training.train_classifier(config(init=str(tmp_path / "start.keras"),
                                         dense_units=(32,)), x[:64], y[:64], strategy, verbose=0)
    with pytest.raises(ValueError, match="is not a file"):
        training.train_classifier(config(init=str(tmp_path / "none.keras")), x[:64], y[:64],
                                  strategy, verbose=0)


def test_robust_trainer_reports_metrics_in_mixed_precision_and_under_a_strategy():
    from fmd_tf import training

    x, y = _digits()
    with training.dtype_policy("mixed_bfloat16"):
        clf = _classifier()
    for method in ("pgd_at", "trades"):
        with tf.distribute.get_strategy().scope():
            trainer = RobustTrainer(clf, method, steps=2)
            trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
        before = [w.numpy().copy() for w in clf.trainable_weights]
        history = training._fit(trainer, x[:128], y[:128], 32, 1, 0, []).history
        assert set(history) == {"loss", "accuracy", "adv_accuracy"}
        assert all(np.isfinite(v[-1]) for v in history.values())
        assert any(not np.array_equal(a, b.numpy()) for a, b in
                   zip(before, clf.trainable_weights, strict=True))
        assert trainer.optimizer.iterations.numpy() == 4


class RobustTrainerConfigTest(FmdTestCase):
    def test_config_round_trip(self):
        trainer = RobustTrainer(_classifier(), "trades", eps=0.2, steps=3, beta=2.0, seed=4)
        config = trainer.get_config()
        again = RobustTrainer.from_config(config)
        self.assertEqual((again.method, again.eps, again.steps, again.beta, again.seed),
                         ("trades", 0.2, 3, 2.0, 4))
        self.assertAlmostEqual(again.step_size, 2.5 * 0.2 / 3)


def test_train_cli_takes_the_classifier_training_options():
    from test_case import script_module

    train = script_module("scripts/train.py")
    args = train.parse_args(["--quick", "--classifier-training", "trades",
                             "--classifier-trades-beta", "2", "--out", "/nonexistent"])
    cfg = train._config(args, (28, 28, 1), 10, 60000, 10000)
    assert (cfg.classifier.training, cfg.classifier.trades_beta) == ("trades", 2.0)
    assert cfg.classifier.adversarial_eps == 0.1
    with pytest.raises(SystemExit):
        train.parse_args(["--classifier-training", "fgsm"])


@pytest.mark.parametrize("training", ["pgd_at", "trades"])
def test_adversarial_training_takes_the_robust_recipe_unless_given(training):
    from test_case import script_module

    from fmd_tf.config import ADVERSARIAL_TRAINING_DEFAULTS, ClassifierConfig

    train = script_module("scripts/train.py")
    standard = ClassifierConfig()

    def classifier(*flags):
        args = train.parse_args(["--dataset", "fmnist", "--out", "/nonexistent", *flags])
        return train._config(args, (28, 28, 1), 10, 60000, 10000).classifier

    robust = classifier("--classifier-training", training)
    recipe = {name: getattr(robust, name) for name in ADVERSARIAL_TRAINING_DEFAULTS}
    assert recipe == ADVERSARIAL_TRAINING_DEFAULTS
    assert recipe != {name: getattr(standard, name) for name in ADVERSARIAL_TRAINING_DEFAULTS}
    given = classifier("--classifier-training", training, "--classifier-dropout", "0.25",
                       "--classifier-epochs", "7")
    assert (given.dropout, given.epochs) == (0.25, 7)
    assert classifier("--classifier-training", training, "--epochs", "4").epochs == 4
    plain = classifier("--classifier-training", "standard")
    assert (plain.dropout, plain.epochs) == (standard.dropout, standard.epochs)


def test_with_classifier_training_refuses_an_unknown_training():
    from fmd_tf.config import get_config
    from fmd_tf.pipeline import with_classifier_training

    with pytest.raises(ValueError, match="pgd_at"):
        with_classifier_training(get_config("fmnist"), "fgsm")


def test_train_cli_defaults_to_the_robust_operating_point_for_a_robust_classifier(tmp_path):
    """--operating-point defaults to "robust" for a classifier this run or OUT's card trained
    with pgd_at / trades, to "auto" otherwise (and for a user's own --classifier); a given
    value is kept. The robust rule attacks at the classifier's training radius: this run's, the
    card's, or --classifier-adversarial-eps when given."""
    import json

    from test_case import script_module

    train = script_module("scripts/train.py")

    def point(*flags):
        args = train.parse_args(["--dataset", "fmnist", "--out", str(tmp_path), *flags])
        return train._operating_point(args, train._config(args, (28, 28, 1), 10, 60000, 10000))

    assert point() == ("auto", 0.1) and point("--classifier-training", "trades") == ("robust", 0.1)
    assert point("--classifier-training", "pgd_at", "--operating-point", "auto")[0] == "auto"
    assert point("--classifier-training", "trades", "--classifier-adversarial-eps", "0.2") == (
        "robust", 0.2)
    defense = ("--stages", "defense")
    assert point(*defense) == ("auto", 0.1)  # no card
    card, mine = tmp_path / "model_card.json", tmp_path / "mine.keras"
    mine.touch()
    for training, expected in (("trades", "robust"), ("pgd_at", "robust"), ("standard", "auto")):
        card.write_text(json.dumps({"hyperparameters": {"classifier": {
            "training": training, "adversarial_eps": 0.15}}}))
        assert point(*defense) == (expected, 0.15)
        assert point(*defense, "--classifier-adversarial-eps", "0.05") == (expected, 0.05)
        assert point(*defense, "--classifier", str(mine)) == ("auto", 0.1)
    mine_robust = point(*defense, "--classifier", str(mine), "--operating-point", "robust",
                        "--classifier-adversarial-eps", "0.3")
    assert mine_robust == ("robust", 0.3)
    card.write_text(json.dumps({"hyperparameters": {"classifier": {"training": "trades"}}}))
    assert point(*defense) == ("robust", 0.1)  # a card without the radius: the option's
    card.write_text(json.dumps({"hyperparameters": {"classifier": ["trades"]}}))
    with pytest.raises(train.UsageError, match="model_card.json: cannot read the classifier"):
        point(*defense)
    with pytest.raises(train.UsageError, match="model_card.json: cannot read the classifier"):
        point(*defense, "--operating-point", "robust")
    # A card that cannot decide anything is not read: a given point other than robust, or
    # robust with its radius given.
    assert point(*defense, "--operating-point", "auto") == ("auto", 0.1)
    assert point(*defense, "--operating-point", "robust", "--classifier-adversarial-eps",
                 "0.2") == ("robust", 0.2)
