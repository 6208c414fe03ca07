"""Loss functions for FM-Defense ("Defending Adversarial Attacks via Semantic
Feature Manipulation"), written as pure TensorFlow functions.

The style follows ``disentanglement_lib/methods/unsupervised/vae.py``: every
function is stateless, takes and returns ``tf.float32`` tensors, and documents
the tensor shapes it expects.

Notation (paper §III-B and §III-D):

* ``B``  -- batch size (may be unknown inside ``tf.function``).
* ``D``  -- dimensionality of the disentangled code ``z`` (``z_s``) produced by
    the combo-VAE encoder ``q_phi(z|x) = N(mean, diag(exp(log_var)))``.
* ``K``  -- dimensionality of the class-unique code ``z_u`` produced by the DGMM.
* ``C``  -- number of classes; the DGMM prior over ``z_u`` is the Gaussian
    mixture ``p(z_u) = sum_c N(z_u; mu_c, Sigma_c) p(c)`` with uniform
    ``p(c) = 1/C`` and diagonal ``Sigma_c = diag(exp(log_var_c))`` (Eq. 9).
* ``D_tc`` -- the total-correlation discriminator (FactorVAE); it outputs one
    logit ``l`` per sample and ``D(z) = sigmoid(l)``, so that
    ``log D(z) / (1 - D(z)) = l`` (Eq. 6).

Combo-VAE objective (Eq. 8), to be minimised:
``L_R + L_KL + gamma * L_TC`` with ``L_R = reconstruction_loss``,
``L_KL = gaussian_kl`` and ``L_TC = total_correlation_estimate``.
DGMM objective (Eq. 12): ``L_GM = L_cls + lambda_lkd * L_lkd`` (Eq. 10, 11).
"""

import math

import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions

_LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_density(samples, mean, log_var):
    """Elementwise log density of a diagonal Gaussian.

    log N(samples; mean, exp(log_var))
        = -0.5 * (log(2 pi) + log_var + (samples - mean)^2 * exp(-log_var)).

    Args:
        samples: Tensor, e.g. [B, D].
        mean: Tensor broadcastable with `samples`, e.g. [B, D].
        log_var: Tensor broadcastable with `samples`, e.g. [B, D].

    Returns:
        Tensor of the broadcast shape (e.g. [B, D]) with per-element log densities.
    """
    samples = tf.convert_to_tensor(samples, tf.float32)
    mean = tf.convert_to_tensor(mean, tf.float32)
    log_var = tf.convert_to_tensor(log_var, tf.float32)
    inv_var = tf.exp(-log_var)
    tmp = samples - mean
    return -0.5 * (tmp * tmp * inv_var + log_var + _LOG_2PI)


def gaussian_kl(mean, log_var):
    """KL(N(mean, diag(exp(log_var))) || N(0, I)), the L_KL term of Eq. 8.

    Per dimension: 0.5 * (mean^2 + exp(log_var) - log_var - 1), summed over the
    last axis.

    Args:
        mean: [B, D] encoder means.
        log_var: [B, D] encoder log variances.

    Returns:
        [B] KL divergence per sample.
    """
    return tf.reduce_sum(gaussian_kl_per_dim(mean, log_var), axis=-1)


def gaussian_kl_per_dim(mean, log_var):
    """KL(N(mean_i, exp(log_var_i)) || N(0, 1)) of each dimension: [B, D] terms of `gaussian_kl`,
    0.5 * (mean^2 + exp(log_var) - log_var - 1) (a code's share of L_KL)."""
    mean = tf.convert_to_tensor(mean, tf.float32)
    log_var = tf.convert_to_tensor(log_var, tf.float32)
    return 0.5 * (tf.square(mean) + tf.exp(log_var) - log_var - 1.0)


def code_kl(mean, log_var, num_codes: int):
    """KL of each code, [B, num_codes]: the sum of `gaussian_kl_per_dim` over a code's
    dimensions, for latents [B, P·num_codes] flattened channel-last (dimension p·C + c belongs to
    code c; a feature map of P = h·w positions per channel). With P = 1 (a vector latent, one
    dimension per code) it is `gaussian_kl_per_dim`."""
    per_dim = gaussian_kl_per_dim(mean, log_var)
    if mean.shape[-1] == num_codes:
        return per_dim
    return tf.reduce_sum(tf.reshape(per_dim, [tf.shape(per_dim)[0], -1, num_codes]), axis=1)


def free_bits_kl(mean, log_var, free_bits, num_codes: int | None = None):
    """L_KL with a floor of `free_bits` nats per code (Kingma et al. 2016, "free bits"):

        sum_c max(lambda, E_batch[KL_c]),   KL_c = sum_{p} KL_{p·C + c},
        KL_d = 0.5 * (mean_d^2 + exp(log_var_d) - log_var_d - 1)

    A code whose batch-mean KL is below lambda costs lambda and gets no gradient from the KL
    term, so the reconstruction can put up to lambda nats into every code instead of letting
    some collapse onto the prior. With lambda = 0 it equals mean_B(gaussian_kl).

    Args:
        mean: [B, D] encoder means.
        log_var: [B, D] encoder log variances.
        free_bits: lambda >= 0, nats per code.
        num_codes: C; None (or D) is one code per dimension (a vector latent). For a feature
            map of C channels with P positions each, flattened channel-last (D = P·C), a
            channel is one latent factor and gets lambda nats in all, not lambda per position
            (`code_kl`).

    Returns:
        [] scalar.
    """
    num_codes = mean.shape[-1] if num_codes is None else num_codes
    per_code = tf.reduce_mean(code_kl(mean, log_var, num_codes), axis=0)
    return tf.reduce_sum(tf.maximum(per_code, tf.cast(free_bits, tf.float32)))


def reconstruction_loss(x, x_hat):
    """Squared L2 reconstruction error L_R of Eq. 8 ("l2 loss").

    Args:
        x: [B, ...] original instances.
        x_hat: [B, ...] reconstructions, same shape as `x`.

    Returns:
        [B] sum over all non-batch axes of (x - x_hat)^2.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    x_hat = tf.convert_to_tensor(x_hat, tf.float32)
    sq = tf.square(x - x_hat)
    batch = tf.shape(sq)[0]
    return tf.reduce_sum(tf.reshape(sq, [batch, -1]), axis=1)


def label_consistency_loss(target_logits, logits):
    """KL(p || q) between the classifier's class distributions on x (p) and on x_hat (q).

    Not in the paper: an optional decoder term (``ComboVAEConfig.consistency_weight``). The
    detector compares morph labels with the input's label, so reconstructions must keep the
    classifier's label; this term asks the decoder for exactly that. ``target_logits`` is
    treated as a constant.

    KL(p || q) = sum_c p_c (log p_c - log q_c), with p = softmax(target_logits),
    q = softmax(logits).

    Args:
        target_logits: [B, C] classifier logits on the original images.
        logits: [B, C] classifier logits on the reconstructions.

    Returns:
        [B] KL divergence per sample (nats).
    """
    target_logits = tf.stop_gradient(tf.convert_to_tensor(target_logits, tf.float32))
    logits = tf.convert_to_tensor(logits, tf.float32)
    log_p = tf.nn.log_softmax(target_logits, axis=-1)
    log_q = tf.nn.log_softmax(logits, axis=-1)
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


def latent_cycle_loss(codes, recovered):
    """Squared error between the class-shared codes a reconstruction was decoded from and the
    codes the encoder reads back from it.

    Not in the paper: an optional decoder term (``ComboVAEConfig.latent_cycle_weight``), the
    Gaussian form of InfoGAN's mutual-information bound (Chen et al. 2016) with unit variance.
    A code the decoder ignores cannot be read back from its output, so this term asks the
    decoder to make every code visible in the image: the detector morphs each code and needs
    every morph to change the image. ``codes`` is treated as a constant.

        L_cyc = sum_c (mu_c(D(z_s, z_u)) - z_c)^2

    Args:
        codes: [B, C] code values z_c the decoder was given.
        recovered: [B, C] code values mu_c the encoder gives its output.

    Returns:
        [B] sum over codes of the squared error.
    """
    codes = tf.stop_gradient(tf.convert_to_tensor(codes, tf.float32))
    recovered = tf.convert_to_tensor(recovered, tf.float32)
    return tf.reduce_sum(tf.square(recovered - codes), axis=-1)


# The shift of one class-shared code in `code_use_loss`, in prior standard deviations: about
# the distance from a code's mean to the ends of its normal range.
CODE_USE_SHIFT = 2.0


def code_use_loss(decoded, shifted, margin):
    """Hinge on how much a shift of one class-shared code changes the decoded image.

    Not in the paper: an optional decoder term (``ComboVAEConfig.code_use_weight``). The
    detector morphs each code and needs every morph to change the image; a code the decoder
    ignores gives morphs equal to the reconstruction. Unlike `latent_cycle_loss` it asks
    nothing of the encoder, so it has a gradient even for a code the encoder does not read
    back. With x = D(z_s, z_u) and x' = D(z_s + δ·s·e_c, z_u) for one code c and sign s,

        L_use = P · max(0, τ − (1/P) sum_p |x'_p − x_p|)

    over the P values of an image (the scale of L_R, a sum over them); 0 once the shift
    moves the image by τ on average.

    Args:
        decoded: [B, ...] decoded images of the codes.
        shifted: [B, ...] decoded images of the same codes with one code shifted.
        margin: τ, mean absolute change per value (`ComboVAEConfig.code_use_margin`).

    Returns:
        [B] the hinge per image.
    """
    decoded = tf.convert_to_tensor(decoded, tf.float32)
    shifted = tf.convert_to_tensor(shifted, tf.float32)
    change = tf.abs(tf.reshape(shifted - decoded, [tf.shape(decoded)[0], -1]))
    size = tf.cast(tf.shape(change)[1], tf.float32)
    return size * tf.nn.relu(tf.cast(margin, tf.float32) - tf.reduce_mean(change, axis=1))


def permute_dims(z, seed):
    """Permutes each latent dimension independently across the batch.

    This is `permute_dims` of FactorVAE (Kim & Mnih, 2018, Alg. 2), used in
    §III-B to draw samples of q_bar(z) = prod_j q(z_j) from samples of q(z).
    Uses stateless random ops, so the result is a deterministic function of
    (`z`, `seed`); works with an unknown batch size inside tf.function.

    Args:
        z: [B, D] latent codes.
        seed: shape-[2] integer tensor, seed for `tf.random.stateless_uniform`.

    Returns:
        [B, D] tensor whose column d is a permutation of z[:, d], the
        permutations being independent across columns.
    """
    z = tf.convert_to_tensor(z, tf.float32)
    noise = tf.random.stateless_uniform(tf.shape(z), seed=seed)
    perm = tf.argsort(noise, axis=0)  # [B, D]; column d is a permutation of 0..B-1
    # out[i, d] = z[perm[i, d], d]: gather along the batch axis per dimension.
    out_t = tf.gather(tf.transpose(z), tf.transpose(perm), batch_dims=1)  # [D, B]
    return tf.transpose(out_t)


def tc_discriminator_loss(logits_real, logits_permuted):
    """Loss of the TC discriminator D_tc (§III-B).

    L_D = -1/(2|B|) [sum_i log D(z_i) + sum_i log(1 - D(permute_dims(z)_i))]
    with D = sigmoid(logit). Computed stably as
    0.5 * (mean softplus(-logits_real) + mean softplus(logits_permuted)),
    since -log sigmoid(l) = softplus(-l) and -log(1 - sigmoid(l)) = softplus(l).

    Args:
        logits_real: [B] or [B, 1] discriminator logits on samples of q(z).
        logits_permuted: [B'] or [B', 1] logits on permuted samples (q_bar(z)).

    Returns:
        Scalar loss.
    """
    logits_real = tf.reshape(tf.convert_to_tensor(logits_real, tf.float32), [-1])
    logits_permuted = tf.reshape(tf.convert_to_tensor(logits_permuted, tf.float32), [-1])
    loss_real = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.ones_like(logits_real), logits=logits_real
    )
    loss_perm = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.zeros_like(logits_permuted), logits=logits_permuted
    )
    return 0.5 * (tf.reduce_mean(loss_real) + tf.reduce_mean(loss_perm))


def total_correlation_estimate(logits_real):
    """Density-ratio estimate of the total correlation, L_TC (Eq. 6).

    TC(z) ~= E_q(z)[log D(z) / (1 - D(z))] = E_q(z)[logit(z)], because for
    D = sigmoid(l) the log-odds log(D / (1 - D)) equal l.

    Args:
        logits_real: [B] or [B, 1] discriminator logits on samples of q(z).

    Returns:
        Scalar TC estimate (mean logit).
    """
    logits_real = tf.convert_to_tensor(logits_real, tf.float32)
    return tf.reduce_mean(logits_real)


def _gm_components(means, log_vars):
    """Batch of C diagonal Gaussians N(mu_c, diag(exp(log_var_c))); batch shape [C]."""
    means = tf.convert_to_tensor(means, tf.float32)
    log_vars = tf.convert_to_tensor(log_vars, tf.float32)
    return tfd.MultivariateNormalDiag(loc=means, scale_diag=tf.exp(0.5 * log_vars))


def _log_uniform_prior(means):
    """log(1/C) as a float32 scalar, C = number of rows of `means`."""
    num_classes = tf.cast(tf.shape(means)[0], tf.float32)
    return -tf.math.log(num_classes)


def gm_log_prob(zu, means, log_vars):
    """Per-class component log densities of the Gaussian mixture (Eq. 9).

    Args:
        zu: [B, K] class-unique codes.
        means: [C, K] class means mu_c.
        log_vars: [C, K] log of the diagonal of Sigma_c.

    Returns:
        [B, C] with entry (b, c) = log N(zu_b; mu_c, diag(exp(log_var_c)))
        = -1/2 sum_k [(zu_bk - mu_ck)^2 exp(-log_var_ck) + log_var_ck + log 2 pi], the
        `log_prob` of `tfd.MultivariateNormalDiag` written out: a defense graph computes it on
        every call and traces it on every new input shape, and the distribution objects took
        4x as long to trace as these few ops.
    """
    zu = tf.convert_to_tensor(zu, tf.float32)
    means = tf.convert_to_tensor(means, tf.float32)
    log_vars = tf.convert_to_tensor(log_vars, tf.float32)
    diff = zu[:, None, :] - means[None]  # [B, C, K]
    per_dim = diff * diff * tf.exp(-log_vars)[None] + log_vars[None] + math.log(2.0 * math.pi)
    return -0.5 * tf.reduce_sum(per_dim, axis=-1)


def gm_class_logits(zu, means, log_vars):
    """Unnormalised class log posteriors log q(c|zu) (Eq. 10), uniform p(c).

    logit_c = log N(zu; mu_c, Sigma_c) + log(1/C); softmax over c gives
    q(c|zu) = N(zu; mu_c, Sigma_c) p(c) / sum_k N(zu; mu_k, Sigma_k) p(k).

    Args:
        zu: [B, K] class-unique codes.
        means: [C, K] class means.
        log_vars: [C, K] class log variances.

    Returns:
        [B, C] logits.
    """
    means = tf.convert_to_tensor(means, tf.float32)
    return gm_log_prob(zu, means, log_vars) + _log_uniform_prior(means)


def gm_mixture_log_prob(zu, means, log_vars):
    """Log density of the Gaussian-mixture prior p(zu) (Eq. 9), p(c) = 1/C.

    log p(zu) = logsumexp_c(log N(zu; mu_c, Sigma_c) + log(1/C)).

    Args:
        zu: [B, K] class-unique codes.
        means: [C, K] class means.
        log_vars: [C, K] class log variances.

    Returns:
        [B] log p(zu).
    """
    zu = tf.convert_to_tensor(zu, tf.float32)
    means = tf.convert_to_tensor(means, tf.float32)
    mixture = tfd.MixtureSameFamily(
        mixture_distribution=tfd.Categorical(logits=tf.zeros(tf.shape(means)[:1], tf.float32)),
        components_distribution=_gm_components(means, log_vars),
    )
    return mixture.log_prob(zu)


def dgmm_cls_loss(zu, labels, means, log_vars):
    """Classification loss L_cls of the DGMM (Eq. 10).

    L_cls = mean_b[-log q(y_b | zu_b)], the softmax cross-entropy of the
    Gaussian-mixture class logits against the true labels.

    Args:
        zu: [B, K] class-unique codes.
        labels: [B] integer class labels in [0, C).
        means: [C, K] class means.
        log_vars: [C, K] class log variances.

    Returns:
        Scalar loss.
    """
    logits = gm_class_logits(zu, means, log_vars)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    )


def dgmm_lkd_loss(zu, labels, means, log_vars):
    """Likelihood regulariser L_lkd of the DGMM (Eq. 11).

    L_lkd = mean_b[-log N(zu_b; mu_{y_b}, Sigma_{y_b})].

    Args:
        zu: [B, K] class-unique codes.
        labels: [B] integer class labels in [0, C).
        means: [C, K] class means.
        log_vars: [C, K] class log variances.

    Returns:
        Scalar loss.
    """
    log_probs = gm_log_prob(zu, means, log_vars)  # [B, C]
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    own = tf.gather(log_probs, labels, axis=1, batch_dims=1)  # [B]
    return -tf.reduce_mean(own)


def dgmm_loss(zu, labels, means, log_vars, lambda_lkd=0.1):
    """Total DGMM loss L_GM = L_cls + lambda_lkd * L_lkd (Eq. 12).

    Args:
        zu: [B, K] class-unique codes.
        labels: [B] integer class labels in [0, C).
        means: [C, K] class means.
        log_vars: [C, K] class log variances.
        lambda_lkd: non-negative weight of the likelihood regulariser.

    Returns:
        Scalar loss.
    """
    return dgmm_cls_loss(zu, labels, means, log_vars) + lambda_lkd * dgmm_lkd_loss(
        zu, labels, means, log_vars
    )


def trades_loss(logits, logits_adv, labels, beta):
    """TRADES objective per sample (Zhang et al., 2019, Eq. 5 with the KL surrogate).

    L = CE(y, f(x)) + β · KL(p(x) || p(x')), with p = softmax(f(·)) and x' the adversarial
    image that maximises the KL term inside the ε-ball. β trades natural accuracy (β → 0 is
    plain cross-entropy) for robustness; the gradient flows through both p(x) and p(x').

    Args:
        logits: [B, C] classifier logits on the clean images.
        logits_adv: [B, C] logits on the adversarial images.
        labels: [B] integer labels in [0, C).
        beta: non-negative weight of the robustness term.

    Returns:
        [B] loss per sample (nats).
    """
    logits = tf.convert_to_tensor(logits, tf.float32)
    logits_adv = tf.convert_to_tensor(logits_adv, tf.float32)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    log_p = tf.nn.log_softmax(logits, axis=-1)
    log_q = tf.nn.log_softmax(logits_adv, axis=-1)
    return ce + beta * tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)
