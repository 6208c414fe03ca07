"""Tests for fmd_tf.losses (FM-Defense loss functions, Eq. 6-12)."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from fmd_tf import losses

LOG_2PI = math.log(2.0 * math.pi)


def _np(t):
    return np.asarray(t)


def _np_logsumexp(a, axis):
    m = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def _np_gm_log_prob(zu, means, log_vars):
    """Numpy reference: [B, C] log N(zu_b; mu_c, diag exp(log_var_c))."""
    zu = zu[:, None, :].astype(np.float64)  # [B, 1, K]
    mu = means[None].astype(np.float64)  # [1, C, K]
    lv = log_vars[None].astype(np.float64)
    per_dim = -0.5 * (LOG_2PI + lv + (zu - mu) ** 2 / np.exp(lv))
    return per_dim.sum(-1)


# --------------------------------------------------------------------------- Gaussian helpers


def test_gaussian_log_density_closed_form():
    # log N(0; 0, 1) = -0.5 log(2 pi) ~= -0.9189.
    # log N(1; 0, 4) = -0.5 (log 2pi + log 4 + 1/4).
    # log N(3; 1, e^0) = -0.5 (log 2pi + 0 + 4) = -0.5 log 2pi - 2.
    samples = tf.constant([[0.0, 1.0, 3.0]])
    mean = tf.constant([[0.0, 0.0, 1.0]])
    log_var = tf.constant([[0.0, math.log(4.0), 0.0]])
    out = losses.gaussian_log_density(samples, mean, log_var)
    assert out.shape == (1, 3)
    assert out.dtype == tf.float32
    expected = [-0.5 * LOG_2PI, -0.5 * (LOG_2PI + math.log(4.0) + 0.25), -0.5 * LOG_2PI - 2.0]
    np.testing.assert_allclose(_np(out)[0], expected, rtol=1e-6)


def test_gaussian_log_density_broadcasts_and_matches_numpy():
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(5, 4)).astype(np.float32)
    mean = rng.normal(size=(4,)).astype(np.float32)  # broadcast over batch
    log_var = rng.normal(size=(5, 1)).astype(np.float32)  # broadcast over dims
    out = _np(losses.gaussian_log_density(samples, mean, log_var))
    assert out.shape == (5, 4)
    ref = -0.5 * (LOG_2PI + log_var + (samples - mean) ** 2 / np.exp(log_var))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_gaussian_kl_closed_form():
    # KL(N(m, s2) || N(0, 1)) per dim = 0.5 (m^2 + s2 - log s2 - 1).
    # Row 0: m = 1, s2 = 1 in 3 dims -> 3 * 0.5 * (1 + 1 - 0 - 1) = 1.5.
    # Row 1: standard normal -> 0.
    # Row 2: m = 0, s2 = 2 (1 dim) + m = 2, s2 = 1 (1 dim) + std (1 dim)
    #        -> 0.5 (2 - log 2 - 1) + 0.5 * 4 = 0.5 (1 - log 2) + 2.
    mean = tf.constant([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    log_var = tf.constant([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]])
    out = losses.gaussian_kl(mean, log_var)
    assert out.shape == (3,)
    assert out.dtype == tf.float32
    np.testing.assert_allclose(
        _np(out), [1.5, 0.0, 0.5 * (1 - math.log(2.0)) + 2.0], rtol=1e-6, atol=1e-7
    )
    per_dim = _np(losses.gaussian_kl_per_dim(mean, log_var))
    np.testing.assert_allclose(per_dim, [[0.5] * 3, [0.0] * 3,
                                         [0.5 * (1 - math.log(2.0)), 2.0, 0.0]], atol=1e-7)


def test_free_bits_kl_closed_form_and_gradient():
    # Same batch as test_gaussian_kl_closed_form: batch-mean KL per code is
    # (0.5 + 0 + 0.5 (1 - log 2)) / 3, (0.5 + 0 + 2) / 3 = 0.8333, 0.5 / 3 = 0.1667.
    mean = tf.Variable([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    log_var = tf.Variable([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]])
    per_code = [(1.0 - 0.5 * math.log(2.0)) / 3, 2.5 / 3, 0.5 / 3]
    # λ = 0: the plain batch-mean L_KL.
    np.testing.assert_allclose(_np(losses.free_bits_kl(mean, log_var, 0.0)),
                               np.mean(_np(losses.gaussian_kl(mean, log_var))), rtol=1e-6)
    # λ = 0.3: codes 0 and 2 are below the floor and cost 0.3 each.
    with tf.GradientTape() as tape:
        out = losses.free_bits_kl(mean, log_var, 0.3)
    np.testing.assert_allclose(_np(out), 0.3 + per_code[1] + 0.3, rtol=1e-6)
    # Only code 1 gets a gradient: d/d mean_b1 of mean_B 0.5 mean^2 = mean_b1 / B.
    grad = tape.gradient(out, mean).numpy()
    np.testing.assert_allclose(grad[:, [0, 2]], 0.0)
    np.testing.assert_allclose(grad[:, 1], [1 / 3, 0.0, 2 / 3], rtol=1e-6)
    # A floor above every code: D * λ.
    np.testing.assert_allclose(_np(losses.free_bits_kl(mean, log_var, 5.0)), 15.0)


def test_latent_cycle_loss_closed_form_and_gradient():
    codes = tf.Variable([[1.0, -2.0], [0.5, 0.5]])
    recovered = tf.Variable([[1.0, 0.0], [-0.5, 1.5]])
    with tf.GradientTape(persistent=True) as tape:
        out = losses.latent_cycle_loss(codes, recovered)
        total = tf.reduce_sum(out)
    np.testing.assert_allclose(_np(out), [4.0, 2.0], atol=1e-6)
    assert tape.gradient(total, codes) is None  # the decoded codes are the target
    np.testing.assert_allclose(tape.gradient(total, recovered).numpy(),
                               [[0.0, 4.0], [-2.0, 2.0]], atol=1e-6)


def test_code_use_loss_closed_form_and_gradient():
    # Images of 4 values, τ 0.02. Row 0: mean |change| 0.0075 < τ -> 4 * 0.0125 = 0.05.
    # Row 1: mean |change| 0.03 >= τ -> 0. Row 2: no change -> 4 * τ.
    decoded = tf.Variable(np.zeros((3, 2, 2, 1), np.float32))
    shifted = tf.Variable(np.array([[0.01, -0.01, 0.0, 0.01],
                                    [0.03, -0.03, 0.03, 0.03],
                                    [0.0, 0.0, 0.0, 0.0]], np.float32).reshape(3, 2, 2, 1))
    with tf.GradientTape() as tape:
        out = losses.code_use_loss(decoded, shifted, 0.02)
        total = tf.reduce_sum(out)
    np.testing.assert_allclose(_np(out), [0.05, 0.0, 0.08], atol=1e-6)
    # d/d shifted: -sign(change) per value in a row under the margin, 0 above it.
    grad = tape.gradient(total, shifted).numpy().reshape(3, 4)
    np.testing.assert_allclose(grad[0], [-1.0, 1.0, 0.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(grad[1], 0.0)
    np.testing.assert_allclose(_np(losses.code_use_loss(decoded, shifted, margin=0.5)),
                               [4 * 0.4925, 4 * 0.47, 2.0], rtol=1e-5)


def test_label_consistency_loss_closed_form():
    # Row 0: p = q -> 0.
    # Row 1: p = (0.75, 0.25), q = (0.5, 0.5) -> 0.75 log 1.5 + 0.25 log 0.5.
    # Row 2: logits shifted by a constant give the same softmax -> 0.
    target = tf.constant([[1.0, 2.0], [math.log(0.75), math.log(0.25)], [0.0, 1.0]])
    logits = tf.constant([[1.0, 2.0], [0.0, 0.0], [5.0, 6.0]])
    out = losses.label_consistency_loss(target, logits)
    assert out.shape == (3,)
    np.testing.assert_allclose(
        _np(out), [0.0, 0.75 * math.log(1.5) + 0.25 * math.log(0.5), 0.0], atol=1e-6
    )


def test_label_consistency_loss_gradient_reaches_logits_only():
    target = tf.Variable([[2.0, 0.0, -1.0]])
    logits = tf.Variable([[0.0, 1.0, 0.0]])
    with tf.GradientTape(persistent=True) as tape:
        loss = tf.reduce_sum(losses.label_consistency_loss(target, logits))
    assert tape.gradient(loss, target) is None
    # d KL / d logits = q - p.
    p = tf.nn.softmax(target).numpy()
    q = tf.nn.softmax(logits).numpy()
    np.testing.assert_allclose(tape.gradient(loss, logits).numpy(), q - p, atol=1e-6)


def test_gaussian_kl_is_nonnegative_and_matches_tfp():
    import tensorflow_probability as tfp

    tfd = tfp.distributions
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(6, 5)).astype(np.float32)
    log_var = rng.normal(size=(6, 5)).astype(np.float32)
    out = _np(losses.gaussian_kl(mean, log_var))
    ref = _np(
        tfd.kl_divergence(
            tfd.MultivariateNormalDiag(mean, tf.exp(0.5 * log_var)),
            tfd.MultivariateNormalDiag(tf.zeros(5), tf.ones(5)),
        )
    )
    assert np.all(out > 0)
    np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_reconstruction_loss_sums_over_non_batch_axes():
    # Image-shaped [B=2, 2, 2, 1]: sample 0 differs by 1 in all 4 pixels -> 4;
    # sample 1 differs by 3 in one pixel only -> 9.
    x = np.zeros((2, 2, 2, 1), np.float32)
    x_hat = np.zeros((2, 2, 2, 1), np.float32)
    x_hat[0] = 1.0
    x_hat[1, 0, 1, 0] = -3.0
    out = losses.reconstruction_loss(tf.constant(x), tf.constant(x_hat))
    assert out.shape == (2,)
    assert out.dtype == tf.float32
    np.testing.assert_allclose(_np(out), [4.0, 9.0])
    # Flat [B, D] inputs also work.
    np.testing.assert_allclose(
        _np(losses.reconstruction_loss(tf.constant([[1.0, 2.0]]), tf.constant([[0.0, 0.0]]))), [5.0]
    )


# --------------------------------------------------------------------------- permute_dims


def _column_index_codes(batch, dims):
    # Column d holds batch indices plus an offset, so each output entry tells where it came from.
    return tf.constant(np.arange(batch)[:, None] + 1000.0 * np.arange(dims)[None, :], tf.float32)


def test_permute_dims_keeps_each_column_multiset():
    z = tf.random.stateless_normal([64, 5], seed=[3, 4])
    out = _np(losses.permute_dims(z, tf.constant([1, 2])))
    assert out.shape == (64, 5)
    np.testing.assert_array_equal(np.sort(out, axis=0), np.sort(_np(z), axis=0))


def test_permute_dims_permutes_dims_independently():
    batch, dims = 64, 4
    z = _column_index_codes(batch, dims)
    out = _np(losses.permute_dims(z, tf.constant([5, 6])))
    src = out - 1000.0 * np.arange(dims)[None, :]  # source row of each entry
    # Entries stay in their own column.
    assert np.all((src >= 0) & (src < batch))
    # Each column is actually shuffled (identity has probability 1/64!).
    for d in range(dims):
        assert not np.array_equal(src[:, d], np.arange(batch))
    # Different columns use different permutations (otherwise it would only shuffle rows).
    for d in range(1, dims):
        assert not np.array_equal(src[:, 0], src[:, d])


def test_permute_dims_deterministic_per_seed():
    z = tf.random.stateless_normal([32, 3], seed=[7, 8])
    a = _np(losses.permute_dims(z, tf.constant([11, 12])))
    b = _np(losses.permute_dims(z, tf.constant([11, 12])))
    c = _np(losses.permute_dims(z, tf.constant([11, 13])))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_permute_dims_in_tf_function_with_unknown_batch():
    fn = tf.function(
        losses.permute_dims,
        input_signature=[tf.TensorSpec([None, 3], tf.float32), tf.TensorSpec([2], tf.int32)],
    )
    for batch in (5, 17):
        z = _column_index_codes(batch, 3)
        out = _np(fn(z, tf.constant([1, 1])))
        assert out.shape == (batch, 3)
        np.testing.assert_array_equal(np.sort(out, axis=0), _np(z))
        np.testing.assert_array_equal(out, _np(losses.permute_dims(z, tf.constant([1, 1]))))


# --------------------------------------------------------------------------- TC discriminator


def test_tc_discriminator_loss_is_log2_at_zero_logits():
    # D = sigmoid(0) = 1/2 everywhere -> -1/(2B) [B log 1/2 + B log 1/2] = log 2.
    for shape in ((8,), (8, 1)):
        out = losses.tc_discriminator_loss(tf.zeros(shape), tf.zeros(shape))
        assert out.shape == ()
        assert out.dtype == tf.float32
        np.testing.assert_allclose(float(out), math.log(2.0), rtol=1e-6)


def test_tc_discriminator_loss_matches_formula_and_is_stable():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(10, 1)).astype(np.float32) * 3
    b = rng.normal(size=(10,)).astype(np.float32) * 3
    d_real = 1.0 / (1.0 + np.exp(-a.astype(np.float64)))
    d_perm = 1.0 / (1.0 + np.exp(-b.astype(np.float64)))
    ref = -1.0 / 20.0 * (np.sum(np.log(d_real)) + np.sum(np.log(1.0 - d_perm)))
    np.testing.assert_allclose(float(losses.tc_discriminator_loss(a, b)), ref, rtol=1e-5)
    # Perfect discriminator -> ~0; totally wrong one with huge logits -> large but finite.
    good = float(losses.tc_discriminator_loss(tf.fill([4], 100.0), tf.fill([4], -100.0)))
    bad = float(losses.tc_discriminator_loss(tf.fill([4], -100.0), tf.fill([4], 100.0)))
    assert good < 1e-6
    np.testing.assert_allclose(bad, 100.0, rtol=1e-4)


def test_total_correlation_estimate_is_mean_log_odds():
    logits = np.array([[0.5], [-1.0], [2.5], [0.0]], np.float32)
    d = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    ref = np.mean(np.log(d / (1.0 - d)))  # = mean logit = 0.5
    out = losses.total_correlation_estimate(tf.constant(logits))
    assert out.shape == ()
    np.testing.assert_allclose(float(out), ref, rtol=1e-5)
    np.testing.assert_allclose(float(out), 0.5, rtol=1e-6)


def _train_tc_discriminator(rho, seed, steps=300, batch=256):
    """Trains a small MLP D_tc on 2-d Gaussian codes with correlation rho; returns (TC, loss)."""
    keras.utils.set_random_seed(seed)
    disc = keras.Sequential(
        [keras.Input((2,))]
        + [keras.layers.Dense(64, activation="relu") for _ in range(3)]
        + [keras.layers.Dense(1)]
    )
    opt = keras.optimizers.Adam(1e-3)
    chol = tf.constant([[1.0, 0.0], [rho, math.sqrt(1.0 - rho**2)]], tf.float32)

    @tf.function
    def step(s):
        eps = tf.random.stateless_normal([batch, 2], seed=tf.stack([s, seed]))
        z = tf.matmul(eps, chol, transpose_b=True)
        z_perm = losses.permute_dims(z, tf.stack([s, seed + 100]))
        with tf.GradientTape() as tape:
            loss = losses.tc_discriminator_loss(disc(z), disc(z_perm))
        grads = tape.gradient(loss, disc.trainable_variables)
        opt.apply_gradients(zip(grads, disc.trainable_variables, strict=True))
        return loss

    loss = None
    for s in range(steps):
        loss = step(tf.constant(s))
    eps = tf.random.stateless_normal([4096, 2], seed=[999, 7])
    z = tf.matmul(eps, chol, transpose_b=True)
    return float(losses.total_correlation_estimate(disc(z))), float(loss)


def test_tc_estimate_independent_vs_correlated_codes():
    # True TC of a bivariate Gaussian with correlation rho is -0.5 log(1 - rho^2):
    # rho = 0 -> 0, rho = 0.9 -> 0.830. Measured (3 seeds): indep |TC| <= 0.003,
    # corr 0.77-0.85, final D loss ~0.693 (indep) vs ~0.47 (corr).
    tc_indep, loss_indep = _train_tc_discriminator(0.0, seed=0)
    tc_corr, loss_corr = _train_tc_discriminator(0.9, seed=1)
    assert abs(tc_indep) < 0.1
    assert 0.55 < tc_corr < 1.15
    assert loss_indep > 0.66  # cannot beat chance (log 2 = 0.693)
    assert loss_corr < 0.6


# --------------------------------------------------------------------------- Gaussian mixture


@pytest.fixture
def gm_params():
    rng = np.random.default_rng(4)
    zu = rng.normal(size=(7, 3)).astype(np.float32)
    means = (2.0 * rng.normal(size=(4, 3))).astype(np.float32)
    log_vars = (0.5 * rng.normal(size=(4, 3))).astype(np.float32)
    labels = rng.integers(0, 4, size=7).astype(np.int32)
    return zu, labels, means, log_vars


def test_gm_log_prob_matches_numpy(gm_params):
    zu, _, means, log_vars = gm_params
    out = losses.gm_log_prob(zu, means, log_vars)
    assert out.shape == (7, 4)
    assert out.dtype == tf.float32
    np.testing.assert_allclose(_np(out), _np_gm_log_prob(zu, means, log_vars), rtol=1e-5, atol=1e-5)


def test_gm_log_prob_equals_tfp_multivariate_normal_diag(gm_params):
    import tensorflow_probability as tfp

    zu, _, means, log_vars = gm_params
    ref = tfp.distributions.MultivariateNormalDiag(means, tf.exp(0.5 * log_vars)).log_prob(
        zu[:, None, :])
    np.testing.assert_allclose(_np(losses.gm_log_prob(zu, means, log_vars)), _np(ref),
                               rtol=1e-5, atol=1e-5)


def test_gm_log_prob_closed_form():
    # zu = (1, 0) under N((1, 0), I) -> -log 2pi; under N((0, 0), diag(e^2, 1))
    # -> -log 2pi - 0.5 (2 + 1/e^2) (the log_var term contributes 2 in dim 0).
    out = _np(
        losses.gm_log_prob(
            tf.constant([[1.0, 0.0]]),
            tf.constant([[1.0, 0.0], [0.0, 0.0]]),
            tf.constant([[0.0, 0.0], [2.0, 0.0]]),
        )
    )
    np.testing.assert_allclose(
        out[0], [-LOG_2PI, -LOG_2PI - 0.5 * (2.0 + math.exp(-2.0))], rtol=1e-6
    )


def test_gm_class_logits_is_uniform_prior_posterior(gm_params):
    zu, _, means, log_vars = gm_params
    logits = _np(losses.gm_class_logits(zu, means, log_vars))
    ref_lp = _np_gm_log_prob(zu, means, log_vars)
    assert logits.shape == (7, 4)
    np.testing.assert_allclose(logits, ref_lp - math.log(4.0), rtol=1e-5, atol=1e-5)
    # Softmax of the logits is the Bayes posterior N_c / sum_k N_k (p(c) cancels).
    post = _np(tf.nn.softmax(logits, axis=-1))
    ref_post = np.exp(ref_lp - _np_logsumexp(ref_lp, axis=1)[:, None])
    np.testing.assert_allclose(post, ref_post, rtol=1e-4, atol=1e-6)


def test_gm_mixture_log_prob_matches_numpy(gm_params):
    zu, _, means, log_vars = gm_params
    out = losses.gm_mixture_log_prob(zu, means, log_vars)
    assert out.shape == (7,)
    assert out.dtype == tf.float32
    ref = _np_logsumexp(_np_gm_log_prob(zu, means, log_vars) - math.log(4.0), axis=1)
    np.testing.assert_allclose(_np(out), ref, rtol=1e-5, atol=1e-5)


def test_gm_mixture_of_identical_components_equals_single_component():
    # C identical components with p(c) = 1/C -> mixture density equals component density:
    # at zu = 0 with N(0, I_2): log p = -log 2pi.
    out = _np(losses.gm_mixture_log_prob(tf.zeros([2, 2]), tf.zeros([3, 2]), tf.zeros([3, 2])))
    np.testing.assert_allclose(out, [-LOG_2PI, -LOG_2PI], rtol=1e-6)


# --------------------------------------------------------------------------- DGMM losses

# Hand example: C = 2, K = 1, mu = (-1, +1), unit variances.
#   zu = 0, y = 0: equal densities -> q(0|zu) = 1/2 -> -log q = log 2;
#                  -log N(0; -1, 1) = 0.5 log 2pi + 0.5.
#   zu = 1, y = 1: log N(1; 1, 1) - log N(1; -1, 1) = 2 -> q(1|zu) = 1 / (1 + e^-2)
#                  -> -log q = log(1 + e^-2);  -log N(1; 1, 1) = 0.5 log 2pi.
HAND_ZU = np.array([[0.0], [1.0]], np.float32)
HAND_Y = np.array([0, 1], np.int32)
HAND_MU = np.array([[-1.0], [1.0]], np.float32)
HAND_LV = np.zeros((2, 1), np.float32)
HAND_CLS = 0.5 * (math.log(2.0) + math.log(1.0 + math.exp(-2.0)))
HAND_LKD = 0.5 * LOG_2PI + 0.25


def test_dgmm_cls_loss_hand_computed():
    out = losses.dgmm_cls_loss(HAND_ZU, HAND_Y, HAND_MU, HAND_LV)
    assert out.shape == ()
    assert out.dtype == tf.float32
    np.testing.assert_allclose(float(out), HAND_CLS, rtol=1e-6)
    # Wrong labels must cost more: zu = 1 labelled 0 -> -log q = log(1 + e^2).
    wrong = losses.dgmm_cls_loss(HAND_ZU, np.array([0, 0], np.int32), HAND_MU, HAND_LV)
    np.testing.assert_allclose(
        float(wrong), 0.5 * (math.log(2.0) + math.log(1 + math.e**2)), rtol=1e-6
    )


def test_dgmm_lkd_loss_hand_computed():
    out = losses.dgmm_lkd_loss(HAND_ZU, HAND_Y, HAND_MU, HAND_LV)
    assert out.shape == ()
    assert out.dtype == tf.float32
    np.testing.assert_allclose(float(out), HAND_LKD, rtol=1e-6)


def test_dgmm_losses_match_numpy_reference(gm_params):
    zu, labels, means, log_vars = gm_params
    lp = _np_gm_log_prob(zu, means, log_vars)
    own = lp[np.arange(len(labels)), labels]
    ref_cls = np.mean(_np_logsumexp(lp, axis=1) - own)
    ref_lkd = -np.mean(own)
    np.testing.assert_allclose(
        float(losses.dgmm_cls_loss(zu, labels, means, log_vars)), ref_cls, rtol=1e-5
    )
    np.testing.assert_allclose(
        float(losses.dgmm_lkd_loss(zu, labels, means, log_vars)), ref_lkd, rtol=1e-5
    )


def test_dgmm_loss_is_cls_plus_lambda_lkd(gm_params):
    np.testing.assert_allclose(
        float(losses.dgmm_loss(HAND_ZU, HAND_Y, HAND_MU, HAND_LV)),
        HAND_CLS + 0.1 * HAND_LKD,
        rtol=1e-6,
    )
    zu, labels, means, log_vars = gm_params
    cls = float(losses.dgmm_cls_loss(zu, labels, means, log_vars))
    lkd = float(losses.dgmm_lkd_loss(zu, labels, means, log_vars))
    for lam in (0.0, 0.1, 2.5):
        out = losses.dgmm_loss(zu, labels, means, log_vars, lambda_lkd=lam)
        assert out.dtype == tf.float32
        np.testing.assert_allclose(float(out), cls + lam * lkd, rtol=1e-5)


def test_dgmm_loss_gradients_reach_codes_and_gm_parameters(gm_params):
    zu, labels, means, log_vars = gm_params
    variables = [tf.Variable(zu), tf.Variable(means), tf.Variable(log_vars)]
    with tf.GradientTape() as tape:
        loss = losses.dgmm_loss(variables[0], labels, variables[1], variables[2])
    grads = tape.gradient(loss, variables)
    for g in grads:
        assert g is not None
        assert np.all(np.isfinite(_np(g)))
        assert np.any(np.abs(_np(g)) > 0)
