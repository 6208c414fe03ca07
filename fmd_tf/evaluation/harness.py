"""Evaluation harness: cached adversarial sets and per-defense metrics (paper §IV, Table II)."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import time
import zipfile
from typing import NamedTuple

import numpy as np

from fmd_tf.evaluation import metrics
from fmd_tf.files import atomic_path

# fmd_tf.defense.calibration is NumPy only, but its package imports TensorFlow: it is imported
# where it is used, so that the attack tables below load without TensorFlow (fast usage errors
# in the scripts).

class Attack(NamedTuple):
    """One attack of the harness: `function` (a name in `fmd_tf.attacks`) with default
    `params`, run on `target`:

    * "classifier": the defended classifier alone (oblivious to the defense);
    * "surrogate": an independently trained classifier (`evaluate(surrogate=)`), transferred;
    * "defense": the whole FMDefense, white-box (adaptive);
    * "endpoint": the defense's public outputs only (the attacker of a served model).

    A `function` named ``api_*`` (`fmd_tf.attacks.api_attacks`) is query-based: it takes
    `seed=` and `verbose=` and returns (x_adv, per-image record); on "classifier" it queries
    the undefended classifier's labels (a reference: how the attack fares without the defense).

    `budgeted`: run once per (norm, eps) of scripts/evaluate.py's --linf-eps / --l2-eps grid;
    `norm`: the one norm it is defined for ("linf" / "l2"), None when it takes either.
    `chunk`: made in pieces of that many images, each one the attack on those images alone
    and cached as it finishes, so that a run stopped midway resumes from its last finished
    piece (`adversarial_set`); None: in one piece.
    """

    function: str
    params: dict
    target: str = "classifier"
    budgeted: bool = False
    norm: str | None = None
    chunk: int | None = None


TARGETS = ("classifier", "surrogate", "defense", "endpoint")

# The attack table. Everything else about an attack (the groups below, the CLI's lists) is
# derived from its entry here.
ATTACKS = {
    "fgsm": Attack("fgsm", {"eps": 0.3}),
    "pgd": Attack("pgd", {"eps": 0.3, "eps_iter": 0.01, "nb_iter": 40}),
    "pgd_eps0.1": Attack("pgd", {"eps": 0.1, "eps_iter": 0.01, "nb_iter": 40}),
    "pgd_l2": Attack("pgd", {"eps": 2.0, "eps_iter": 0.1, "nb_iter": 40, "norm": "l2"}),
    "mim": Attack("mim", {"eps": 0.3, "eps_iter": 0.01, "nb_iter": 40}),
    "cw": Attack("carlini_wagner_l2", {"confidence": 0.0, "max_iterations": 100,
                                       "learning_rate": 0.1, "binary_search_steps": 5}),
    "deepfool": Attack("deepfool", {"overshoot": 0.02, "max_iterations": 50, "norm": "linf"}),
    # APGD-CE / APGD-DLR (Croce & Hein 2020; fmd_tf.attacks.apgd) on the classifier alone,
    # 100 steps: the robust classifier's own worst case, its images then sent to the defense.
    "classifier_apgd_ce": Attack("apgd", {"eps": 0.1, "norm": "linf", "loss": "ce",
                                          "nb_iter": 100}),
    "classifier_apgd_dlr": Attack("apgd", {"eps": 0.1, "norm": "linf", "loss": "dlr",
                                           "nb_iter": 100}),
    # ... and with the wrong-class margin loss (a wrong label that wins by κ 5 logits): the
    # attack on a classifier-margin gate (`margin_fpr`).
    "classifier_apgd_margin": Attack("apgd", {"eps": 0.1, "norm": "linf", "loss": "margin",
                                              "nb_iter": 100}),
    # Black-box attacks on the classifier (fmd_tf.attacks.black_box, ART): score-based with at
    # most 1,000 queries per image, and decision-based (labels only).
    "square": Attack("square", {"eps": 0.2, "max_queries": 1000}),
    "hopskipjump": Attack("hop_skip_jump", {"max_iter": 10, "max_eval": 100, "init_eval": 10}),
    # Transfer: made on an independently trained surrogate classifier (scripts/evaluate.py
    # --surrogate), never on the defended one.
    "transfer_pgd": Attack("pgd", {"eps": 0.3, "eps_iter": 0.01, "nb_iter": 40},
                           target="surrogate"),
    "transfer_mim": Attack("mim", {"eps": 0.3, "eps_iter": 0.01, "nb_iter": 40},
                           target="surrogate"),
    # High-confidence C&W-L2 on the classifier alone (Carlini & Wagner's attack on MagNet).
    "cw_hiconf": Attack("cw_high_confidence_transfer", {"kappa": 20.0, "max_iterations": 100,
                                                        "learning_rate": 0.1,
                                                        "binary_search_steps": 5},
                        budgeted=True),
    # Adaptive white-box attacks on the whole FM-Defense (fmd_tf.attacks.adaptive). One fresh
    # morph per code and step (EOT across the 40 steps) keeps a 500-image run affordable on a
    # CPU (each step costs m decoder+classifier passes per image, forward and backward).
    "adaptive_pgd": Attack("adaptive_pgd", {"eps": 0.1, "norm": "linf", "nb_iter": 40,
                                            "eot_samples": 1, "purified_weight": 1.0},
                           target="defense", budgeted=True),
    "adaptive_resistance": Attack("adaptive_resistance", {"eps": 0.1, "norm": "linf",
                                                          "nb_iter": 40, "eot_samples": 1},
                                  target="defense", budgeted=True),
    # APGD-CE / APGD-DLR (Croce & Hein 2020) on the whole FM-Defense through the same
    # surrogate (fmd_tf.attacks.apgd): 100 steps, EOT over 8 morphs per code and step. Each
    # step costs 8·m decoder+classifier passes per image when a resistance threshold can flag
    # (about 29 min per 500 images on 2 CPU cores; 2 min when none can, as on the robust mode),
    # so run at one budget (`pinned_budget`: apgd_ce_linf_0.1).
    "apgd_ce": Attack("adaptive_apgd", {"eps": 0.1, "norm": "linf", "nb_iter": 100,
                                        "loss": "ce", "eot_samples": 8},
                      target="defense", budgeted=True),
    "apgd_dlr": Attack("adaptive_apgd", {"eps": 0.1, "norm": "linf", "nb_iter": 100,
                                         "loss": "dlr", "eot_samples": 8},
                       target="defense", budgeted=True),
    "apgd_margin": Attack("adaptive_apgd", {"eps": 0.1, "norm": "linf", "nb_iter": 100,
                                            "loss": "margin", "eot_samples": 8},
                          target="defense", budgeted=True),
    # Black-box attacks on the defended endpoint through its public outputs
    # (fmd_tf.attacks.api_attacks; the threat model of a TF Serving client), 1,000 or 5,000
    # queries per image, each a defended forward pass: GPU-sized at n = 500. Square reads
    # scores (the `classify` logits and the resistances); RayS (L∞) and HopSkipJump (L2) read
    # decisions only (label and verdict; rejected = not adversarial). `rays` is RayS on the
    # undefended classifier's labels: the reference for `api_rays`. The 5,000-query runs take
    # hours per 100 images on a CPU: they are made in pieces of 20 images that a stopped run
    # resumes from (`chunk`).
    "rays": Attack("api_rays", {"eps": 0.1, "norm": "linf", "max_queries": 1000},
                   budgeted=True, norm="linf"),
    "api_square": Attack("api_square", {"eps": 0.1, "norm": "linf", "max_queries": 1000},
                         target="endpoint", budgeted=True, norm="linf"),
    "api_square_5k": Attack("api_square", {"eps": 0.1, "norm": "linf", "max_queries": 5000},
                            target="endpoint", budgeted=True, norm="linf", chunk=20),
    "api_rays": Attack("api_rays", {"eps": 0.1, "norm": "linf", "max_queries": 1000},
                       target="endpoint", budgeted=True, norm="linf"),
    "api_rays_5k": Attack("api_rays", {"eps": 0.1, "norm": "linf", "max_queries": 5000},
                          target="endpoint", budgeted=True, norm="linf", chunk=20),
    "api_hopskipjump": Attack("api_hop_skip_jump", {"eps": 1.5, "norm": "l2",
                                                    "max_queries": 1000},
                              target="endpoint", budgeted=True, norm="l2"),
    "api_hopskipjump_5k": Attack("api_hop_skip_jump", {"eps": 1.5, "norm": "l2",
                                                       "max_queries": 5000},
                                 target="endpoint", budgeted=True, norm="l2", chunk=20),
    # The corners of the L∞ ball (brightness shifts, then random sign vectors), no search: the
    # floor of the attacks above; 20 queries.
    "api_corners": Attack("api_corners", {"eps": 0.1, "norm": "linf", "max_queries": 20},
                          target="endpoint", budgeted=True, norm="linf"),
    # Square, RayS and HopSkipJump behind a Blacklight query monitor
    # (fmd_tf.serving.query_monitor, its default options): queries it flags are rejected before
    # they reach the defense.
    "api_square_monitored": Attack("api_square", {"eps": 0.1, "norm": "linf",
                                                  "max_queries": 1000, "monitor": {}},
                                   target="endpoint", budgeted=True, norm="linf"),
    "api_rays_monitored": Attack("api_rays", {"eps": 0.1, "norm": "linf", "max_queries": 1000,
                                              "monitor": {}},
                                 target="endpoint", budgeted=True, norm="linf"),
    "api_hopskipjump_monitored": Attack("api_hop_skip_jump", {"eps": 1.5, "norm": "l2",
                                                              "max_queries": 1000,
                                                              "monitor": {}},
                                        target="endpoint", budgeted=True, norm="l2"),
}
for _name, _attack in ATTACKS.items():
    if _attack.target not in TARGETS or _attack.norm not in (None, "linf", "l2"):
        raise ValueError(f"attack {_name!r}: target must be one of {TARGETS} and norm one of "
                         f"linf, l2, None; got {_attack.target!r}, {_attack.norm!r}")


def _named(test) -> tuple[str, ...]:
    return tuple(name for name, attack in ATTACKS.items() if test(attack))


# Attacks that get the whole FMDefense (not only its classifier); their cache key covers all of
# the defense's weights and config.
DEFENSE_AWARE = _named(lambda a: a.target in ("defense", "endpoint"))
# Query-based attacks (`fmd_tf.attacks.api_attacks`): they take seed= and verbose= and return
# (x_adv, per-image record).
QUERY_BASED = _named(lambda a: a.function.startswith("api_"))
# Attacks made on the surrogate classifier; their cache key covers its weights.
TRANSFER = _named(lambda a: a.target == "surrogate")
# Attacks with an (eps, norm) budget, expanded over scripts/evaluate.py's --linf-eps/--l2-eps.
BUDGETED = _named(lambda a: a.budgeted)
# Budgeted attacks defined for one norm only: the grid's radii of the other norm skip them.
ONE_NORM = {name: attack.norm for name, attack in ATTACKS.items() if attack.norm}

# Readers' names of the attack functions (`attack_label`).
_LABELS = {"fgsm": "FGSM", "pgd": "PGD", "mim": "MIM", "carlini_wagner_l2": "CW-L2",
           "deepfool": "DeepFool", "square": "Square", "hop_skip_jump": "HopSkipJump",
           "apgd": "APGD"}


def attack_label(name: str, params: dict | None = None) -> str:
    """A reader's name for the attack `name` of `ATTACKS` run with `params` (default: its own),
    e.g. "PGD L2 ε = 2", "APGD-DLR L∞ ε = 0.1", "Square L∞ ε = 0.2 (scores, 1,000 queries)" or
    "MIM L∞ ε = 0.3 transferred from another classifier"; `name` itself where there is none
    (the adaptive and endpoint attacks)."""
    attack = ATTACKS.get(name)
    if attack is None or attack.function not in _LABELS:
        return name
    params = attack.params if params is None else params
    label = _LABELS[attack.function] + (f"-{params['loss'].upper()}" if "loss" in params else "")
    norm = "L2" if params.get("norm") == "l2" else "L∞"
    if "eps" in params:
        label += f" {norm} ε = {params['eps']:g}"
    elif "norm" in params:
        label += f" {norm}"
    if attack.function == "square":
        label += f" (scores, {params['max_queries']:,} queries)"
    elif attack.function == "hop_skip_jump":
        label += " (labels only)"
    if attack.target == "surrogate":
        label += " transferred from another classifier"
    return label


# Table II of the paper, MNIST (classification accuracy %, "No defense" / "FM-Defense" /
# "MagNet"); the paper gives no Feature Squeezing column and no PGD row.
PAPER_TABLE_II_MNIST = {
    "fgsm": {"no_defense": 21.2, "fm_defense": 99.8, "magnet": 74.6},
    "cw": {"no_defense": 0.0, "fm_defense": 98.78, "magnet": 19.6},
    "deepfool": {"no_defense": 9.1, "fm_defense": 99.7, "magnet": None},
}


def classifier_fingerprint(model, weights=None) -> str:
    """sha256 (16 hex digits) of the classifier's weights (or of the arrays `weights`):
    adversarial caches are keyed by it."""
    h = hashlib.sha256()
    for w in model.get_weights() if weights is None else weights:
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()[:16]


_PINNED = re.compile(r"(?P<attack>\w+?)_(?P<norm>linf|l2)_(?P<eps>\d+(?:\.\d*)?|\.\d+)")


def pinned_budget(name: str) -> tuple[str, str, float] | None:
    """(attack, norm, eps) when `name` is one budget of a `BUDGETED` attack, written as
    `expand_budgets` names its run, with or without the ``adaptive_`` prefix:
    adaptive_apgd_ce_linf_0.1 and apgd_ce_linf_0.1 are ("apgd_ce", "linf", 0.1). None for
    any other name, and for a norm the attack is not defined for (`ONE_NORM`) or a radius of 0.
    """
    match = _PINNED.fullmatch(name)
    if match is None:
        return None
    attack, norm, eps = match["attack"], match["norm"], float(match["eps"])
    if attack not in BUDGETED and attack.startswith("adaptive_"):
        attack = attack[len("adaptive_"):]
    if attack not in BUDGETED or ONE_NORM.get(attack, norm) != norm or not eps > 0:
        return None
    return attack, norm, eps


# What an attack list may name (`known_attack`), for error messages and help texts.
ATTACK_NAMES = (f"known: {', '.join(ATTACKS)}; one budget of {', '.join(BUDGETED)} also as "
                "NAME_linf_EPS or NAME_l2_EPS (e.g. apgd_ce_linf_0.1), run at that budget only")


def known_attack(name: str) -> bool:
    """Whether `expand_budgets` takes `name`: an attack of `ATTACKS` or a `pinned_budget`."""
    return name in ATTACKS or pinned_budget(name) is not None


def expand_budgets(attacks, linf_eps=(), l2_eps=()) -> list[tuple[str, str, dict]]:
    """[(report name, attack, parameter overrides)] of a list of attack names.

    Attacks in `BUDGETED` are run once per budget of the grid (L∞ radii `linf_eps`, L2 radii
    `l2_eps`; those of `ONE_NORM` only at the radii of their norm) when a grid is given,
    reported as ``adaptive_<attack>_<norm>_<eps>`` (the ``adaptive_`` prefix is not doubled);
    without a grid (or none of their norm), and for the other attacks, once with their
    defaults under their own name (``adaptive_``-prefixed for `DEFENSE_AWARE` ones). A name
    that pins one budget (`pinned_budget`, e.g. apgd_ce_linf_0.1) runs at that budget only,
    whatever the grid: an expensive attack joins one threat model of a report whose cheaper
    attacks cover the whole grid. A run named twice is run once.
    """
    grid = [("linf", float(e)) for e in linf_eps] + [("l2", float(e)) for e in l2_eps]
    runs = {}
    for name in attacks:
        pinned = None if name in ATTACKS else pinned_budget(name)
        if pinned is None and name not in ATTACKS:
            raise ValueError(f"unknown attack {name!r}; {ATTACK_NAMES}")
        attack = name if pinned is None else pinned[0]
        stem = attack if attack.startswith("adaptive") else f"adaptive_{attack}"
        budgets = [pinned[1:]] if pinned else [
            (norm, eps) for norm, eps in grid if ONE_NORM.get(attack, norm) == norm]
        if attack not in BUDGETED or not budgets:
            runs.setdefault(stem if attack in DEFENSE_AWARE else attack, (attack, {}))
            continue
        for norm, eps in budgets:
            runs.setdefault(f"{stem}_{norm}_{eps:g}", (attack, {"eps": eps, "norm": norm}))
    return [(name, attack, params) for name, (attack, params) in runs.items()]


def defense_fingerprint(fmd) -> str:
    """sha256 (16 hex digits) of all of a defense's weights and its config. A classifier-margin
    gate that is off (θm = -inf, `margin_fpr` 0) is left out: a defense behaves as one saved
    before the gate existed, and keeps the fingerprint (and cached outputs) it had then."""
    weights = [w.numpy() for w in fmd.weights
               if not (w.path.endswith("theta_m") and w.numpy() == -np.inf)]
    h = hashlib.sha256(classifier_fingerprint(fmd, weights).encode())
    config = fmd.get_config()
    if config.get("margin_fpr") == 0.0:
        del config["margin_fpr"]
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def adversarial_set(attack: str, classifier, x, y, cache_dir: str | None, seed: int = 0,
                    params: dict | None = None, defense=None, surrogate=None, verbose: int = 0):
    """(x_adv, info): generated with `fmd_tf.attacks`, or loaded from the .npz cache when the
    attack, parameters, images and fingerprint all match.

    Attacks in `DEFENSE_AWARE` run on `defense` (an `FMDefense`, required for them) and are
    keyed by its fingerprint; those in `TRANSFER` run on `surrogate` (a classifier, required
    for them) and are keyed by its weights; the others run on `classifier`, keyed by its
    weights. Those in `QUERY_BASED` get `seed` and `verbose` (1: a progress bar over their
    query rounds) and add their per-image record (queries, success, ...) to `info["record"]`,
    cached with the images. An attack with a `chunk` runs on consecutive pieces of that many
    images, each cached as the attack on its own images, and the joined set is cached too:
    a run that was stopped makes only the pieces it had not finished (`info["seconds"]` adds
    up those of all pieces). Without a cache there is nothing to resume.
    """
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
    spec = ATTACKS[attack]
    params = {**spec.params, **(params or {})}
    target = classifier
    if attack in DEFENSE_AWARE:
        if defense is None:
            raise ValueError(f"attack {attack!r} needs the defense (defense=FMDefense)")
        target = defense
        fingerprint = "defense:" + defense_fingerprint(defense)
    elif attack in TRANSFER:
        if surrogate is None:
            raise ValueError(f"attack {attack!r} needs a surrogate classifier (surrogate=, "
                             "scripts/evaluate.py --surrogate)")
        target = surrogate
        fingerprint = "surrogate:" + classifier_fingerprint(surrogate)
    else:
        fingerprint = classifier_fingerprint(classifier)
    return _Run(attack, params, target, fingerprint, seed, verbose).cached(x, y, cache_dir,
                                                                          spec.chunk)


class _Run(NamedTuple):
    """One attack run as `adversarial_set` makes it: the function of `ATTACKS[attack]` with
    `params` on `target`, whose weights `fingerprint` names (part of the cache key)."""

    attack: str
    params: dict
    target: object
    fingerprint: str
    seed: int
    verbose: int

    def cached(self, x, y, cache_dir, chunk: int | None = None):
        """(x_adv, info) of the attack on x, y: from the cache, else made and cached; with more
        images than `chunk`, made in pieces of `chunk` images, each cached on its own."""
        chunk = chunk if chunk and len(x) > chunk else None
        key = _cache_key(self, x, **({"chunk": chunk} if chunk else {}))
        path = _cache_path(cache_dir, self.attack, len(x), key)
        cached = _read_cache_entry(path, key)
        if cached is not None:
            return _info(self.params, *cached, was_cached=True)
        if chunk:
            x_adv, seconds, record, was_cached = self.joined(x, y, cache_dir, chunk)
        else:
            (x_adv, seconds, record), was_cached = self.make(x, y), False
        if path:
            _write_cache_entry(path, key, x_adv, seconds, record)
        return _info(self.params, x_adv, seconds, record, was_cached=was_cached)

    def joined(self, x, y, cache_dir, chunk: int):
        """(x_adv, seconds, record or None, whether every piece came from the cache): the
        pieces of `chunk` images (`cached` each), joined; seconds add up."""
        pieces = [self.cached(x[i : i + chunk], y[i : i + chunk], cache_dir)
                  for i in range(0, len(x), chunk)]
        records = [info.get("record") for _, info in pieces]
        record = None if records[0] is None else {
            k: np.concatenate([r[k] for r in records]) for k in records[0]}
        return (np.concatenate([x_adv for x_adv, _ in pieces]),
                sum(info["seconds"] for _, info in pieces), record,
                all(info["cached"] for _, info in pieces))

    def make(self, x, y):
        """(x_adv, seconds, record or None): the attack run on x, y."""
        import keras

        import fmd_tf.attacks as attacks

        keras.utils.set_random_seed(self.seed)
        start = time.time()
        fn = getattr(attacks, ATTACKS[self.attack].function)
        extra = {"seed": self.seed, "verbose": self.verbose} \
            if self.attack in QUERY_BASED else {}
        if "y" in inspect.signature(fn).parameters:  # DeepFool attacks the predicted label
            x_adv = fn(self.target, x, y=y, **self.params, **extra)
        else:
            x_adv = fn(self.target, x, **self.params, **extra)
        record = None
        if self.attack in QUERY_BASED:
            x_adv, record = x_adv
        return x_adv, time.time() - start, record


def _cache_key(run: _Run, x, **extra) -> str:
    return json.dumps({"attack": run.attack, "params": run.params,
                       "classifier": run.fingerprint, "data": _images_hash(x),
                       "seed": run.seed, **extra}, sort_keys=True)


def _cache_path(cache_dir, attack: str, n: int, key: str):
    """The .npz file of `key` in `cache_dir` (created), None without a cache."""
    if not cache_dir:
        return None
    os.makedirs(cache_dir, exist_ok=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{attack}_{n}_{digest}.npz")


def _write_cache_entry(path, key, x_adv, seconds, record) -> None:
    stored = {f"{_RECORD}{k}": np.asarray(v) for k, v in (record or {}).items()}
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, x_adv=x_adv, key=key, seconds=seconds, **stored)


def _info(params, x_adv, seconds, record, was_cached: bool):
    """(x_adv, info) as `adversarial_set` returns them."""
    info = {"params": params, "seconds": seconds, "cached": was_cached}
    return x_adv, info if record is None else {**info, "record": record}


def _images_hash(x) -> str:
    """sha256 (16 hex digits) of the bytes of an image array: part of every cache key."""
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:16]


_RECORD = "record_"  # prefix of a query-based attack's record arrays in a cache entry


def _read_cache_entry(path, key):
    """(x_adv, seconds, record or None) stored at `path` for `key`; None without a path and as
    `_cache_arrays`."""
    f = _cache_arrays(path, key) if path else None
    if f is None or "x_adv" not in f or "seconds" not in f:
        return None
    record = {k[len(_RECORD):]: v for k, v in f.items() if k.startswith(_RECORD)}
    return f["x_adv"], float(f["seconds"]), record or None


def _cache_arrays(path, key) -> dict | None:
    """{name: array} of the .npz cache entry at `path` when it was written for `key`; None when
    there is no entry, it belongs to another key, or it cannot be read (truncated or damaged:
    the work is done again and the entry rewritten)."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as f:
            if str(f["key"]) != key:
                return None
            return {k: f[k] for k in f.files if k != "key"}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
        return None


_OUT = "out_"  # prefix of an output array in a defense-output cache entry


def defense_outputs(name: str, fingerprint: str, defend, x, cache_dir: str | None):
    """(outputs, cached): `defend(x)` (a dict of arrays, one row per image), or the outputs
    stored in the .npz cache when the defense `name`, its `fingerprint` (weights and settings)
    and the images all match. An evaluation stopped part-way thus resumes after the last set
    it defended, and a report re-run with every set cached costs no defense pass.

    Every defense here is deterministic (FM-Defense's morph offsets are weights, fixed at
    build time), so stored outputs are exactly those a new pass would give.
    """
    if not cache_dir:
        return defend(x), False
    key = json.dumps({"defense": name, "fingerprint": fingerprint, "images": _images_hash(x)},
                     sort_keys=True)
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"outputs_{name}_{len(x)}_"
                                   f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz")
    stored = _cache_arrays(path, key)
    if stored is not None:
        return {k[len(_OUT):]: v for k, v in stored.items() if k.startswith(_OUT)}, True
    out = defend(x)
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, key=key, **{f"{_OUT}{k}": np.asarray(v) for k, v in out.items()})
    return out, False


def fm_scores(out: dict, theta_r) -> np.ndarray:
    """Continuous FM-Defense detection score: max_i (θr(i) - r(i)); >= 0 means suspicious.

    `theta_r`: [m], or [n, m] with each row's own thresholds (an ensemble's members).

    Computed in float64 and rounded to 1e-6, so that values equal in exact arithmetic are
    ties: r(i) = k/n and θr(i) are float32, and e.g. θr(1) - r(1) = 0.025 - 0.97 and
    θr(0) - r(0) = -0.005 - 0.94 differ in their last bits, which broke ties between images at
    random and moved the shipped model's clean-vs-FGSM AUC by 0.003 (ties count 1/2 in
    `roc_auc`). Distinct values differ by far more than 1e-6 (r is k/n with n <= N).
    """
    theta_r = np.asarray(theta_r, np.float64)
    resistance = np.asarray(out["resistance"], np.float64)
    score = np.max((theta_r if theta_r.ndim == 2 else theta_r[None, :]) - resistance, axis=1)
    return np.round(score, 6)


# Clean false-positive rates at which every defense's score is also read (TPR at each): the
# same points for all, whatever FPR each defense's own threshold was calibrated at.
DETECTION_FPRS = (0.01, 0.05)


def tpr_key(fpr: float) -> str:
    """Report key of the TPR at clean FPR `fpr`: tpr_at_fpr_1pct for 0.01."""
    return f"tpr_at_fpr_{100 * fpr:g}pct"


def defense_metrics(clean: dict, adv: dict, y_clean, y_adv, score_key: str = "score") -> dict:
    """Report-schema metrics of one defense on one attack (outputs with label/verdict/score):
    the verdicts' TPR / FPR, and the continuous score's ROC AUC and TPR at `DETECTION_FPRS`
    (thresholds set on these clean images, `metrics.tpr_at_fpr`)."""
    tpr, fpr = metrics.detection_rates(clean["verdict"] != 0, adv["verdict"] != 0)
    return {
        "detection_tpr": tpr,
        "detection_fpr": fpr,
        "auc": metrics.roc_auc(clean[score_key], adv[score_key]),
        **{tpr_key(f): metrics.tpr_at_fpr(clean[score_key], adv[score_key], f)
           for f in DETECTION_FPRS},
        "defended_accuracy": metrics.defended_accuracy(adv["label"], adv["verdict"], y_adv, True),
        "purification_recall": metrics.purification_recall(adv["label"], adv["verdict"], y_adv),
        "paper_final_accuracy": metrics.paper_final_accuracy(clean, adv, y_clean, y_adv),
        "verdict_counts": np.bincount(adv["verdict"], minlength=3).tolist(),
    }


def clean_metrics(clean: dict, y) -> dict:
    verdict = clean["verdict"]
    return {
        "classifier_accuracy": float(np.mean(clean["classifier_label"] == y))
        if "classifier_label" in clean else None,
        "defended_accuracy": metrics.defended_accuracy(clean["label"], verdict, y, False),
        "rejected_rate": float(np.mean(verdict == 2)),
        "purified_rate": float(np.mean(verdict == 1)),
    }


def purified_labels(fmd, x, batch_size: int = 512) -> np.ndarray:
    """int64 [n]: the label each image of `x` would get if purified (the purifier alone, with
    the defense's own `purify_label` rule; an ensemble uses each image's member)."""
    import tensorflow as tf

    return np.concatenate([
        fmd._purify_valid(tf.convert_to_tensor(x[i : i + batch_size], tf.float32))["label"].numpy()
        for i in range(0, len(x), batch_size)
    ]) if len(x) else np.zeros([0], np.int64)


def val_outputs(fmd, x_val, resistance, recon_error, batch_size: int = 512) -> dict:
    """Stored-output dict of `fmd` on its clean VAL images, for `reverdict`, without morphs.

    `resistance` [n, m] and `recon_error` [n] are the VAL resistances and reconstruction errors
    the thresholds were calibrated on (e.g. val_resistance.npy); only the classifier labels and
    logit margins of the images and the labels of their purified versions are computed here.
    """
    import tensorflow as tf

    labels = [tf.argmax(fmd.classifier(tf.convert_to_tensor(x_val[i : i + batch_size],
                                                          tf.float32)), axis=-1).numpy()
              for i in range(0, len(x_val), batch_size)]
    return {"resistance": np.asarray(resistance), "recon_error": np.asarray(recon_error),
            "classifier_label": np.concatenate(labels), "margin": fmd.logit_margins(x_val),
            "purified_label": purified_labels(fmd, x_val, batch_size)}


def reverdict(out: dict, theta_r, theta_d, theta_e=np.inf, theta_m=-np.inf) -> dict:
    """Verdicts and final labels of stored FM-Defense outputs under other thresholds.

    Needs `purified_label` (`purified_labels`: the label the purifier gives) in `out`,
    `recon_error` when the reconstruction gate θe is finite and `margin` (`logit_margins`)
    when the classifier-margin gate θm is.
    """
    from fmd_tf.defense import calibration

    theta_r = np.asarray(theta_r)
    suspicious = calibration.is_suspicious(out["resistance"], theta_r)
    dist = calibration.distance(out["resistance"], theta_r)
    verdict = np.where(suspicious, np.where(dist <= theta_d, 1, 2), 0)
    if np.isfinite(theta_e):
        verdict = np.where(out["recon_error"] > theta_e, 2, verdict)
    if np.isfinite(theta_m):
        verdict = np.where(out["margin"] < theta_m, 2, verdict)
    label = np.where(verdict == 0, out["classifier_label"],
                     np.where(verdict == 1, out["purified_label"], -1))
    return {"verdict": verdict, "label": label}


def operating_point_thresholds(fmd, r_val, e_val, mode: str, rho: float, recon_fpr: float):
    """(θr [m], θd, θe) that `fmd.calibrate` would set at (`mode`, `rho`, `recon_fpr`) on the
    VAL resistances `r_val` [n, m] and reconstruction errors `e_val` [n] (no morphs); θd as the
    verdicts use it (-inf when `fmd.suspicious` is "reject": `calibration.purify_threshold`)."""
    from fmd_tf.defense import calibration

    theta_r = calibration.resistance_thresholds(r_val, rho, mode, fmd.num_morphs)
    theta_d, _ = calibration.distance_threshold(
        r_val, theta_r, fmd.eta, mode, fmd.num_morphs, fmd.min_suspicious, fmd.eta_reference_rho)
    return (theta_r, calibration.purify_threshold(theta_d, fmd.suspicious),
            calibration.recon_threshold(e_val, recon_fpr))


def theta_d_entry(theta_d) -> float | None:
    """θd of `operating_point_thresholds` as a table row gives it: None when nothing is
    purified (-inf, suspicious inputs rejected)."""
    return float(theta_d) if np.isfinite(theta_d) else None


def val_operating_points(fmd, val_out: dict, y_val, grid, attack_outputs=None,
                         theta_m=None) -> list[dict]:
    """Clean VAL figures of other operating points: for each (mode, ρ, gate budget) of `grid`,
    θr / θd / θe re-calibrated on the stored VAL outputs (`val_outputs`) and what they give on
    those same VAL images: defended accuracy, flagged share, and whether any θr(i) >= 0 (below
    0 no resistance is low enough, so the detector never fires).

    `attack_outputs` {name: (out, y)}: stored defense outputs (`reverdict` keys, with the same
    reconstruction error as `val_out`) of adversarial versions of VAL images and their true
    labels; each row then also gives `val_<name>_defended_accuracy` (rejected or right). The
    classifier-margin gate is `theta_m` (None: `fmd`'s own θm; the outputs then need
    `margin` where it is finite).
    """
    theta_m = float(np.asarray(fmd.theta_m if theta_m is None else theta_m))
    rows = []
    for mode, rho, recon_fpr in grid:
        theta_r, theta_d, theta_e = operating_point_thresholds(
            fmd, val_out["resistance"], val_out["recon_error"], mode, rho, recon_fpr)
        v = reverdict(val_out, theta_r, theta_d, theta_e, theta_m)
        row = {
            "threshold_mode": mode, "rho": rho, "recon_fpr": recon_fpr,
            "theta_r_max": float(np.max(theta_r)),
            "theta_d": theta_d_entry(theta_d),
            "detector_fires": bool(np.max(theta_r) >= 0.0),
            "val_clean_defended_accuracy": metrics.defended_accuracy(
                v["label"], v["verdict"], y_val, False),
            "val_clean_flagged": float(np.mean(v["verdict"] != 0)),
        }
        for name, (out, y) in (attack_outputs or {}).items():
            a = reverdict(out, theta_r, theta_d, theta_e, theta_m)
            row[f"val_{name}_defended_accuracy"] = metrics.defended_accuracy(
                a["label"], a["verdict"], y, True)
        rows.append(row)
    return rows
