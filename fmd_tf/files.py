"""Writing results so that a reader never sees a half-written file."""

from __future__ import annotations

import json
import os

__all__ = ["write_json"]


def write_json(path: str, data, sort_keys: bool = False) -> None:
    """`data` as indented JSON (numpy scalars and arrays as numbers and lists), written to a
    temporary file next to `path` and renamed over it."""
    def plain(obj):
        if hasattr(obj, "tolist"):
            return obj.tolist()
        return obj.item() if hasattr(obj, "item") else str(obj)

    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=sort_keys, default=plain)
        f.write("\n")
    os.replace(tmp, path)
