"""Adaptive morph budget: a sequential test that stops drawing morphs once r(i) vs θr(i) is clear.

The full-budget detector evaluates all N natural morphs of every (image, code) pair and compares
the resistance r = k_N / N (k_N morphs keep the label) with θr(i). Most pairs are far from their
threshold (clean images near r = 1, adversarial ones near r = 0), so the answer is usually clear
after a few morphs. Here each pair draws its morphs in rounds of R (`round_size`) from the same N
natural morphs as the full budget (same search table), in a fixed *draw order* (`draw_order`),
and stops as soon as one of these holds:

1. **Curtailment (exact).** The full-budget verdict is already fixed whatever the remaining
   morphs give: k > θ·N (surely above) or k + (N - n) <= θ·N (surely below).
2. **Exact binomial test, Bonferroni over the looks.** Model the morph outcomes as Bernoulli(p)
   draws and test p against θ with the one-sided exact binomial tails (equivalently: stop when
   the one-sided Clopper-Pearson bound at level α' lies on one side of θ):

   * above if P(X >= k | n, θ) = I_θ(k, n - k + 1) <= α'  (and k/n > θ),
   * below if P(X <= k | n, θ) = I_{1-θ}(n - k, k + 1) <= α'  (and k/n <= θ),

   with X ~ Binomial(n, θ), I the regularised incomplete beta function (`tf.math.betainc`) and
   α' = α / L, L = ceil(N / R) - 1 the number of interim looks (the last round has no test: the
   pair has drawn all N). Each look tests at α', so by the union bound the probability that a
   pair whose p is on one side of θ is stopped on the other side is at most α (under the
   Bernoulli model), whatever p is - there is no indifference region to tune.
3. The pair has drawn all N morphs (its resistance is then exactly the full-budget one).

The resistance of a stopped pair is k / n (successes over morphs drawn); its side of θ is the
side it was stopped on (the extra conditions k/n > θ, k/n <= θ make that hold by construction),
so `decide` gives the verdict of the test. Pairs close to θ run to N and get exactly the
full-budget resistance.

Why this test. Wilson / normal-approximation bounds are cheap but wrong at small n near 0 and 1,
exactly where most pairs sit. Wald's SPRT needs an indifference half-width δ around θ, its error
bounds are approximate once truncated at N, and it is tuned for the two points θ ± δ. The exact
binomial tails need no approximation, no tuning beyond α, are computable in the graph with
`tf.math.betainc`, and curtailment adds the stops that are certain. Bonferroni is conservative
(the looks are strongly correlated), which only costs a few morphs.

Draw order (`order`). The N natural morphs come in search order, smallest radius first, and near
morphs keep the label more often than far ones, so the first morphs in search order are the
least informative: an early stop over-estimates r, and many pairs stop at n/n, which ties the
codes of an image. The default order is therefore a fixed permutation of the N morph slots drawn
from the defense's seed (`draw_order`): the first n morphs are then a simple random sample,
without replacement, of the N that define the full-budget resistance, k/n is an unbiased
estimate of it, and the binomial test on that finite population is, if anything, conservative
(sampling without replacement concentrates more than the binomial; Hoeffding 1963, §6). The
resistance of a pair that draws all N is the full-budget one in any order. `order=None` keeps
the search order (measured in `scripts/bench.py`: it costs ROC AUC).

Caveats. (a) The Bernoulli/finite-population model is still an idealisation; curtailment and
the `scripts/bench.py` comparison with the full budget (verdict agreement, AUC) are what to
trust. (b) With θ close to 1 (e.g. a classifier that never
changes its label gives θr = 1 - 1/(2N)) "above" can never be shown early: confirming p > θ
needs about log(α') / log(θ) successes in a row. (c) Early stops below θ give a noisier r, so
Dis(r, θr) (purify vs reject) is noisier too.

**Refining the deciding codes (`refine_codes` = K, optional).** Early stops keep the verdict but
make the continuous detection score s = max_i(θr(i) - r(i)) coarse (r = k / n from a few morphs),
which costs ROC AUC. With K > 0 the K pairs of each image with the lowest estimates of
r(i) - θr(i), the candidates for the code that sets the score and the verdict, then draw more of
their N morphs (`finish_pairs`); the other codes keep their early stops. A refined pair stops
before N only when the rest of its morphs cannot change the image's score or its side of θr
(*dominance stop*, exact): with k of n drawn its full-budget θ - r lies in
[θ - (k + N - n)/N, θ - k/N], so once θ - k/N is at most the largest lower end over the image's
pairs (a finished or unrefined pair counts with its reported θ - k/n) and curtailment fixes its
side, it cannot be the maximum. The score s, and the resistance of the pair that sets it, are
then exactly those of finishing all K pairs to N, which draws more: when one code of an attacked
image has r = 0, a second refined code stops as soon as that is known. Cost: at most K·(N - R)
more morphs per image.

All functions are plain TensorFlow and run inside `tf.function`. The round loop is a
`tf.while_loop` that gathers the still-active pairs (`tf.where`), evaluates only their next
round of morphs and scatters the counts back, so the work really drops as pairs stop. It has
data-dependent shapes and is therefore not XLA-compatible (`jit_compile` must be off).
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

DRAW_ORDERS = ("shuffled", "search")

__all__ = [
    "draw_order",
    "look_alpha",
    "stop_decision",
    "sequential_counts",
    "sequential_test_on_streams",
    "finish_pairs",
    "dominated",
    "adaptive_resistance",
    "adaptive_resistance_on_outcomes",
    "full_resistance",
    "chunked_labels",
]


def draw_order(kind: str, num_morphs: int, seed: int) -> np.ndarray | None:
    """Order in which the adaptive budget draws the N morph slots of every pair.

    "shuffled": a fixed permutation of range(N) drawn from `seed` (module docstring, "Draw
    order"), the same for every pair and in every process; "search": None (search order).
    """
    if kind not in DRAW_ORDERS:
        raise ValueError(f"draw order must be one of {DRAW_ORDERS}, got {kind!r}")
    if kind == "search":
        return None
    return np.random.default_rng([int(seed), 1]).permutation(int(num_morphs)).astype(np.int32)


def look_alpha(alpha: float, num_morphs: int, round_size: int) -> float:
    """Per-look level α' = α / L, L = max(1, ceil(N / R) - 1) interim looks (Bonferroni)."""
    looks = max(1, math.ceil(num_morphs / round_size) - 1)
    return float(alpha) / looks


def stop_decision(successes, drawn, theta, num_morphs: int, alpha_per_look: float):
    """Which pairs can stop, and on which side of θ (module docstring, rules 1 and 2).

    Args:
        successes: [P] int, k = morphs (so far) that kept the label.
        drawn: [P] int, n >= 1 morphs drawn so far.
        theta: [P] float, the pair's resistance threshold θr(i) (may lie outside [0, 1]).
        num_morphs: N, the full budget.
        alpha_per_look: α' of `look_alpha`.

    Returns:
        (above [P] bool, below [P] bool): the pair is shown to have r > θ, resp. r <= θ
        (never both).
    """
    k = tf.cast(successes, tf.float64)
    n = tf.cast(drawn, tf.float64)
    theta = tf.cast(theta, tf.float64)
    budget = tf.constant(float(num_morphs), tf.float64)
    sure_above = k > theta * budget
    sure_below = k + (budget - n) <= theta * budget
    p = tf.clip_by_value(theta, 0.0, 1.0)
    one = tf.ones_like(k)
    # P(X >= k) = I_p(k, n - k + 1) for k >= 1 (1 for k = 0); P(X <= k) = I_{1-p}(n - k, k + 1)
    # for k < n (1 for k = n). The maximum() keeps betainc's arguments valid in unused branches.
    upper_tail = tf.where(
        k >= 1.0, tf.math.betainc(tf.maximum(k, 1.0), tf.maximum(n - k + 1.0, 1.0), p), one
    )
    lower_tail = tf.where(
        k < n, tf.math.betainc(tf.maximum(n - k, 1.0), k + 1.0, 1.0 - p), one
    )
    alpha = tf.constant(float(alpha_per_look), tf.float64)
    above = sure_above | ((upper_tail <= alpha) & (k > theta * n))
    below = (sure_below | ((lower_tail <= alpha) & (k <= theta * n))) & ~above
    return above, below


def sequential_counts(count_fn, theta, num_morphs: int, round_size: int, alpha: float):
    """Runs the sequential test for P pairs; only still-active pairs are evaluated each round.

    Args:
        count_fn: `(index [A] int32, start int32 scalar, size int32 scalar) -> [A] int32`, the
            number of label-keeping morphs among morphs start .. start+size-1 of each pair in
            `index` (A = the active pairs, A >= 1).
        theta: [P] float32 thresholds.
        num_morphs: N.
        round_size: R, morphs per pair per round.
        alpha: overall level α of the test (per pair).

    Returns:
        (successes [P] int32, drawn [P] int32, rounds int32 scalar): per pair k and n at its stop,
        and how many rounds the loop ran.
    """
    num_pairs = tf.shape(theta)[0]
    num_rounds = math.ceil(num_morphs / round_size)
    alpha_look = look_alpha(alpha, num_morphs, round_size)

    def body(t, successes, drawn, active):
        index = tf.cast(tf.where(active)[:, 0], tf.int32)
        start = t * round_size
        size = tf.minimum(round_size, num_morphs - start)
        hits = tf.cast(count_fn(index, start, size), tf.int32)
        successes = tf.tensor_scatter_nd_add(successes, index[:, None], hits)
        drawn = tf.tensor_scatter_nd_add(drawn, index[:, None], tf.fill(tf.shape(index), size))
        above, below = stop_decision(successes, drawn, theta, num_morphs, alpha_look)
        active = active & ~above & ~below & (drawn < num_morphs)
        return t + 1, successes, drawn, active

    zeros = tf.zeros([num_pairs], tf.int32)
    rounds, successes, drawn, _ = tf.while_loop(
        lambda t, s, d, active: (t < num_rounds) & tf.reduce_any(active),
        body,
        (tf.constant(0), zeros, zeros, tf.ones([num_pairs], tf.bool)),
    )
    return successes, drawn, rounds


def finish_pairs(count_fn, successes, drawn, selected, num_morphs: int, round_size: int,
                 theta=None, pairs_per_image: int | None = None):
    """Draws the remaining morphs of the `selected` pairs, so that they end with all N, or,
    with `theta`, until they cannot change their image's score (the dominance stop of the
    module docstring).

    Args:
        count_fn: as in `sequential_counts`.
        successes, drawn: [P] int32, the counts at the sequential test's stop (drawn is a
            multiple of `round_size` or N).
        selected: [P] bool, the pairs to finish.
        theta: [P] float32 thresholds θr, or None: every selected pair draws all N.
        pairs_per_image: m, with `theta`: pairs b·m .. b·m + m - 1 are image b's.

    Returns:
        (successes [P] int32, drawn [P] int32): selected pairs have drawn N, or (with `theta`)
        are dominated; the others are unchanged. Round t evaluates morphs t·R .. t·R + R - 1
        of the pairs still to draw that have drawn t·R so far, so no morph is evaluated twice.
    """
    num_rounds = math.ceil(num_morphs / round_size)

    def to_draw(successes, drawn):
        missing = selected & (drawn < num_morphs)
        if theta is None:
            return missing
        return missing & ~dominated(successes, drawn, theta, selected, num_morphs,
                                    pairs_per_image)

    def body(t, successes, drawn):
        start = t * round_size
        size = tf.minimum(round_size, num_morphs - start)
        index = tf.cast(tf.where(to_draw(successes, drawn) & (drawn <= start))[:, 0], tf.int32)
        hits = tf.cast(count_fn(index, start, size), tf.int32)
        successes = tf.tensor_scatter_nd_add(successes, index[:, None], hits)
        drawn = tf.tensor_scatter_nd_add(drawn, index[:, None], tf.fill(tf.shape(index), size))
        return t + 1, successes, drawn

    _, successes, drawn = tf.while_loop(
        lambda t, s, d: (t < num_rounds) & tf.reduce_any(to_draw(s, d)),
        body, (tf.constant(0), successes, drawn),
    )
    return successes, drawn


def dominated(successes, drawn, theta, refining, num_morphs: int, pairs_per_image: int):
    """[P] bool: the pair's remaining morphs can change neither its image's score
    max_i(θ_i - r_i) nor its side of θ (module docstring, dominance stop).

    Args:
        successes, drawn: [P] int32 counts k, n (n >= 1).
        theta: [P] float32 θ of each pair.
        refining: [P] bool, pairs that may still draw; the others count with their reported
            θ - k/n.
        pairs_per_image: m; pairs b·m .. b·m + m - 1 are image b's.
    """
    k = tf.cast(successes, tf.float64)
    n = tf.cast(drawn, tf.float64)
    theta = tf.cast(theta, tf.float64)
    budget = tf.constant(float(num_morphs), tf.float64)
    reported = theta - k / tf.maximum(n, 1.0)
    open_ = refining & (drawn < num_morphs)
    highest = theta - k / budget  # the largest θ - r the pair can still end with
    lowest = tf.where(open_, theta - (k + budget - n) / budget, reported)
    floor = tf.reduce_max(tf.reshape(lowest, [-1, pairs_per_image]), axis=1)
    floor = tf.repeat(floor, pairs_per_image)
    side_fixed = (k > theta * budget) | (k + (budget - n) <= theta * budget)
    return open_ & (highest <= floor) & side_fixed


def sequential_test_on_streams(outcomes, theta, round_size: int, alpha: float):
    """The sequential test on precomputed outcome streams (for tests and analysis).

    Args:
        outcomes: [P, N] bool, morph j of pair p kept the label.
        theta: [P] float32.

    Returns:
        (resistance [P] float32 = k / n, drawn [P] int32).
    """
    outcomes = tf.cast(outcomes, tf.int32)
    num_morphs = int(outcomes.shape[1])

    def count_fn(index, start, size):
        return tf.reduce_sum(tf.gather(outcomes, index)[:, start : start + size], axis=1)

    successes, drawn, _ = sequential_counts(
        count_fn, tf.convert_to_tensor(theta, tf.float32), num_morphs, round_size, alpha
    )
    return tf.cast(successes, tf.float32) / tf.cast(drawn, tf.float32), drawn


def full_resistance(outcomes):
    """Full-budget resistance k_N / N [..., m] float32 of morph outcomes [..., m, N] bool."""
    return tf.reduce_mean(tf.cast(outcomes, tf.float32), axis=-1)


def chunked_labels(label_fn, latents, chunk_size: int):
    """`label_fn` over latents [M, D] in chunks of at most `chunk_size` rows -> [M] int64.

    Unlike padding to a multiple of the chunk size, the last chunk is just shorter, so a round
    with few active pairs costs few evaluations.
    """
    count = tf.shape(latents)[0]
    num_chunks = (count + chunk_size - 1) // chunk_size

    def body(i, parts):
        chunk = latents[i * chunk_size : tf.minimum((i + 1) * chunk_size, count)]
        return i + 1, parts.write(i, tf.cast(label_fn(chunk), tf.int64))

    _, parts = tf.while_loop(
        lambda i, _: i < num_chunks, body,
        (tf.constant(0), tf.TensorArray(tf.int64, size=num_chunks, infer_shape=False,
                                        element_shape=tf.TensorShape([None]))),
        parallel_iterations=1,
    )
    return tf.reshape(parts.concat(), [count])


def adaptive_resistance(mean, zu, label, selected, morph_values, theta_r, label_fn,
                        round_size: int, alpha: float, chunk_size: int,
                        refine_codes: int = 0, order=None, current=None, code_masks=None):
    """Resistance [B, m] with the adaptive morph budget, and the morphs each pair used.

    Pair p = b·m + i is (image b, selected code i). Its morph j has the latent of the full-budget
    path (`morphs.morph_latents` + zu): μs(x_b) with code selected[i] set to
    morph_values[b, i, j], concatenated with zu[b]; same arithmetic, so the same labels.

    Args:
        mean: [B, d_s] μs(x).
        zu: [B, K] class-unique codes.
        label: [B] int64, the classifier's label of each image.
        selected: [m] int32 indices of the manipulated codes.
        morph_values: [B, m, N] from `morphs.natural_morph_codes` (the full-budget values).
        theta_r: [m] thresholds θr.
        label_fn: latents [M, d_s + K] -> classifier labels [M] int64 of the decoded morphs.
        round_size, alpha: the sequential test (`sequential_counts`).
        chunk_size: at most this many latents per `label_fn` call.
        refine_codes: refine the `refine_codes` pairs of each image with the lowest
            k/n - θr(i): they draw on until all N or the dominance stop (module docstring);
            0 = off.
        order: [N] int permutation, the draw order of the morph slots (`draw_order`);
            None = search order.
        current, code_masks: for latents with several dimensions per code (a feature map,
            `ComboVAE.code_values` / `code_masks`): current [B, m] the selected codes' values
            and code_masks [m, D] their dimensions; a morph is mean + (v - current)·mask.
            None: one dimension per code (`morphs.morph_latents`).

    Returns:
        (resistance [B, m] float32 = k / n, morphs_used [B, m] int32 = n).
    """
    batch = tf.shape(mean)[0]
    m = int(selected.shape[0])
    num_morphs = int(morph_values.shape[-1])
    d_s = tf.shape(mean)[1]
    pair_image = tf.repeat(tf.range(batch), m)  # [P]
    if order is not None:
        morph_values = tf.gather(morph_values, tf.constant(order, tf.int32), axis=-1)
    values = tf.reshape(morph_values, [batch * m, num_morphs])  # [P, N] in draw order
    theta = tf.tile(tf.cast(theta_r, tf.float32), [batch])
    if code_masks is None:  # one dimension per code
        current = tf.gather(mean, selected, axis=1)  # [B, m]
        code_masks = tf.one_hot(selected, d_s, dtype=mean.dtype)  # [m, d_s]
    pair_current = tf.reshape(current, [batch * m])  # [P]
    pair_one_hot = tf.tile(tf.cast(code_masks, mean.dtype), [batch, 1])  # [P, d_s]

    def count_fn(index, start, size):
        image = tf.gather(pair_image, index)
        code_means = tf.gather(mean, image)  # [A, d_s]
        now = tf.gather(pair_current, index)  # [A]
        delta = tf.gather(values, index)[:, start : start + size] - now[:, None]  # [A, s]
        zs = code_means[:, None, :] + delta[..., None] * tf.gather(pair_one_hot, index)[:, None]
        zu_all = tf.broadcast_to(tf.gather(zu, image)[:, None, :],
                                 [tf.shape(index)[0], size, tf.shape(zu)[-1]])
        latents = tf.reshape(tf.concat([zs, zu_all], axis=-1),
                             [-1, d_s + tf.shape(zu)[-1]])
        labels = tf.reshape(chunked_labels(label_fn, latents, chunk_size), [-1, size])
        same = tf.equal(labels, tf.gather(tf.cast(label, tf.int64), image)[:, None])
        return tf.reduce_sum(tf.cast(same, tf.int32), axis=1)

    return _test_and_refine(count_fn, theta, batch, m, num_morphs, round_size, alpha,
                            refine_codes)


def _test_and_refine(count_fn, theta, batch, m: int, num_morphs: int, round_size: int,
                     alpha: float, refine_codes: int):
    """`sequential_counts` on the P = B·m pairs, then `finish_pairs` (dominance stop) on each
    image's `refine_codes` lowest k/n - θ -> (resistance [B, m] float32, drawn [B, m] int32)."""
    successes, drawn, _ = sequential_counts(count_fn, theta, num_morphs, round_size, alpha)
    if refine_codes:
        estimate = tf.cast(successes, tf.float32) / tf.cast(tf.maximum(drawn, 1), tf.float32)
        margin = tf.reshape(estimate - theta, [batch, m])
        _, lowest = tf.math.top_k(-margin, k=min(int(refine_codes), m))  # [B, K], ties: first
        worst = tf.reshape(tf.range(batch)[:, None] * m + lowest, [-1])
        chosen = tf.scatter_nd(worst[:, None], tf.ones_like(worst, tf.bool), [batch * m])
        successes, drawn = finish_pairs(count_fn, successes, drawn, chosen, num_morphs,
                                        round_size, theta=theta, pairs_per_image=m)
    resistance = tf.cast(successes, tf.float32) / tf.cast(tf.maximum(drawn, 1), tf.float32)
    return tf.reshape(resistance, [batch, m]), tf.reshape(drawn, [batch, m])


def adaptive_resistance_on_outcomes(outcomes, theta_r, round_size: int, alpha: float,
                                    refine_codes: int = 0, order=None):
    """`adaptive_resistance` replayed on the full budget's morph outcomes, without a model.

    The adaptive budget draws its morphs from the same N natural morphs as the full budget, so
    its result is a function of which of them keep the label: given those outcomes it is
    reproduced exactly, e.g. to compare candidate budgets on VAL
    (`fmd_tf.operating_point.budget_row`) from one full-budget pass.

    Args:
        outcomes: [B, m, N] bool, morph j (search order) of code i of image b kept the label.
        theta_r: [m] thresholds θr.
        round_size, alpha, refine_codes, order: as in `adaptive_resistance`.

    Returns:
        (resistance [B, m] float32 = k / n, morphs_used [B, m] int32 = n).
    """
    outcomes = tf.convert_to_tensor(outcomes, tf.bool)
    batch, m, num_morphs = (int(d) for d in outcomes.shape)
    if order is not None:
        outcomes = tf.gather(outcomes, tf.constant(order, tf.int32), axis=-1)
    streams = tf.reshape(tf.cast(outcomes, tf.int32), [batch * m, num_morphs])
    theta = tf.tile(tf.cast(theta_r, tf.float32), [batch])

    def count_fn(index, start, size):
        return tf.reduce_sum(tf.gather(streams, index)[:, start : start + size], axis=1)

    return _test_and_refine(count_fn, theta, batch, m, num_morphs, round_size, alpha,
                            refine_codes)
