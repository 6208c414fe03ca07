"""Black-box attacks on the classifier through ART 1.20: the attacker sees only its outputs.

* `square`: Square Attack (Andriushchenko et al. 2020), score-based, L∞ ball of radius `eps`:
  one initial query, then at most `max_queries` iterations of ART's `SquareAttack`, one query
  each for every image not yet misclassified.
* `hop_skip_jump`: HopSkipJump (Chen et al. 2020), decision-based (labels only), L2; it
  shrinks the perturbation of an adversarial starting point, so the result has no fixed budget
  (the report gives its median L2).

Both are untargeted and keep pixels in [0, 1]. ART's random draws come from NumPy's global
generator: `fmd_tf.evaluation.harness.adversarial_set` seeds it (keras.utils.set_random_seed).
"""

from __future__ import annotations

import numpy as np

__all__ = ["art_classifier", "hop_skip_jump", "square"]


def art_classifier(model, x):
    """ART `TensorFlowV2Classifier` around a Keras classifier that returns logits, for images
    shaped like x [n, H, W, C] in [0, 1]."""
    import keras
    from art.estimators.classification import TensorFlowV2Classifier

    return TensorFlowV2Classifier(
        model=model, nb_classes=int(model(np.asarray(x[:1], np.float32)).shape[-1]),
        input_shape=tuple(x.shape[1:]),
        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        clip_values=(0.0, 1.0),
    )


def square(model, x, eps: float = 0.2, max_queries: int = 1000, batch_size: int = 256,
           verbose: bool = False) -> np.ndarray:
    """Untargeted Square Attack in the L∞ ball of radius `eps`, float32 like x."""
    from art.attacks.evasion import SquareAttack

    x = np.asarray(x, np.float32)
    attack = SquareAttack(art_classifier(model, x), norm=np.inf, eps=eps, max_iter=max_queries,
                          nb_restarts=1, batch_size=batch_size, verbose=verbose)
    return np.clip(attack.generate(x), 0.0, 1.0).astype(np.float32)


def hop_skip_jump(model, x, max_iter: int = 10, max_eval: int = 100, init_eval: int = 10,
                  batch_size: int = 256, verbose: bool = False) -> np.ndarray:
    """Untargeted HopSkipJump (L2) from the classifier's labels only, float32 like x."""
    from art.attacks.evasion import HopSkipJump

    x = np.asarray(x, np.float32)
    attack = HopSkipJump(art_classifier(model, x), targeted=False, norm=2, max_iter=max_iter,
                         max_eval=max_eval, init_eval=init_eval, batch_size=batch_size,
                         verbose=verbose)
    return np.clip(attack.generate(x), 0.0, 1.0).astype(np.float32)
