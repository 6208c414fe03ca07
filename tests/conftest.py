"""Pytest configuration shared by all fmd_tf tests."""

import os

# Before TensorFlow is imported anywhere: keep its C++ logging quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Before NumPy is imported in the pytest-xdist workers and the scripts' child processes: no
# transparent huge pages for NumPy's large arrays. Where the kernel compacts memory for them on
# demand (THP defrag "madvise", as on this project's 2-core machines), a fresh 190 MB array
# (the Fashion-MNIST training set, which most script tests load) often stalled 0.5-4 s in the
# kernel. One suite run each way: 99 s -> 53 s of system time.
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")

import fcntl  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import quick_model as quick_model_module  # noqa: E402  (tests/ is on sys.path)
import test_case  # noqa: E402  (tests/ is on sys.path: it has no __init__.py)

ROOT = Path(__file__).resolve().parents[1]

# A helper module, not a test module (its name matches pytest's default `test_*.py`).
collect_ignore = ["test_case.py", "quick_model.py"]


@pytest.fixture(scope="session")
def tiny_images():
    """Read-only float32 [4, 28, 28, 1] uniform noise in [0, 1), seeded (see test_case)."""
    return test_case.tiny_images()


@pytest.fixture(scope="session")
def toy_batch():
    """Read-only learnable labeled batch (x [20, 28, 28, 1] in [0, 1], y int64 [20])."""
    return test_case.toy_batch()


# The files that take longest, longest first (measured with --durations): pytest-xdist hands out
# whole files (--dist loadfile) in collection order, so they start first and the short files
# fill in at the end instead of one long file running alone.
LONGEST_FIRST = ("test_ensemble_stage.py", "test_models.py", "test_pipeline.py",
                 "test_adaptive_attacks.py", "test_attacks.py", "test_defense.py",
                 "test_export_serving.py", "test_evaluate_scripts.py", "test_train_cli.py",
                 "test_baselines.py", "test_feature_map.py", "test_ensemble.py",
                 "test_adaptive_budget.py", "test_scripts.py", "test_defense_gan.py",
                 "test_reproducibility.py", "test_serving_load.py", "test_api_attacks.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


def _shared_base(tmp_path_factory) -> Path:
    """The session's base temp folder, shared by the pytest-xdist workers."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _start_quick_model(base: Path) -> None:
    """Start `quick_model.command` into base/quick_model/fmnist in the background, once per
    session whichever process asks first; its exit status lands in base/quick_model.rc."""
    with open(base / "quick_model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (base / "quick_model.started").exists():
            return
        (base / "quick_model.started").touch()
        out, rc, log = (base / "quick_model" / "fmnist", base / "quick_model.rc",
                        base / "quick_model.log")
        q = shlex.quote
        command = shlex.join(quick_model_module.command(out))
        subprocess.Popen(["sh", "-c", f"{command} > {q(str(log))} 2>&1; echo $? > "
                                      f"{q(f'{rc}.tmp')} && mv {q(f'{rc}.tmp')} {q(str(rc))}"],
                         cwd=ROOT, start_new_session=True,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


def pytest_collection_finish(session):
    """Start the quick model as soon as the collected tests show that one needs it, so that
    it trains while the workers run other tests instead of when the first test asks."""
    if _given_quick_model() or not any(
            "quick_model" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    _start_quick_model(_shared_base(session.config._tmp_path_factory))


def _given_quick_model() -> Path | None:
    """$FMD_QUICK_MODEL when it holds a model, else the checked-in copy when it is current."""
    given = os.environ.get("FMD_QUICK_MODEL")
    if given and (Path(given) / "fmd.keras").is_file():
        return Path(given)
    return quick_model_module.SHIPPED if quick_model_module.is_current(
        quick_model_module.SHIPPED) else None


@pytest.fixture(scope="session")
def quick_model(tmp_path_factory) -> Path:
    """The `scripts/train.py --quick` Fashion-MNIST model, trained once per test session in the
    background (`pytest_collection_finish`; every pytest-xdist worker waits for the same one).
    Read-only: copy it before changing it.

    The checked-in copy (tests/quick_model.py, `make test-model`) is used instead while it is
    current, and $FMD_QUICK_MODEL before it when it names a directory holding one.
    """
    given = _given_quick_model()
    if given:
        return given
    base = _shared_base(tmp_path_factory)
    _start_quick_model(base)
    rc = base / "quick_model.rc"
    deadline = time.monotonic() + 1200
    while not rc.exists():
        assert time.monotonic() < deadline, "the quick model did not finish in 20 minutes"
        time.sleep(0.5)
    log = (base / "quick_model.log").read_text()
    assert rc.read_text().strip() == "0", log[-3000:]
    return base / "quick_model" / "fmnist"
