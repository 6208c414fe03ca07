"""The quick Fashion-MNIST model that the tests share: the command that trains it, and the copy
checked in under tests/data so that a test session loads it instead of training it (about a
minute of both CPU cores).

`make test-model` (this file run as a script) rebuilds the copy. A session uses it only while
its card records `ARGS` and the current quick config (`is_current`); otherwise conftest.py trains
a fresh model in the background. Rebuild it when a change of fmd_tf changes what train.py writes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "tests" / "data" / "quick_model" / "fmnist"
# Trained with the config's own operating point (ρ 0.95, no gate), so that script figures are
# checked against known settings; the automatic choice is tested in test_train_cli/test_pipeline.
ARGS = ("--quick", "--operating-point", "config", "--verbose", "0")


def command(out) -> list[str]:
    """The train.py command line that writes the quick model into `out`."""
    return [sys.executable, "scripts/train.py", *ARGS, "--out", str(out)]


def _comparable(hyperparameters: dict) -> dict:
    """JSON-normalised hyperparameters without the codes calibration fills in."""
    out = json.loads(json.dumps(hyperparameters))
    out.get("defense", {}).pop("selected_codes", None)
    return out


def is_current(model_dir: Path) -> bool:
    """Whether `model_dir` holds a quick model trained with `ARGS` and today's quick config
    (what train.py derives for `--dataset fmnist --preset fast`: `pipeline.experiment_config`)."""
    from fmd_tf.config import get_config, to_dict
    from fmd_tf.pipeline import experiment_config

    try:
        card = json.loads((model_dir / "model_card.json").read_text())
    except (OSError, ValueError):
        return False
    base = get_config("fmnist")
    expected = _comparable(to_dict(experiment_config(base.image_shape, base.num_classes, "fast",
                                                     "fmnist", base)))
    return ((model_dir / "fmd.keras").is_file()
            and card.get("command", "").startswith(" ".join(["python scripts/train.py", *ARGS]))
            and _comparable(card.get("hyperparameters", {})) == expected)


def main() -> int:
    # train.py --overwrite swaps its outputs in only once the run has finished.
    proc = subprocess.run([*command(SHIPPED.relative_to(ROOT)), "--overwrite"], cwd=ROOT)
    if proc.returncode:
        return proc.returncode
    shutil.rmtree(SHIPPED / "logs", ignore_errors=True)  # TensorBoard logs: not needed
    assert is_current(SHIPPED), "the model just trained does not pass is_current"
    print(f"wrote {SHIPPED.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
