"""Pytest configuration shared by all fmd_tf tests."""

import os

# Before TensorFlow is imported anywhere: keep its C++ logging quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import fcntl  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import test_case  # noqa: E402  (tests/ is on sys.path: it has no __init__.py)

ROOT = Path(__file__).resolve().parents[1]

# A helper module, not a test module (its name matches pytest's default `test_*.py`).
collect_ignore = ["test_case.py"]


@pytest.fixture(scope="session")
def tiny_images():
    """Read-only float32 [4, 28, 28, 1] uniform noise in [0, 1), seeded (see test_case)."""
    return test_case.tiny_images()


@pytest.fixture(scope="session")
def toy_batch():
    """Read-only learnable labeled batch (x [20, 28, 28, 1] in [0, 1], y int64 [20])."""
    return test_case.toy_batch()


@pytest.fixture(scope="session")
def quick_model(tmp_path_factory) -> Path:
    """The `scripts/train.py --quick` Fashion-MNIST model, trained once per test session (one
    pytest-xdist worker trains it, the others wait for it and reuse it). Read-only: copy it
    before changing it.

    Trained with the config's own operating point (ρ 0.95, no gate), so that script figures are
    checked against known settings; the automatic choice is tested in test_train_cli and
    test_pipeline. $FMD_QUICK_MODEL, when it names a directory holding one, is used instead.
    """
    given = os.environ.get("FMD_QUICK_MODEL")
    if given and (Path(given) / "fmd.keras").is_file():
        return Path(given)
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of this session
    out = base / "quick_model" / "fmnist"
    with open(base / "quick_model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (out / "model_card.json").is_file():
            proc = subprocess.run(
                [sys.executable, "scripts/train.py", "--quick", "--operating-point", "config",
                 "--out", str(out), "--verbose", "0"],
                cwd=ROOT, capture_output=True, text=True, timeout=1200,
                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
            assert proc.returncode == 0, proc.stderr[-3000:]
    return out
