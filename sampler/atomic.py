"""Atomic outputs: written at a temporary path beside the destination, moved into place when complete.

A writer killed halfway leaves the destination as it was (only a hidden `.name.*.tmp` folder beside
it). One mechanism for files and folders alike.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """A fresh path (nothing there yet) beside `path` to write a file or a folder at.

    On clean exit it takes `path`'s place; on error it is removed. An existing `path` is refused
    (FileExistsError), before and again at the move, unless `overwrite`: then it is moved aside
    and deleted only once the new output is in place.
    """
    dest = Path(os.path.abspath(os.fspath(path)))
    if os.path.lexists(dest) and not overwrite:
        raise FileExistsError(f"{dest} exists; pass overwrite=True to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield holder / dest.name
        _move_into_place(holder / dest.name, dest, overwrite)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """`atomic_output` for a folder: yields the (created, empty) temporary folder."""
    with atomic_output(path, overwrite) as tmp:
        tmp.mkdir()
        yield tmp


def _move_into_place(tmp: Path, dest: Path, overwrite: bool) -> None:
    if not os.path.lexists(tmp):
        raise FileNotFoundError(f"nothing was written for {dest}")
    if not os.path.lexists(dest):
        os.rename(tmp, dest)
        return
    if not overwrite:
        raise FileExistsError(f"{dest} appeared while writing; pass overwrite=True to replace it")
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(dest, old)
    os.rename(tmp, dest)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()
