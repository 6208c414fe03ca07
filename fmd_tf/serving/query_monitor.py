"""Stateful detection of query-based attacks in front of a served model (Blacklight).

A query-based black-box attack (Square, RayS, HopSkipJump) sends hundreds of images that differ
from each other in a few pixels. Blacklight (Li, Shan, Wenger, Zhang, Zheng & Zhao, "Blacklight:
Scalable Defense for Neural Networks against Query-Based Black-Box Attacks", USENIX Security
2022) flags such a query by its pixel content alone, whatever account sends it: every query
leaves a probabilistic fingerprint in a store, and a query whose fingerprint shares at least
`threshold` entries with one stored query is rejected. Benign images are rarely that close to
each other; an attack's consecutive queries are.

Fingerprint (`fingerprints`), per image x [H, W, C] in [0, 1]:

    q = floor(255·x / step)                    quantized pixels, flattened to P = H·W·C values
    h_i = mix(Σ_k q[i + k]·B^(w-1-k) mod 2^64)  one hash per window of w consecutive values
    F(x) = the `top_k` smallest distinct h_i    over the windows that are not constant

Blacklight takes SHA-256 of each window; a polynomial hash with a 64-bit finalizer (`_mix`,
SplitMix64) does the same job vectorized. Windows whose w quantized values are all equal (a flat
background) are left out: every image has them, so they say nothing about which image it is.
Quantization makes the fingerprint blind to perturbations smaller than `step`/255 on most
pixels, which is what lets it link an attack's queries.

`QueryMonitor.check(x)` fingerprints each row, counts for each stored query how many of its
hashes the row shares, flags the row when the largest count reaches `threshold`, and stores the
row (flagged or not, as Blacklight). Defaults are Blacklight's MNIST setting (step 50, w 20,
top 50, threshold 25); `scripts/query_monitor.py` measures the share of a stream of clean images
each threshold flags (the benign false-positive rate).

Where it sits: TF Serving is stateless, so the monitor runs in the gateway that receives user
requests and forwards them to the server (the model never sees a flagged query). In the
evaluation, `fmd_tf.attacks.api_attacks.QueryOracle(monitor=...)` puts it in front of the
defense; a flagged query is answered as rejected (label -1, verdict 2, no scores).

Limits (say them next to any number): the store grows with every query (memory ~ queries ·
top_k · 40 bytes here; Blacklight bounds it by time); an attacker who knows the monitor can
space its queries out (large random steps, transforms between queries; Feng et al., "Stateful
Defenses for Machine Learning Models Are Not Yet Secure Against Black-box Attacks", CCS 2023),
and a benign user who sends the same image twice is rejected the second time.
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field

import numpy as np

__all__ = ["QueryMonitor", "benign_report", "fingerprints", "stream_flags"]

_BASE = np.uint64(1_000_003)  # B: any odd multiplier well above the number of levels


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on uint64 values (a bijection that spreads nearby inputs)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def fingerprints(x, step: int = 50, window: int = 20, top_k: int = 50) -> list[np.ndarray]:
    """Blacklight fingerprints of images (see the module docstring).

    Args:
        x: float [b, H, W, C] (or [b, P]) in [0, 1].
        step: quantization step on the 0-255 scale (Blacklight's MNIST value: 50).
        window: w, consecutive flattened values per hash.
        top_k: hashes kept per image (the smallest distinct ones).

    Returns:
        b arrays of uint64, each the sorted distinct hashes of one image: `top_k` of them, fewer
        when the image has fewer distinct non-constant windows (none for a flat image).
    """
    x = np.asarray(x, np.float32)
    flat = x.reshape(len(x), -1)
    if flat.shape[1] < window:
        raise ValueError(f"images of {flat.shape[1]} values are smaller than the window "
                         f"({window})")
    q = np.floor(np.clip(flat, 0.0, 1.0) * (255.0 / step)).astype(np.uint64)
    n = flat.shape[1] - window + 1
    h = np.zeros((len(x), n), np.uint64)
    lo, hi = q[:, :n].copy(), q[:, :n].copy()
    for k in range(window):
        part = q[:, k:k + n]
        h = h * _BASE + part  # wraps modulo 2^64
        lo, hi = np.minimum(lo, part), np.maximum(hi, part)
    h = _mix(h)
    varied = lo != hi
    return [np.unique(row[keep])[:top_k] for row, keep in zip(h, varied, strict=True)]


@dataclass
class QueryMonitor:
    """Blacklight's store and rule (module docstring): `check` flags queries close to an
    earlier one. `recent` bounds the stored query ids kept per hash (the most recent ones), so
    that a hash common to many images costs bounded work per query."""

    threshold: int = 25
    step: int = 50
    window: int = 20
    top_k: int = 50
    recent: int = 256
    _store: dict = field(default_factory=dict, init=False, repr=False)
    queries: int = field(default=0, init=False)
    flagged: int = field(default=0, init=False)

    def __post_init__(self):
        for name in ("threshold", "step", "window", "top_k", "recent"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"QueryMonitor {name} must be an int >= 1, got {value!r}")
        if self.threshold > self.top_k:
            raise ValueError(f"threshold ({self.threshold}) above top_k ({self.top_k}) flags "
                             "nothing")

    def matches(self, fingerprint) -> int:
        """Largest number of hashes `fingerprint` shares with one stored query."""
        counts = collections.Counter()
        for h in fingerprint.tolist():
            ids = self._store.get(h)
            if ids:
                counts.update(ids)
        return max(counts.values(), default=0)

    def check(self, x) -> tuple[np.ndarray, np.ndarray]:
        """(flagged bool [b], matches int64 [b]) for the images x [b, ...] in [0, 1], taken in
        row order (a row can match an earlier row of the same batch); every row is stored."""
        found = fingerprints(x, self.step, self.window, self.top_k)
        matched = np.zeros(len(found), np.int64)
        for i, fp in enumerate(found):
            matched[i] = self.matches(fp)
            for h in fp.tolist():
                self._store.setdefault(h, collections.deque(maxlen=self.recent)).append(
                    self.queries)
            self.queries += 1
        flags = matched >= self.threshold
        self.flagged += int(flags.sum())
        return flags, matched

    def reset(self) -> None:
        """Forget every stored query (counts too)."""
        self._store.clear()
        self.queries = self.flagged = 0


def stream_flags(x, thresholds, **options) -> dict:
    """Share of a stream of images flagged at each threshold: the images of `x` [n, ...] are
    sent one after another to a fresh `QueryMonitor(**options)` (a benign stream for a false-
    positive rate, an attack's queries for a detection rate). Returns {"n", "matches" (each
    image's count, int [n]), "flagged": {threshold: share}}."""
    monitor = QueryMonitor(threshold=max(thresholds), **options)
    _, matched = monitor.check(x)
    return {"n": int(len(x)), "matches": matched,
            "flagged": {int(t): float(np.mean(matched >= t)) for t in thresholds}}


def benign_report(dataset: str = "fmnist", seed: int = 0,
                  thresholds=(10, 15, 20, 25, 30, 35), **options) -> dict:
    """The monitor's false-positive rate on benign traffic: the paper's VAL and CLE images of
    `dataset` (`fmd_tf.data.make_splits`, split `seed`, sizes fitted to the data), each set
    sent as one stream of single clean queries to a fresh `QueryMonitor(**options)`. Returns
    the options, and per stream the share flagged at each threshold and quantiles of the match
    counts."""
    from fmd_tf.config import SplitConfig
    from fmd_tf.data import fit_split_config, load_dataset, make_splits

    train, test = load_dataset(dataset)
    splits = make_splits(train, test, fit_split_config(SplitConfig(), len(train[0]),
                                                       len(test[0])), seed)
    QueryMonitor(threshold=max(thresholds), **options)  # checks the options and thresholds
    defaults = {f.name: f.default for f in dataclasses.fields(QueryMonitor) if f.init}
    options = {**{k: v for k, v in defaults.items() if k != "threshold"}, **options}
    streams = {}
    for name, x in (("val", splits.x_val), ("cle", splits.x_cle)):
        out = stream_flags(x, thresholds, **options)
        q = np.percentile(out["matches"], [50, 99, 100])
        streams[name] = {"n": out["n"], "flagged": out["flagged"],
                         "matches_p50_p99_max": [float(v) for v in q]}
    return {"dataset": dataset, "seed": seed, "options": options,
            "default_threshold": defaults["threshold"], "streams": streams}
