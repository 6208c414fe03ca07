"""Pytest configuration shared by all fmd_tf tests."""

import os

# Before TensorFlow is imported anywhere: keep its C++ logging quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import test_case  # noqa: E402  (tests/ is on sys.path: it has no __init__.py)

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
