"""Black-box attacks on the *defended* model through its public outputs only (issue 21).

* `api_square`: Square Attack (Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a
  query-efficient black-box adversarial attack via random search", ECCV 2020), score-based,
  L∞ ball of radius `eps`, written here in NumPy (batched, one query per image and iteration).
* `api_hop_skip_jump`: HopSkipJump (Chen, Jordan & Wainwright, "HopSkipJumpAttack: a
  query-efficient decision-based attack", IEEE S&P 2020), decision-based, L2, through ART 1.20's
  `HopSkipJump` on a `BlackBoxClassifier` whose only answer is "adversarial or not".
* `api_rays`: RayS (Chen & Gu, KDD 2020), decision-based, L∞ (see its docstring).
* `api_corners`: no search, the corners of the L∞ ball (brightness shifts, then random sign
  vectors) until one fools the defense: the floor any query attack must beat.

Threat model: the attacker of a TF Serving endpoint (`fmd_tf.export`). It sends images and reads
what the signatures answer: `serving_default` (the defended `label`, -1 = rejected, `verdict`
0 passed / 1 purified / 2 rejected, `classifier_label`, `resistance` [m], `distance`,
`recon_error`, `purified`) and `classify` (the undefended classifier's `logits`, `label`). It
knows no weights, no thresholds θr / θd / θe and no gradients. `QueryOracle` is that view: it
wraps an in-process defense (`QueryOracle.from_defense`), the served model
(`QueryOracle.from_client` around `fmd_tf.serving.client.GrpcClient` / `RestClient`), or any
function returning those outputs, and counts the queries of every attacked image. Against an
`FMDefenseEnsemble` each queried image is judged by the member its pixels draw; the same image
always gets the same answer, so the verdict the attack saw is the one an evaluation sees.

Success (`is_success`): an attacked image counts as fooling the defense only if the defended
output is accepted (verdict != 2) and its label differs from the true label. A rejected input is
defended: the attack failed on it, whatever the classifier says. Robust accuracy is counted per
image (`fmd_tf.evaluation.metrics.defended`: rejected or right).

Query budget: `max_queries` per image covers every image the attack sends for it, the clean
image included; neither attack ever exceeds it, and an image stops querying as soon as it
succeeds (within the L2 radius `eps` for HopSkipJump when one is given).

Query monitor (`monitor=`, `fmd_tf.serving.query_monitor.QueryMonitor`): a stateful detector
in front of the endpoint that rejects queries close to an earlier one (Blacklight). A query it
flags is answered as rejected and costs no model pass; the records then count them per image
(`monitor_flagged`). The attack's final image is judged by the evaluation without the monitor,
as if sent from a fresh account: the monitor can only slow the search down.

Cost: queries x one defended forward pass per image (m·N morphs through decoder and classifier,
plus the `classify` pass for Square): 1,000 queries on n images cost about 1,000·n defended
images, the price of defending 1,000 test sets; 5,000 queries five times that. GPU-sized at
n = 500.
"""

from __future__ import annotations

import hashlib
import inspect

import numpy as np

from fmd_tf.defense.fm_defense import VERDICT_REJECTED
from fmd_tf.operating_point import decides_without_morphs

__all__ = [
    "QueryOracle",
    "api_corners",
    "api_hop_skip_jump",
    "api_rays",
    "api_square",
    "as_oracle",
    "corner_direction",
    "is_success",
    "logit_margin",
    "p_schedule",
    "rays_blocks",
    "square_loss",
    "true_class_support",
]

# Outputs of `serving_default` an attacker reads (`purified` is public too, but unused and large).
PUBLIC_KEYS = ("label", "verdict", "classifier_label", "resistance", "distance", "recon_error")


# ----------------------------------------------------------------------------- oracle


class QueryOracle:
    """What an attacker of the endpoint sees, with a query count per attacked image.

    Args:
        defend: callable, images float32 [b, H, W, C] in [0, 1] -> dict of arrays with at least
            `label` int [b] (-1 = rejected) and `verdict` int [b] (0 / 1 / 2), as the served
            `serving_default`; `classifier_label` [b] and `resistance` [b, m] are used when
            present.
        classify: optional callable, images -> logits [b, K] (or a dict holding "logits"), as
            the served `classify` signature; needed by `api_square`.

        monitor: optional `fmd_tf.serving.query_monitor.QueryMonitor` (or its options as a
            dict) in front of both: a query it flags never reaches them and is answered as
            rejected (label and classifier_label -1, verdict 2, NaN scores and logits).

    `query(x, owner)` charges one query to image `owner[k]` for each row k of `x`; `queries`
    (int64, indexed by image) is the running count, `monitor_flagged` the count of those the
    monitor rejected. A query of `classify` on the same image (`logits=True`) is part of that
    one query: it is the same image sent to the other signature, at the cost of one classifier
    pass next to the defended one.
    """

    def __init__(self, defend, classify=None, monitor=None):
        if not callable(defend):
            raise TypeError("defend must be a function images -> dict with 'label' and "
                            f"'verdict' (the served serving_default), got {type(defend).__name__}")
        if classify is not None and not callable(classify):
            raise TypeError("classify must be a function images -> logits or None, got "
                            f"{type(classify).__name__}")
        if isinstance(monitor, dict):
            from fmd_tf.serving.query_monitor import QueryMonitor

            monitor = QueryMonitor(**monitor)
        if monitor is not None and not callable(getattr(monitor, "check", None)):
            raise TypeError("monitor must be a QueryMonitor (or its options as a dict), got "
                            f"{type(monitor).__name__}")
        self._defend, self._classify, self.monitor = defend, classify, monitor
        self.queries = np.zeros(0, np.int64)
        self.monitor_flagged = np.zeros(0, np.int64)
        self.calls = 0  # batched calls of `defend`
        self._num_classes = None

    @property
    def has_logits(self) -> bool:
        return self._classify is not None

    def used(self, owner, counts=None) -> np.ndarray:
        """int64 [len(owner)]: queries charged so far to each image id of `owner` (of
        `counts` instead, e.g. `monitor_flagged`, when given)."""
        counts = self.queries if counts is None else counts
        owner = np.asarray(owner, np.int64)
        out = np.zeros(owner.shape, np.int64)
        known = owner < len(counts)
        out[known] = counts[owner[known]]
        return out

    def counts(self, owner) -> dict:
        """Per-image counts of `owner` so far: {"queries"} and, with a monitor,
        {"monitor_flagged"}; subtract two of them for an attack's share (`since`)."""
        out = {"queries": self.used(owner)}
        if self.monitor is not None:
            out["monitor_flagged"] = self.used(owner, self.monitor_flagged)
        return out

    def since(self, start: dict, owner) -> dict:
        """`counts(owner)` minus `start` (an earlier `counts(owner)`)."""
        return {k: v - start[k] for k, v in self.counts(owner).items()}

    def query(self, x, owner, logits: bool = False) -> dict:
        """Public outputs of the images x [b, H, W, C] (float32 in [0, 1]), one query charged
        to image id owner[k] for row k; `logits` adds the `classify` logits [b, K]."""
        x = np.asarray(x, np.float32)
        owner = np.asarray(owner, np.int64).reshape(-1)
        if x.ndim != 4 or len(x) != len(owner) or len(x) == 0:
            raise ValueError(f"query needs a non-empty batch [b, H, W, C] and one owner per "
                             f"image, got images {x.shape} and {len(owner)} owners")
        if not np.all(np.isfinite(x)) or x.min() < 0.0 or x.max() > 1.0:
            raise ValueError("queried images must be finite and in [0, 1] (clip them first): "
                             "the server refuses anything else with INVALID_ARGUMENT")
        if logits and self._classify is None:
            raise ValueError("this oracle has no logits: build it with classify= (the served "
                             "`classify` signature, QueryOracle.from_client / from_defense)")
        flagged = np.zeros(len(x), bool) if self.monitor is None else \
            np.asarray(self.monitor.check(x)[0], bool)
        kept = np.flatnonzero(~flagged)
        out = self._answer(x[kept], logits) if len(kept) else {}
        if len(kept) < len(x):
            out = _with_rejected_rows(out, kept, len(x), self._logit_width(x, logits))
        if owner.max() >= len(self.queries):
            grow = np.zeros(owner.max() + 1 - len(self.queries), np.int64)
            self.queries = np.concatenate([self.queries, grow])
            self.monitor_flagged = np.concatenate([self.monitor_flagged, grow])
        np.add.at(self.queries, owner, 1)
        np.add.at(self.monitor_flagged, owner[flagged], 1)
        return out

    def _answer(self, x, logits: bool) -> dict:
        """The outputs of `defend` (and `classify`) on images that reach the model."""
        out = {k: np.asarray(v) for k, v in dict(self._defend(x)).items()}
        for key in ("label", "verdict"):
            if key not in out or len(out[key]) != len(x):
                raise ValueError(f"the oracle's defend function must return {key!r} with one "
                                 f"entry per image (got keys {sorted(out)})")
        if logits:
            out["logits"] = _as_logits(self._classify(x))
            self._num_classes = out["logits"].shape[-1]
        self.calls += 1
        return out

    def _logit_width(self, x, logits: bool):
        """K of the logits for rejected rows (None without logits); learnt from one classifier
        pass, outside the query count, when no query has reached the model yet."""
        if logits and self._num_classes is None:
            self._num_classes = _as_logits(self._classify(x[:1])).shape[-1]
        return self._num_classes if logits else None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_defense(cls, defense, batch_size: int = 64, monitor=None,
                     decisions_only: bool = False) -> QueryOracle:
        """In-process `FMDefense` / `FMDefenseEnsemble`: its `defend` (the outputs of
        `serving_default`) and its classifier's logits (those of `classify`).
        `decisions_only`: the attack reads label and verdict only; where no resistance
        threshold can flag, they come from `FMDefense.decisions` (the same answers, without
        the morphs)."""
        if decisions_only and decides_without_morphs(defense):
            def defend(x):
                return defense.decisions(x, batch_size=batch_size)
        else:
            def defend(x):
                out = defense.defend(x, batch_size=batch_size)
                return {k: out[k] for k in PUBLIC_KEYS if k in out}

        return cls(defend, lambda x: _logits(defense.classifier, x, batch_size), monitor)

    @classmethod
    def from_classifier(cls, model, batch_size: int = 256, monitor=None) -> QueryOracle:
        """The undefended classifier as an endpoint that accepts everything (verdict 0, label =
        argmax of its logits): the reference for checking the attacks themselves."""
        def defend(x):
            label = np.argmax(_logits(model, x, batch_size), axis=-1).astype(np.int64)
            return {"label": label, "verdict": np.zeros(len(x), np.int32),
                    "classifier_label": label}

        return cls(defend, lambda x: _logits(model, x, batch_size), monitor)

    @classmethod
    def from_client(cls, client, model: str = "fmd", version=None,
                    exposure: str = "full", monitor=None) -> QueryOracle:
        """The served model, through a `fmd_tf.serving.client.GrpcClient` or `RestClient`:
        `serving_default` for the defended outputs (gRPC asks for the `PUBLIC_KEYS` it serves
        only, not the purified images), `classify` for the logits. `exposure`: how the model
        was exported (`fmd_tf.export.EXPOSURES`); a "decision" endpoint answers label and
        verdict only and has no `classify` (decision-based attacks only)."""
        from fmd_tf.export import exposed_signatures

        served = exposed_signatures(exposure)
        keys = [k for k in PUBLIC_KEYS if k in served["serving_default"]]
        takes_filter = "output_filter" in inspect.signature(client.predict).parameters

        def defend(x):
            extra = {"output_filter": keys} if takes_filter else {}
            out = client.predict(model, x, signature="serving_default", version=version, **extra)
            return {k: out[k] for k in keys if k in out}

        def classify(x):
            return client.predict(model, x, signature="classify", version=version)["logits"]

        return cls(defend, classify if "classify" in served else None, monitor)


def _with_rejected_rows(out: dict, kept, n: int, num_classes) -> dict:
    """`out` (answers for rows `kept` of n) spread over all n rows; the others get the answer
    to a query the monitor rejected: label and classifier_label -1, verdict 2 (rejected), -1
    or NaN for every other value, logits [n, num_classes] NaN when `num_classes` is given."""
    full = {"label": np.full(n, -1, np.int64), "classifier_label": np.full(n, -1, np.int64),
            "verdict": np.full(n, VERDICT_REJECTED, np.int32)}
    if num_classes is not None:
        full["logits"] = np.full((n, num_classes), np.nan, np.float32)
    for key, value in out.items():
        fill = -1 if np.issubdtype(value.dtype, np.integer) else np.nan
        full[key] = np.full((n, *value.shape[1:]), fill, value.dtype)
        full[key][kept] = value
    full["verdict"][np.setdiff1d(np.arange(n), kept)] = VERDICT_REJECTED
    return full


def _as_logits(z) -> np.ndarray:
    """float32 logits of a `classify` answer (an array, or a dict holding "logits")."""
    return np.asarray(z["logits"] if isinstance(z, dict) else z, np.float32)


def _logits(model, x, batch_size: int) -> np.ndarray:
    import tensorflow as tf

    return np.concatenate([
        np.asarray(model(tf.constant(x[i : i + batch_size]), training=False), np.float32)
        for i in range(0, len(x), batch_size)])


def as_oracle(target, batch_size: int = 64, monitor=None,
              decisions_only: bool = False) -> QueryOracle:
    """`target` as a `QueryOracle`: itself, a defense (anything with `defend` and `classifier`:
    `FMDefense`, `FMDefenseEnsemble`) or a Keras classifier (undefended, accepts everything);
    `monitor` (a `QueryMonitor` or its options) in front of a new oracle; `decisions_only`: the
    attack reads label and verdict only (`QueryOracle.from_defense`)."""
    if isinstance(target, QueryOracle):
        if monitor is not None:
            raise ValueError("give the monitor to the QueryOracle itself (QueryOracle(..., "
                             "monitor=...)), not to the attack")
        return target
    if hasattr(target, "defend") and hasattr(target, "classifier"):
        return QueryOracle.from_defense(target, batch_size, monitor, decisions_only)
    import keras

    if isinstance(target, keras.Layer):
        return QueryOracle.from_classifier(target, monitor=monitor)
    raise TypeError(
        f"cannot attack a {type(target).__name__}: pass a QueryOracle, an FMDefense / "
        "FMDefenseEnsemble or a Keras classifier; for a served model use "
        "QueryOracle.from_client(fmd_tf.serving.client.GrpcClient('host:8500'))")


# ----------------------------------------------------------------------------- success, loss


def is_success(out: dict, y) -> np.ndarray:
    """bool [b]: the defended output is accepted (verdict != 2) and its label is not y."""
    return (np.asarray(out["verdict"]) != VERDICT_REJECTED) & \
        (np.asarray(out["label"]) != np.asarray(y))


def logit_margin(logits, y) -> np.ndarray:
    """m = z_y - max_{k != y} z_k, float64 [b] (< 0: the classifier is fooled); logits [b, K]."""
    z = np.asarray(logits, np.float64)
    rows = np.arange(len(z))
    true = z[rows, y]
    other = z.copy()
    other[rows, y] = -np.inf
    return true - other.max(axis=1)


def true_class_support(out: dict, y) -> np.ndarray:
    """s in [0, 1], float64 [b]: how much the defense's morphs still back the true class.

    With r̄ the mean resistance over the m codes (share of morphs keeping the classifier's label
    y0): s = r̄ when y0 = y, and s = 1 - r̄ when y0 != y (the morphs that leave y0 may go back to
    y; 1 - r̄ bounds their share). Both sides meet near r̄ = 1/2 at the decision boundary. 0 when
    the outputs carry no resistance (an undefended endpoint).
    """
    if "resistance" not in out:
        return np.zeros(len(out["label"]))
    r = np.asarray(out["resistance"], np.float64)
    r = r.mean(axis=1) if r.ndim == 2 else r
    label0 = np.asarray(out["classifier_label"]) if "classifier_label" in out \
        else np.argmax(out["logits"], axis=1)
    return np.where(label0 == np.asarray(y), r, 1.0 - r)


def square_loss(out: dict, y, scale, detector_weight: float = 1.0) -> np.ndarray:
    """Square's loss from public outputs, float64 [b] (lower is better for the attacker):

        L(x) = m(x) / scale + λ · s(x)

    m: `logit_margin` of the `classify` logits; scale: |m| of the clean image (at least 1), so
    that λ = `detector_weight` weighs a full swing of the morphs' support `true_class_support`
    s against the clean margin. The success test (`is_success`) comes first: a candidate that
    fools the defense is always kept, and then the image stops querying.
    """
    return logit_margin(out["logits"], y) / scale + detector_weight * true_class_support(out, y)


# ----------------------------------------------------------------------------- Square


def p_schedule(p_init: float, iteration: int, n_iters: int) -> float:
    """The paper's piecewise-constant share p of pixels a square covers at `iteration` of
    `n_iters`: p_init halved at 10, 50, 200, 500, 1k, 2k, 4k, 6k and 8k of 10,000 iterations
    (rescaled to `n_iters`)."""
    it = int(iteration / n_iters * 10000)
    for k, bound in enumerate((10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)):
        if it <= bound:
            return p_init / 2**k
    return p_init / 512 if it <= 10000 else p_init


def _square_side(p: float, h: int, w: int) -> int:
    """Side s = round(sqrt(p · h · w)) of the square, in [1, h - 1]."""
    return int(min(max(round(np.sqrt(p * h * w)), 1), min(h, w) - 1))


def _square_candidates(rng, x, x_best, eps, s):
    """x_best [a, H, W, C] with one random s x s window per image set to x ± eps (one sign per
    channel), clipped to [0, 1]: x_new = clip(x_best outside W, x + eps·σ inside W). A sign that
    would not change the window is drawn again (up to 10 times), as in the paper."""
    a, h, w, c = x.shape
    top = rng.integers(0, h - s, size=a)
    left = rng.integers(0, w - s, size=a)
    rows, cols = np.arange(h)[None, :], np.arange(w)[None, :]
    window = (((rows >= top[:, None]) & (rows < top[:, None] + s))[:, :, None]
              & ((cols >= left[:, None]) & (cols < left[:, None] + s))[:, None, :])[..., None]
    sign = rng.choice(np.float32([-1.0, 1.0]), size=(a, 1, 1, c))
    for _ in range(10):
        x_new = np.where(window, np.clip(x + np.float32(eps) * sign, 0.0, 1.0), x_best)
        same = np.all(np.abs(x_new - x_best) < 1e-7, axis=(1, 2, 3))
        if not same.any():
            break
        sign[same] = rng.choice(np.float32([-1.0, 1.0]), size=(int(same.sum()), 1, 1, c))
    return x_new.astype(np.float32)


def _check_batch(x, y):
    x = np.asarray(x, np.float32)
    if x.ndim != 4:
        raise ValueError(f"x must be images [n, H, W, C], got shape {x.shape}")
    if len(x) and (not np.all(np.isfinite(x)) or x.min() < 0.0 or x.max() > 1.0):
        raise ValueError("x must be finite and in [0, 1]")
    if y is None:
        raise ValueError("y (the true labels) is required: success means a label other than y")
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if len(y) != len(x):
        raise ValueError(f"y must have one label per image: {len(y)} labels, {len(x)} images")
    return x, y


class _Progress:
    """A Keras progress bar over an attack's query rounds (or images), with the share of
    images fooled so far; silent when `verbose` is 0."""

    def __init__(self, total: int, verbose: int, unit: str = "round"):
        self.bar = None
        if verbose:
            import keras

            self.bar = keras.utils.Progbar(max(int(total), 1), verbose=verbose, unit_name=unit,
                                           stateful_metrics=["active", "fooled"])

    def update(self, done: int, success, finalize: bool = False):
        if self.bar is not None:
            success = np.asarray(success)
            values = [("active", int((~success).sum())), ("fooled", float(success.mean()))]
            self.bar.update(self.bar.target if finalize else int(done), values=values,
                            finalize=finalize)


def _check_linf_budget(attack: str, norm, eps, max_queries) -> None:
    if norm not in ("linf", "inf", np.inf):
        raise ValueError(f"{attack} is an L∞ attack (norm='linf'), got norm={norm!r}; for L2 "
                         "use api_hop_skip_jump")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if int(max_queries) < 1:
        raise ValueError(f"max_queries must be >= 1 (the clean query), got {max_queries}")


def _record(counts: dict, success, out_best, **extra) -> dict:
    """An attack's per-image record: `counts` ({"queries"[, "monitor_flagged"]}: what
    `QueryOracle.since` gives), success, the defended verdict and label of x_adv, `extra`."""
    return {**{k: np.asarray(v).astype(np.int64) for k, v in counts.items()},
            "success": success.astype(bool),
            "verdict": np.asarray(out_best["verdict"]).astype(np.int32),
            "label": np.asarray(out_best["label"]).astype(np.int64), **extra}


def _empty_result(x, **extra):
    """An attack's result on no images: (x, an empty record with `extra`)."""
    return x.copy(), _record({"queries": np.zeros(0)}, np.zeros(0, bool),
                             {"verdict": np.zeros(0), "label": np.zeros(0)}, **extra)


def _clean_answers(o, x, y):
    """The opening of a decision-based attack: one query of each clean image of x [n, ...]
    (n >= 1). Returns (ids arange(n), the counts before it, success bool [n], best {"label",
    "verdict"} of the clean answers)."""
    ids = np.arange(len(x))
    base = o.counts(ids)
    out = o.query(x, ids)
    best = {"label": out["label"].astype(np.int64), "verdict": out["verdict"].astype(np.int32)}
    return ids, base, is_success(out, y), best


def _rounds(max_queries: int, success, verbose: int):
    """Query rounds after the clean query: yields (round, ids of the images not fooled yet) for
    rounds 0 .. max_queries - 2 while any is left, reading `success` (bool [n], updated in place
    by the caller) each round; a progress bar when `verbose`."""
    progress = _Progress(max_queries - 1, verbose)
    for round_ in range(max_queries - 1):
        act = np.flatnonzero(~success)
        progress.update(round_, success)
        if len(act) == 0:
            break
        yield round_, act
    progress.update(max_queries - 1, success, finalize=True)


def api_square(oracle, x, y, eps: float = 0.1, max_queries: int = 1000, seed: int = 0,
               p_init: float = 0.8, detector_weight: float = 1.0, norm: str = "linf",
               batch_size: int = 64, verbose: int = 0,
               monitor=None):
    """Untargeted L∞ Square Attack on the defended endpoint; (x_adv, record).

    Per image (all images batched, one query per image and iteration):

    1. query x (1 query); an image the defense already gets wrong is returned as is;
    2. vertical stripes x_0 = clip(x + eps·σ), σ ∈ {-1, 1} per column and channel (1 query);
    3. for i = 1 .. max_queries - 2: p_i = `p_schedule`(p_init, i - 1, max_queries - 1), side
       s_i = round(sqrt(p_i·H·W)); x_cand = x_best with a random s_i x s_i window set to x ± eps
       (`_square_candidates`); keep x_cand if it fools the defense (`is_success`) or
       L(x_cand) < L(x_best) (`square_loss`: classify-logit margin + λ · morph support of the
       true class); an image that succeeded stops.

    Args:
        oracle: a `QueryOracle` with logits, or what `as_oracle` takes (an `FMDefense`).
        x: float32 [n, H, W, C] in [0, 1]; y: true labels int [n].
        eps: L∞ radius; max_queries: budget per image (>= 1, the clean query included).
        seed: NumPy generator seed of the squares and signs.
        p_init: initial share of pixels per square (0.8: the authors' value on the MNIST
            challenge, ART's default); detector_weight: λ of `square_loss`.
        norm: "linf" only (the harness passes the budget's norm).
        batch_size: of the in-process defense (`as_oracle`).
        verbose: 1 shows a progress bar over the query rounds (images still attacked, share
            fooled).
        monitor: a `QueryMonitor` (or its options) in front of the endpoint the oracle is
            built for (`as_oracle`; not with a ready `QueryOracle`, which has its own).

    Returns:
        x_adv float32 [n, H, W, C] within the ball and [0, 1]; record {"queries" int64 [n],
        "success" bool [n] (the oracle's verdict on x_adv), "verdict", "label" [n] (its
        defended outputs), "linf" float32 [n]}.
    """
    _check_linf_budget("api_square", norm, eps, max_queries)
    x, y = _check_batch(x, y)
    o = as_oracle(oracle, batch_size, monitor)
    if not o.has_logits:
        raise ValueError("api_square needs the classifier's logits (the endpoint's `classify` "
                         "signature: QueryOracle(..., classify=...)); an endpoint without them "
                         "can be attacked with api_hop_skip_jump (labels only)")
    n, max_queries = len(x), int(max_queries)
    if n == 0:
        return x.copy(), _record({"queries": np.zeros(0)}, np.zeros(0, bool),
                                 {"verdict": np.zeros(0), "label": np.zeros(0)},
                                 linf=np.zeros(0, np.float32))
    rng = np.random.default_rng(seed)
    ids = np.arange(n)
    base = o.counts(ids)
    out = o.query(x, ids, logits=True)
    success = is_success(out, y)
    scale = np.maximum(np.abs(logit_margin(out["logits"], y)), 1.0)
    best = {"label": out["label"].astype(np.int64), "verdict": out["verdict"].astype(np.int32)}
    x_best = x.copy()
    loss = square_loss(out, y, scale, detector_weight)
    n_iters = max_queries - 1  # queries after the clean one: stripes + n_iters - 1 squares
    h, w = x.shape[1:3]
    progress = _Progress(n_iters, verbose)
    for i in range(n_iters):
        act = np.flatnonzero(~success)
        progress.update(i, success)
        if len(act) == 0:
            break
        if i == 0:
            sign = rng.choice(np.float32([-1.0, 1.0]), size=(len(act), 1, w, x.shape[3]))
            cand = np.clip(x[act] + np.float32(eps) * sign, 0.0, 1.0)
        else:
            s = _square_side(p_schedule(p_init, i - 1, n_iters), h, w)
            cand = _square_candidates(rng, x[act], x_best[act], eps, s)
        out = o.query(cand, act, logits=True)
        won = is_success(out, y[act])
        new_loss = square_loss(out, y[act], scale[act], detector_weight)
        keep = won | (new_loss < loss[act]) | (i == 0)  # the stripes replace x (the paper)
        k = act[keep]
        x_best[k], loss[k] = cand[keep], new_loss[keep]
        best["label"][k], best["verdict"][k] = out["label"][keep], out["verdict"][keep]
        success[act[won]] = True
    progress.update(n_iters, success, finalize=True)
    x_adv = np.clip(x_best, np.maximum(x - np.float32(eps), 0.0),
                    np.minimum(x + np.float32(eps), 1.0)).astype(np.float32)
    linf = np.abs(x_adv - x).reshape(n, -1).max(axis=1)
    return x_adv, _record(o.since(base, ids), success, best, linf=linf)


# ----------------------------------------------------------------------------- RayS

# Per-image states of `api_rays`: linear search along a direction while no adversarial radius
# is known, a probe at the best radius once one is, a binary search after a hit.
_LINEAR, _PROBE, _BISECT = 0, 1, 2


def rays_blocks(level: int, index: int, size: int) -> slice:
    """The flat-pixel slice that RayS flips: block `index` of the 2**level near-equal contiguous
    blocks of a flattened image of `size` values (Chen & Gu 2020, Alg. 1)."""
    bounds = np.linspace(0, size, 2**level + 1).round().astype(int)
    return slice(int(bounds[index]), int(bounds[index + 1]))


def api_rays(oracle, x, y, eps: float = 0.1, max_queries: int = 1000, seed: int = 0,
             norm: str = "linf", linear_steps: int = 10, tol: float = 1e-3,
             batch_size: int = 64, verbose: int = 0,
             monitor=None):
    """Untargeted hard-label L∞ RayS on the defended endpoint; (x_adv, record).

    RayS (Chen & Gu, "RayS: A Ray Searching Method for Hard-label Adversarial Attack", KDD
    2020) reads decisions only (`is_success`: accepted, label != y; a rejected image is *not*
    adversarial). It searches sign directions d ∈ {-1, 1}^D and, for each, the smallest radius
    r with x(r) = clip(x + r·d, 0, 1) adversarial:

        r* = min_d g(d),  g(d) = min {r : x(r) adversarial}

    Per image (all images batched, one query per image and iteration):

    1. query x (1 query); an image the defense already gets wrong is returned as is;
    2. d = (1, ..., 1); candidate d' = d with block k of level s flipped (`rays_blocks`; k runs
       over the 2**s blocks, then s + 1; past one value per block, back to s = 0);
    3. while no adversarial radius is known: x(r) at r = j / `linear_steps`, j = 1 ..
       `linear_steps` (a hit starts the binary search in ((j-1)/steps, j/steps]); once r_best
       is known: one query at r_best along d' (the paper's check: d' can only help if x(r_best)
       is adversarial along it), a hit starts the binary search in [0, r_best];
    4. binary search to `tol`, then d = d', r_best = the adversarial end; the image succeeds and
       stops as soon as an adversarial x(r) with r <= eps has been queried.

    Args:
        oracle: a `QueryOracle` (labels / verdicts suffice) or what `as_oracle` takes.
        x: float32 [n, H, W, C] in [0, 1]; y: true labels int [n].
        eps: L∞ radius of success; max_queries: budget per image (>= 1, the clean query).
        seed: unused by the search itself (RayS is deterministic given the answers); kept
            for the harness's query-attack interface.
        norm: "linf" only. linear_steps, tol: as above. batch_size: of the in-process defense.
        verbose: 1 shows a progress bar over the query rounds.
        monitor: a `QueryMonitor` (or its options) in front of the endpoint the oracle is
            built for (`as_oracle`; not with a ready `QueryOracle`, which has its own).

    Returns:
        x_adv float32 [n, H, W, C] within the ball and [0, 1] (x where the attack failed);
        record {"queries" int64 [n], "success" bool [n], "verdict", "label" [n] (defended
        outputs of x_adv), "radius" float32 [n] (smallest adversarial L∞ radius found along the
        search, inf if none)}.
    """
    del seed
    _check_linf_budget("api_rays", norm, eps, max_queries)
    if int(linear_steps) < 1 or not tol > 0:
        raise ValueError(f"linear_steps must be >= 1 and tol > 0, got {linear_steps}, {tol}")
    x, y = _check_batch(x, y)
    o = as_oracle(oracle, batch_size, monitor, decisions_only=True)
    n, max_queries, steps = len(x), int(max_queries), int(linear_steps)
    radius = np.full(n, np.inf, np.float32)
    if n == 0:
        return _empty_result(x, radius=radius)
    ids, base, success, best = _clean_answers(o, x, y)
    radius[success] = 0.0
    x_adv = x.copy()
    flat = x.reshape(n, -1)
    size = flat.shape[1]
    d = np.ones_like(flat)  # accepted direction
    cand = d.copy()  # direction being tried
    level, block = np.zeros(n, np.int64), np.zeros(n, np.int64)
    state = np.full(n, _LINEAR)
    step_j = np.ones(n, np.int64)  # linear search: next radius j / steps
    lo, hi = np.zeros(n), np.zeros(n)

    def next_direction(i):
        """Image i moves on to the next block flip of its accepted direction."""
        if 2 ** level[i] > size:
            level[i], block[i] = 0, 0
        cand[i] = d[i]
        cand[i, rays_blocks(int(level[i]), int(block[i]), size)] *= -1.0
        block[i] += 1
        if block[i] == 2 ** level[i]:
            level[i], block[i] = level[i] + 1, 0
        state[i] = _PROBE if np.isfinite(radius[i]) else _LINEAR
        step_j[i] = 1

    for _, act in _rounds(max_queries, success, verbose):
        r = np.where(state[act] == _LINEAR, step_j[act] / steps,
                     np.where(state[act] == _PROBE, radius[act], (lo[act] + hi[act]) / 2))
        rows = np.clip(flat[act] + r[:, None].astype(np.float32) * cand[act], 0.0, 1.0)
        out = o.query(rows.reshape(len(act), *x.shape[1:]), act)
        adv = is_success(out, y[act])
        for k, i in enumerate(act):
            if adv[k] and r[k] <= eps:  # an adversarial within the ball: done
                success[i], radius[i] = True, r[k]
                x_adv[i] = rows[k].reshape(x.shape[1:])
                best["label"][i], best["verdict"][i] = out["label"][k], out["verdict"][k]
                continue
            if state[i] == _LINEAR:
                if adv[k]:
                    state[i], lo[i], hi[i] = _BISECT, (step_j[i] - 1) / steps, r[k]
                elif step_j[i] >= steps:
                    next_direction(i)
                else:
                    step_j[i] += 1
            elif state[i] == _PROBE:
                if adv[k]:
                    state[i], lo[i], hi[i] = _BISECT, 0.0, r[k]
                else:
                    next_direction(i)
            else:
                if adv[k]:
                    hi[i] = r[k]
                else:
                    lo[i] = r[k]
            if state[i] == _BISECT and hi[i] - lo[i] <= tol:
                d[i], radius[i] = cand[i], hi[i]
                next_direction(i)
    linf = np.abs(x_adv - x).reshape(n, -1).max(axis=1)
    return x_adv, _record(o.since(base, ids), success, best, radius=radius, linf=linf)


# ----------------------------------------------------------------------------- corners


def corner_direction(k: int, rng, shape) -> np.ndarray:
    """float32 [*shape]: the k-th corner direction of `api_corners` (k >= 0): all ones, all
    minus ones (a uniform brightness shift each way), then sign vectors drawn from `rng`."""
    if k < 2:
        return np.full(shape, 1.0 if k == 0 else -1.0, np.float32)
    return rng.choice(np.float32([-1.0, 1.0]), size=shape)


def api_corners(oracle, x, y, eps: float = 0.1, max_queries: int = 20, seed: int = 0,
                norm: str = "linf", batch_size: int = 64, verbose: int = 0,
                monitor=None):
    """Corners of the L∞ ball, no search: the floor every query attack must beat;
    (x_adv, record).

    Per image (all images batched, one query per image and round): query x; an image the
    defense already gets wrong is returned as is. Then, while the budget lasts,

        x_k = clip(x + eps · d_k, 0, 1),  d_0 = (1, ..., 1),  d_1 = -d_0,  d_k ~ U{-1, 1}^D

    (`corner_direction`), until one is accepted with a wrong label (`is_success`; a rejection
    is not adversarial). It reads decisions only and never adapts to an answer: what it fools
    a model with is a property of the model at that radius (a brightness shift, or noise), not
    of a clever search.

    Args:
        oracle: a `QueryOracle` (labels / verdicts suffice) or what `as_oracle` takes.
        x: float32 [n, H, W, C] in [0, 1]; y: true labels int [n].
        eps: L∞ radius; max_queries: budget per image (>= 1, the clean query).
        seed: of the random sign vectors (one stream per image, keyed by its pixels: the
            same image meets the same corners in any batch).
        norm: "linf" only. batch_size: of the in-process defense.
        verbose: 1 shows a progress bar over the query rounds.
        monitor: a `QueryMonitor` (or its options) in front of the endpoint the oracle is
            built for (`as_oracle`; not with a ready `QueryOracle`).

    Returns:
        x_adv float32 [n, H, W, C] (x where the attack failed); record {"queries" int64 [n],
        "success" bool [n], "verdict", "label" [n] (defended outputs of x_adv), "corner" int64
        [n] (k of the corner that succeeded, -1 for none or the clean image), "linf" [n]}.
    """
    _check_linf_budget("api_corners", norm, eps, max_queries)
    x, y = _check_batch(x, y)
    o = as_oracle(oracle, batch_size, monitor, decisions_only=True)
    n, max_queries = len(x), int(max_queries)
    corner = np.full(n, -1, np.int64)
    if n == 0:
        return _empty_result(x, corner=corner)
    ids, base, success, best = _clean_answers(o, x, y)
    x_adv = x.copy()
    rngs = [np.random.default_rng([int(seed), int.from_bytes(_digest(row)[:8], "little")])
            for row in x]
    for k, act in _rounds(max_queries, success, verbose):
        rows = np.stack([np.clip(x[i] + np.float32(eps) * corner_direction(k, rngs[i],
                                                                           x.shape[1:]), 0, 1)
                         for i in act]).astype(np.float32)
        out = o.query(rows, act)
        adv = is_success(out, y[act])
        hit = act[adv]
        success[hit], corner[hit], x_adv[hit] = True, k, rows[adv]
        best["label"][hit], best["verdict"][hit] = out["label"][adv], out["verdict"][adv]
    linf = np.abs(x_adv - x).reshape(n, -1).max(axis=1)
    return x_adv, _record(o.since(base, ids), success, best, corner=corner, linf=linf)


# ----------------------------------------------------------------------------- HopSkipJump


class _Stop(Exception):
    """Raised inside ART's HopSkipJump to end the attack of one image (budget spent, or an
    adversarial within the radius found)."""


def _digest(row) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row, np.float32).tobytes(),
                           digest_size=16).digest()


class _DecisionFunction:
    """ART's view of the oracle for one image: a two-class "classifier" answering [1, 0] (not
    adversarial: rejected, or the defended label is the true label) or [0, 1] (adversarial).

    Every new image it is asked about costs one query charged to the attacked image; answers
    are remembered by the image's bytes (asking again is free). It keeps the adversarial image
    nearest in L2 to the original and raises `_Stop` when the budget is spent (answering the
    rows the budget still covered first) or, with `eps`, once one lies within L2 `eps`.
    """

    def __init__(self, oracle, x, y, index, budget, eps):
        self.oracle, self.x, self.y, self.index = oracle, x, y, index
        self.budget, self.eps = budget, eps
        self.memo = {}
        self.best, self.best_l2, self.best_out = None, np.inf, None

    def remaining(self) -> int:
        return self.budget - int(self.oracle.used([self.index])[0])

    def remember(self, rows, out):
        won = is_success(out, self.y)
        for k, row in enumerate(rows):
            self.memo[_digest(row)] = bool(won[k])
            if won[k]:
                l2 = float(np.linalg.norm((row - self.x).ravel()))
                if l2 < self.best_l2:
                    self.best, self.best_l2 = row.copy(), l2
                    self.best_out = {"label": out["label"][k], "verdict": out["verdict"][k]}

    def ask(self, rows) -> np.ndarray:
        """bool [b]: adversarial or not, querying the rows not seen before."""
        rows = np.clip(np.asarray(rows, np.float32), 0.0, 1.0)
        digests = [_digest(r) for r in rows]
        first = {}  # digest of an image not seen before -> its first row
        for k, d in enumerate(digests):
            if not np.all(np.isfinite(rows[k])):  # a degenerate step: never sent, never adv.
                self.memo[d] = False
            elif d not in self.memo:
                first.setdefault(d, k)
        new = list(first.values())
        allowed = new[: max(self.remaining(), 0)]
        if allowed:
            out = self.oracle.query(rows[allowed], np.full(len(allowed), self.index))
            self.remember(rows[allowed], out)
        if len(allowed) < len(new) or (self.eps is not None and self.best_l2 <= self.eps):
            raise _Stop
        return np.array([self.memo[d] for d in digests], bool)

    def __call__(self, rows) -> np.ndarray:
        adv = self.ask(rows)
        return np.stack([~adv, adv], axis=1).astype(np.float32)


def _noise_start(decide, rng, shape, tries: int, chunk: int = 10):
    """A uniform-noise image the defense takes as adversarial (HopSkipJump's own start), from
    at most `tries` queries in chunks of `chunk`; None if none is."""
    for start in range(0, tries, chunk):
        rows = rng.uniform(size=(min(chunk, tries - start), *shape)).astype(np.float32)
        adv = decide.ask(rows)
        if adv.any():
            return rows[np.argmax(adv)]
    return None


def api_hop_skip_jump(oracle, x, y, max_queries: int = 1000, seed: int = 0, eps=None,
                      norm: str = "l2", init_eval: int = 100, max_eval: int = 10000,
                      init_size: int = 100, batch_size: int = 64, verbose: int = 0,
                      monitor=None):
    """Untargeted L2 HopSkipJump from the defended decision only; (x_adv, record).

    The attacker's decision for image (x, y) is adversarial(x') = `is_success`: accepted
    (verdict != 2) and label != y. A rejected x' is *not* adversarial (it looks like the true
    class to ART). Per image, in order:

    1. query all clean images once (1 query each): an image the defense already gets wrong is
       returned as is; the others form the pool of starting points;
    2. start: the pool image nearest in L2 whose defended output is adversarial for y (accepted,
       another label: a natural image of another class, no extra query), else uniform noise
       images (HopSkipJump's own start, at most `init_size` queries);
    3. ART's HopSkipJump (binary search to the boundary, gradient-direction estimate from
       n_t = min(init_eval·sqrt(t + 1), max_eval) queries, geometric step search) until the
       budget is spent, or, with `eps`, an adversarial lies within L2 `eps`.

    The result is the adversarial image nearest to x among all those queried (HopSkipJump's
    iterate is one of them); with `eps`, one farther than `eps` does not count and x is
    returned (the attack failed within the budget).

    Args:
        oracle: a `QueryOracle` (labels / verdicts suffice) or what `as_oracle` takes.
        x: float32 [n, H, W, C] in [0, 1]; y: true labels int [n].
        max_queries: budget per image (>= 1, the clean query included).
        seed: seeds the noise starts and ART's draws (NumPy's global generator, restored after).
        eps: L2 radius of success, or None (unbounded: the nearest adversarial found).
        norm: "l2" only (the harness passes the budget's norm).
        init_eval, max_eval, init_size: HopSkipJump's (and ART's) gradient-estimate sizes and
            noise-start tries.
        batch_size: images per oracle call (ART's batch size) and of the in-process defense.
        verbose: 1 shows a progress bar over the attacked images.
        monitor: a `QueryMonitor` (or its options) in front of the endpoint the oracle is
            built for (`as_oracle`; not with a ready `QueryOracle`, which has its own).

    Returns:
        x_adv float32 [n, H, W, C] in [0, 1]; record {"queries" int64 [n], "success" bool [n],
        "verdict", "label" [n] (defended outputs of x_adv), "l2" float32 [n] (of the nearest
        adversarial found, inf if none)}.
    """
    if norm not in ("l2", 2):
        raise ValueError(f"api_hop_skip_jump is an L2 attack (norm='l2'), got norm={norm!r}; "
                         "for L∞ use api_square")
    if eps is not None and not eps > 0:
        raise ValueError(f"eps must be > 0 or None, got {eps}")
    if int(max_queries) < 1:
        raise ValueError(f"max_queries must be >= 1 (the clean query), got {max_queries}")
    x, y = _check_batch(x, y)
    o = as_oracle(oracle, batch_size, monitor, decisions_only=True)
    n = len(x)
    ids = np.arange(n)
    x_adv = x.copy()
    l2 = np.full(n, np.inf, np.float32)
    if n == 0:
        return x_adv, _record({"queries": np.zeros(0)}, np.zeros(0, bool),
                              {"verdict": np.zeros(0), "label": np.zeros(0)}, l2=l2)
    base = o.counts(ids)
    clean = o.query(x, ids)
    best = {"label": clean["label"].astype(np.int64), "verdict": clean["verdict"].astype(np.int32)}
    success = is_success(clean, y)
    l2[success] = 0.0
    rng = np.random.default_rng(seed)
    art_params = dict(init_eval=int(init_eval), max_eval=int(max_eval),
                      max_iter=int(max_queries), batch_size=int(batch_size))
    state = np.random.get_state()
    np.random.seed(seed % 2**32)  # ART draws its directions from NumPy's global generator
    todo = np.flatnonzero(~success)
    progress = _Progress(len(todo), verbose, unit="image")
    try:
        for done, i in enumerate(todo):
            progress.update(done, success)
            decide = _DecisionFunction(o, x[i], y[i], i, base["queries"][i] + int(max_queries),
                                       eps)
            _hsj_one(decide, x, clean, i, rng, init_size, art_params)
            if decide.best is not None:
                l2[i] = decide.best_l2
            if decide.best is not None and (eps is None or decide.best_l2 <= eps):
                x_adv[i], success[i] = decide.best, True
                best["label"][i] = decide.best_out["label"]
                best["verdict"][i] = decide.best_out["verdict"]
    finally:
        np.random.set_state(state)
    progress.update(len(todo), success, finalize=True)
    return x_adv, _record(o.since(base, ids), success, best, l2=l2)


def _hsj_one(decide, x, clean, i, rng, init_size, art_params):
    """HopSkipJump on image i of x (through `decide`) from the nearest pool image the defense
    takes as adversarial for it (`clean`: outputs of the clean batch), else a noise start."""
    def outputs(j):
        return {k: clean[k][j : j + 1] for k in ("label", "verdict")}

    decide.remember(x[i][None], outputs(i))
    pool = np.flatnonzero(is_success(clean, decide.y) & (np.arange(len(x)) != i))
    try:
        if len(pool):
            j = pool[np.argmin(np.linalg.norm((x[pool] - x[i]).reshape(len(pool), -1), axis=1))]
            start = x[j]
            decide.remember(start[None], outputs(j))  # an adversarial found at no extra cost
        else:
            start = _noise_start(decide, rng, x.shape[1:], init_size)
        if start is not None:
            _run_art_hsj(decide, x[i], start, **art_params)
    except _Stop:
        pass


def _run_art_hsj(decide, x, start, init_eval, max_eval, max_iter, batch_size):
    """ART's untargeted L2 HopSkipJump on one image x [H, W, C] from `start`, asking `decide`
    (class 0: not adversarial, the class of x; class 1: adversarial)."""
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    classifier = BlackBoxClassifier(decide, input_shape=tuple(x.shape), nb_classes=2,
                                    clip_values=(0.0, 1.0))
    attack = HopSkipJump(classifier, targeted=False, norm=2, max_iter=max_iter,
                         max_eval=max(max_eval, init_eval), init_eval=init_eval, init_size=1,
                         batch_size=batch_size, verbose=False)
    attack.generate(x[None].copy(), y=np.float32([[1.0, 0.0]]), x_adv_init=start[None].copy())
