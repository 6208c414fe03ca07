"""Writing files so that a reader never sees a half-written one, and their SHA-256 digests.

Every artifact, report, figure and cache entry is written to a temporary file next to its
target and renamed over it (`os.replace`, atomic on POSIX within a file system): a process
killed at any point leaves either the previous file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

__all__ = ["StagedOutputs", "atomic_path", "replace_directory", "sha256", "write_json",
           "write_text"]


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path next to `path` (same directory, same extension, so that writers
    which pick the format from the name - `model.save`, `np.save`, `savefig` - accept it); when
    the block ends without an exception the file is flushed to disk and renamed over `path`,
    otherwise removed.

        with atomic_path("out/fmd.keras") as tmp:
            model.save(tmp)
    """
    path = os.fspath(path)
    directory, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=directory or ".")
    os.close(fd)
    os.remove(tmp)  # writers that refuse to overwrite (or write a directory) get a free name
    try:
        yield tmp
        if os.path.isfile(tmp):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def replace_directory(source, target, old) -> None:
    """Move the directory `source` to `target` (same file system). An existing `target` is
    first renamed to `old` (a free path), put back if the move fails, and removed after it."""
    if not os.path.exists(target):
        os.rename(source, target)
        return
    os.rename(target, old)
    try:
        os.rename(source, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old)


def write_text(path, text: str) -> None:
    """`text` into `path` through `atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path, data, sort_keys: bool = False) -> None:
    """`data` as indented JSON (numpy scalars and arrays as numbers and lists), written
    through `atomic_path`."""
    def plain(obj):
        if hasattr(obj, "tolist"):
            return obj.tolist()
        return obj.item() if hasattr(obj, "item") else str(obj)

    write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys, default=plain) + "\n")


def sha256(path) -> str:
    """Hex SHA-256 of a file; of a directory (a SavedModel), the SHA-256 of the lines
    "<relative path> <file SHA-256>" of every file under it, sorted by path."""
    path = os.fspath(path)
    if os.path.isfile(path):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    lines = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            lines.append(f"{os.path.relpath(full, path)} {sha256(full)}\n")
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


class StagedOutputs:
    """A run's outputs, written into a hidden staging directory inside `out_dir` and moved
    into place only by `commit()`, so that a run killed before then leaves `out_dir` as it
    was.

    `path(name)` is where the run writes `name` (relative to `out_dir`); `find(name)` is where
    it reads it (this run's copy, else the one already in `out_dir`); `final(path)` maps a
    staged path to its place in `out_dir`. `commit(last=...)` moves the top-level files with
    `os.replace` and, for a top-level directory (e.g. serving/), each entry in it as a whole
    (a SavedModel version is swapped in, never merged with the old one), `last` after all
    others (the model card, which describes the rest). A staging directory left behind by a
    killed run is removed by the next run into the same `out_dir`.
    """

    STAGING = ".incomplete"

    def __init__(self, out_dir):
        self.out_dir = os.fspath(out_dir)
        self.dir = os.path.join(self.out_dir, self.STAGING)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def find(self, name: str) -> str:
        staged = self.path(name)
        return staged if os.path.exists(staged) else os.path.join(self.out_dir, name)

    def final(self, path) -> str:
        return os.path.join(self.out_dir, os.path.relpath(os.fspath(path), self.dir))

    def staged(self) -> list[str]:
        """Names (relative to `out_dir`) this run has written so far, directories' entries
        one level down (e.g. "serving/1")."""
        names = []
        for name in sorted(os.listdir(self.dir)):
            full = self.path(name)
            names += ([f"{name}/{child}" for child in sorted(os.listdir(full))]
                      if os.path.isdir(full) else [name])
        return names

    def commit(self, last: str | None = None) -> None:
        order = sorted(self.staged(), key=lambda name: name == last)
        for name in order:
            source, target = self.path(name), os.path.join(self.out_dir, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.isdir(source):
                replace_directory(source, target, os.path.join(self.dir, ".old"))
            else:
                os.replace(source, target)
        shutil.rmtree(self.dir)

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
