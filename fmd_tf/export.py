"""Export a calibrated `FMDefense` as one SavedModel for TensorFlow Serving.

    from fmd_tf.export import export_serving
    path = export_serving(fmd, "saved_models/fmnist/serving", version=1)
    # -> saved_models/fmnist/serving/1/{saved_model.pb, variables/, fingerprint.pb, assets/}

The directory layout is TF Serving's: `<base_path>/<version>/`, with `base_path` mounted at
`/models/fmd` in the server (see `serving/`). The command-line wrapper is `scripts/export.py`.

Signatures (every one takes a single input `images`, float32 [None, H, W, C] in [0, 1], where
(H, W, C) is the model's own image shape, e.g. 28x28x1, 8x8x1 or 32x32x3):

====================  ===========================================================================
`serving_default`     the full defense (`FMDefense.call`): `label` int64 [B] (-1 = rejected),
                      `verdict` int32 [B] (0 passed, 1 purified, 2 rejected), `classifier_label`
                      int64 [B], `resistance` float32 [B, m], `distance` float32 [B], `purified`
                      float32 [B, H, W, C], `recon_error` float32 [B]
`classify`            the undefended classifier: `logits` float32 [B, classes], `label` int64 [B]
`detect`              `resistance`, `distance`, `recon_error`, `verdict` (as `serving_default`)
`purify`              `purified` float32 [B, H, W, C] (decoder(μs(x) ‖ zu)) and `label` int64
                      [B], the label a purified input gets (`FMDefense.purify_label`: the
                      classifier's label of the purified image, or with "corroborated" the
                      input's own label where the DGMM's class agrees); no morph search, cheap
====================  ===========================================================================

What an endpoint reveals (`exposure`): "full" exports the four signatures above. "decision"
exports `serving_default` with `label` and `verdict` only: a public endpoint. Score-based
black-box attacks (`fmd_tf.attacks.api_square`) read the `classify` logits and the resistances;
against a decision endpoint only decision-based ones (`api_rays`, `api_hop_skip_jump`) remain.
Serve the full export to trusted callers (monitoring, the purified images) on another port.
A decision export of a defense whose resistance thresholds cannot flag (every θr(i) < 0, as on
the robust mode; `operating_point.decides_without_morphs`) runs no morphs: only its gates can
reject, so `FMDefense.decisions`' graph gives the same label and verdict for far less work.

Every signature first runs `fmd_tf.defense.fm_defense.validate_images` inside the graph, so a
bad request fails with INVALID_ARGUMENT and a message naming the problem (shape, empty batch,
NaN/Inf, value < 0, value > 1) instead of a wrong answer. The image size in the graph check
and in the signatures is the model's own (`fmd._image_shape`, 28x28x1 for (Fashion-)MNIST);
clients read it from the server's metadata (`fmd_tf.serving.client`).

How it is built: plain `tf.function`s with a fixed `input_signature` close over the model's
graph methods (`fmd._defend`, `fmd.classifier`, `fmd.combo_vae`); the `tf.Variable`s their
concrete functions capture are attached to a `tf.Module` root, which `tf.saved_model.save`
writes with the four signatures. (This is what `keras.export.ExportArchive` does as well, minus
its `jit_compile` limitation.) The SavedModel needs no Python or `fmd_tf` to run: the server
only sees TensorFlow ops. It is written to a temporary sibling directory and renamed into
place, so the version directory is either complete or absent - TF Serving polls `base_path` and
must never see a half-written version.

XLA on GPU: by default nothing is XLA-compiled (on CPU XLA made the morph search ~3x slower),
and that default export is what `serving/` runs. For a *GPU* server you may pass
`jit_compile=True` (`scripts/export.py --xla`): the morph-search signatures (`serving_default`,
`detect`) then call a `tf.function(..., jit_compile=True)`, which SavedModel records as the
`_XlaMustCompile` attribute of that function, so the server compiles it with XLA at the first
request; no server flag is meant to be needed (`--xla_cpu_compilation_enabled` only concerns
XLA on CPU). `keras.export.ExportArchive.add_endpoint` ignores `jit_compile`, which is why this
module uses `tf.function` + `tf.saved_model.save` directly. The input checks stay outside the
XLA function (XLA drops asserts). Caveats: this path is tested here on CPU with TensorFlow only
(the flag is recorded, outputs match); it has not been run in `tensorflow/serving:latest-gpu`,
and TF Serving GPU images have been reported to fail jit-compiled SavedModels with "Could not
find compiler for platform CUDA" (tensorflow/serving#2214, #2217, 2.13/2.14). Export it to its
own base path (`--out saved_models/fmnist/serving_xla`: TF Serving serves the highest version
it finds, so an XLA version next to the default one would replace it), check one request,
compare latency with the default export, and never serve an XLA export from the CPU image.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import tensorflow as tf

from fmd_tf.defense.fm_defense import OUTPUT_KEYS, validate_images
from fmd_tf.files import replace_directory
from fmd_tf.operating_point import decides_without_morphs

__all__ = [
    "EXPOSURES",
    "exposed_signatures",
    "SIGNATURES",
    "INPUT_NAME",
    "export_saved_model",
    "export_serving",
    "export_after_training",
    "serving_functions",
    "describe_signatures",
    "VersionExistsError",
]

INPUT_NAME = "images"
# signature name -> output keys, in the order documented above.
SIGNATURES = {
    "serving_default": tuple(OUTPUT_KEYS),
    "classify": ("logits", "label"),
    "detect": ("resistance", "distance", "recon_error", "verdict"),
    "purify": ("purified", "label"),
}

# exposure -> {signature name: output keys}: what an exported endpoint reveals.
EXPOSURES = {
    "full": SIGNATURES,
    "decision": {"serving_default": ("label", "verdict")},
}


def exposed_signatures(exposure: str) -> dict:
    """{signature name: output keys} an endpoint exported with `exposure` serves
    (`EXPOSURES`); ValueError naming the choices for another exposure."""
    if exposure not in EXPOSURES:
        raise ValueError(f"exposure must be one of {', '.join(EXPOSURES)}, got {exposure!r}")
    return EXPOSURES[exposure]


class VersionExistsError(FileExistsError):
    """The version directory exists and `overwrite` was not given."""


def _check_ready(fmd):
    if not getattr(fmd, "built", False) or fmd._image_shape is None:
        raise ValueError("FMDefense is not built: call it on a batch or load a saved model first")
    if not fmd.is_calibrated:
        from fmd_tf.defense import NotCalibratedError

        raise NotCalibratedError(
            "FMDefense is not calibrated: call calibrate(x_val) before exporting (an "
            "uncalibrated defense would reject or pass everything)"
        )


def serving_functions(fmd, jit_compile: bool = False, exposure: str = "full") -> dict:
    """{signature name: `tf.function` with input_signature} for the signatures of `exposure`
    (`EXPOSURES`: the four signatures, or `serving_default` with label and verdict only).

    Each function takes `images` (keyword) float32 [None, *image_shape] and returns a dict of
    tensors. `jit_compile=True` XLA-compiles the morph-search signatures (`serving_default`,
    `detect`) behind the input checks; see the module docstring. It needs the full morph
    budget (the adaptive budget has data-dependent shapes): ValueError otherwise. A
    "decision" export of a defense that `decides_without_morphs` serves its gates' graph
    (`FMDefense._gate_decisions`: the same label and verdict, no morphs).
    """
    if jit_compile and not fmd._xla_compatible():
        raise ValueError("XLA (jit_compile / --xla) needs fixed shapes: export "
                         "fmd.copy_with(**FMDefense.XLA_OPTIONS) (all m x N morphs per image in "
                         "float32: the same verdicts where the budget was chosen on VAL)")
    signatures = exposed_signatures(exposure)
    image_shape = tuple(int(s) for s in fmd._image_shape)
    gates_only = exposure == "decision" and decides_without_morphs(fmd)
    spec = tf.TensorSpec([None, *image_shape], tf.float32, name=INPUT_NAME)

    def defend_body(images):
        # `_defend` validates too; the second check is a no-op and keeps this usable alone.
        return fmd._defend(images)

    # One traced graph of the defense, called by both `serving_default` and `detect`.
    defend_core = tf.function(defend_body, jit_compile=True if jit_compile else None,
                              autograph=False, reduce_retracing=True)

    def checked(images):
        return validate_images(images, image_shape)

    def defend(images):
        return defend_core(checked(images))

    def decide(images):
        # Label and verdict without the morphs (`FMDefense._gate_decisions`, validating too):
        # `_defend`'s answers when no resistance threshold can flag.
        return fmd._gate_decisions(checked(images))

    def classify(images):
        logits = fmd.classifier(checked(images))
        return {"logits": logits, "label": tf.argmax(logits, axis=-1)}

    def purify(images):
        # The purifier branch of `FMDefense._defend` (same ops, no morph search).
        return fmd._purify_valid(checked(images))

    bodies = {"serving_default": decide if gates_only else defend, "classify": classify,
              "detect": defend, "purify": purify}

    def outputs(body, keys):
        def signature(images):
            out = body(images)
            return {key: out[key] for key in keys}
        return signature

    return {
        name: tf.function(outputs(bodies[name], keys), input_signature=[spec], autograph=False,
                          reduce_retracing=True)
        for name, keys in signatures.items()
    }


def _write_saved_model(fmd, path: str, jit_compile: bool, exposure: str) -> None:
    functions = serving_functions(fmd, jit_compile=jit_compile, exposure=exposure)
    concrete = {name: fn.get_concrete_function() for name, fn in functions.items()}
    root = tf.Module(name="fmd_serving")
    # Track exactly the variables the graphs capture (keras variables wrap tf.Variables).
    variables, seen = [], set()
    for fn in concrete.values():
        for v in fn.variables:
            if id(v) not in seen:
                seen.add(id(v))
                variables.append(v)
    root.captured_variables = variables
    for name, fn in functions.items():
        setattr(root, name, fn)
    tf.saved_model.save(root, path, signatures=concrete)


def export_serving(fmd, out_dir, version: int = 1, overwrite: bool = False,
                   jit_compile: bool = False, exposure: str = "full") -> str:
    """Write `fmd` as a TF Serving SavedModel in `out_dir/<version>/`; returns that path.

    Args:
        fmd: a built, calibrated `fmd_tf.defense.FMDefense` (e.g. `keras.models.load_model(
            "saved_models/fmnist/fmd.keras")` after `import fmd_tf`).
        out_dir: the model's base path (what TF Serving's `base_path` points at).
        version: positive integer version; TF Serving serves the highest one by default.
        overwrite: replace an existing `out_dir/<version>` (atomically swapped; the old one is
            removed only after the new one is complete).
        jit_compile: XLA-compile the morph search (for GPU servers only; see module docstring).
        exposure: what the endpoint reveals, a key of `EXPOSURES` ("full", or "decision":
            `serving_default` with label and verdict only, for a public endpoint).

    Raises:
        VersionExistsError: the version exists and `overwrite` is False (nothing is touched).
        ValueError: bad version; NotCalibratedError: the defense is not calibrated.
    """
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive integer, got {version!r}")
    _check_ready(fmd)
    exposed_signatures(exposure)
    out_dir = os.fspath(out_dir)
    final = os.path.join(out_dir, str(version))
    if os.path.exists(final) and not overwrite:
        raise VersionExistsError(
            f"{final} already exists; pass overwrite=True (--overwrite) or choose another version"
        )
    os.makedirs(out_dir, exist_ok=True)
    # A dot-prefixed sibling: same filesystem (rename is atomic) and TF Serving ignores it
    # (only all-digit directory names are versions).
    tmp = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=out_dir)
    try:
        staged = os.path.join(tmp, "model")
        _write_saved_model(fmd, staged, jit_compile, exposure)
        # overwrite: swapped in, the old version restored on failure
        replace_directory(staged, final, os.path.join(tmp, "old"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def export_saved_model(fmd, path, overwrite: bool = False, jit_compile: bool = False,
                       exposure: str = "full") -> str:
    """Write `fmd` as a TF Serving SavedModel at `path`, a version directory such as
    "serving/1" (its name a positive integer: TF Serving's layout); see `export_serving`."""
    path = os.path.normpath(os.fspath(path))
    base, name = os.path.split(path)
    if not name.isdigit() or int(name) < 1:
        raise ValueError(f"path must end in a positive integer version directory (TF Serving's "
                         f"base_path/<version>), e.g. 'serving/1', got {path!r}")
    return export_serving(fmd, base or ".", version=int(name), overwrite=overwrite,
                          jit_compile=jit_compile, exposure=exposure)


def export_after_training(fmd, out_dir) -> str:
    """Hook for `scripts/train.py`: write `out_dir/serving/1` (replacing it); returns the path.

    train.py checks `--overwrite` for its own outputs before training, so this replaces an
    existing version 1 unconditionally.
    """
    return export_serving(fmd, os.path.join(os.fspath(out_dir), "serving"), version=1,
                          overwrite=True)


def describe_signatures(path) -> dict:
    """{signature: {"inputs": {name: (dtype, shape)}, "outputs": {...}}} of a SavedModel dir.

    Read from `saved_model.pb` without loading the graphs (like `saved_model_cli show`); shapes
    use -1 for unknown sizes. Internal signatures (`__saved_model_init_op`) are left out.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(os.fspath(path), "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    meta = next(m for m in proto.meta_graphs if "serve" in m.meta_info_def.tags)

    def info(tensors):
        return {
            name: (tf.dtypes.as_dtype(t.dtype).name,
                   tuple(d.size for d in t.tensor_shape.dim) if not t.tensor_shape.unknown_rank
                   else None)
            for name, t in sorted(tensors.items())
        }

    return {
        name: {"inputs": info(sig.inputs), "outputs": info(sig.outputs)}
        for name, sig in sorted(meta.signature_def.items())
        if not name.startswith("__")
    }
