"""Atomic outputs: written at a temporary path beside the destination, moved into place when complete.

A writer killed halfway leaves the destination as it was (only a hidden `.name.dynaclr-PID-*.tmp`
folder beside it, removed by the next write to the same destination once process PID has ended;
an interrupt, KeyboardInterrupt, removes it at once). One mechanism for files and folders alike.

Overwriting never loses data that this project did not write: `overwrite=True` replaces an existing
file only when it is of the kind being written (`FileKind`: suffix, magic bytes, content check) and
an existing folder only when it carries this project's marker (`MARKER`, a small JSON naming its
writer and version, which every folder writer puts in); the current directory, or a folder holding
it, is never replaced. Anything else is refused with a one-line `FileExistsError` naming it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

PROJECT = "dynaclr-dali"
MARKER = ".dynaclr-dali.json"  #: in every folder this project writes, and in its temporaries
MARKER_FORMAT = 1
_TMP_TAG = "dynaclr"  #: temporaries are named `.{name}.dynaclr-{pid}-{random}.tmp`


def _version() -> str:
    try:
        return metadata.version(PROJECT)
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class FileKind:
    """A kind of output file and a cheap, honest test that an existing file is one (what overwrite may replace).

    `magic`: the file's first bytes; `suffixes`: accepted name endings (empty: any); `check`: an
    extra content test (e.g. the index's zip member), run only when the rest passed.
    """

    name: str
    magic: bytes = b""
    suffixes: tuple[str, ...] = ()
    check: Callable[[Path], bool] | None = None

    def problem(self, path: Path) -> str | None:
        """Why the existing `path` is not a file of this kind (None: it is one)."""
        if not path.is_file():
            return "it is a folder" if path.is_dir() else "it is not a regular file"
        if self.suffixes and not path.name.lower().endswith(self.suffixes):
            return f"its name does not end in {' or '.join(self.suffixes)}"
        try:
            with open(path, "rb") as f:
                head = f.read(len(self.magic))
            if head != self.magic or (self.check is not None and not self.check(path)):
                return "its content is not of that kind"
        except OSError as err:
            return f"it cannot be read ({err.strerror or err})"
        return None


def _zip_has(member: str) -> Callable[[Path], bool]:
    def check(path: Path) -> bool:
        try:
            with zipfile.ZipFile(path) as z:
                return member in z.namelist()
        except (zipfile.BadZipFile, OSError):
            return False
    return check


def _first_line_has(text: str) -> Callable[[Path], bool]:
    def check(path: Path) -> bool:
        with open(path, "rb") as f:
            return text.encode() in f.readline(4096)
    return check


PNG = FileKind("PNG image", magic=b"\x89PNG\r\n\x1a\n")
JSON_REPORT = FileKind("JSON report", magic=b"{", suffixes=(".json",))
INDEX_NPZ = FileKind("lineage index (.npz saved by LineageIndex.save)", magic=b"PK\x03\x04",
                     check=_zip_has("meta.npy"))
PARQUET = FileKind("parquet table", magic=b"PAR1", suffixes=(".parquet", ".pq"))
H5AD = FileKind("h5ad (HDF5) file", magic=b"\x89HDF\r\n\x1a\n", suffixes=(".h5ad",))
CSV_LINEAGE_DIFFERENCES = FileKind("lineage differences CSV", magic=b"experiment,fov_name,track_id,ours,parquet",
                                   suffixes=(".csv",))
IMPORTED_YAML = FileKind("collection YAML written by import-cell-index", magic=b"# imported from ",
                         suffixes=(".yml", ".yaml"), check=_first_line_has(f"by {PROJECT} import-cell-index"))


def read_marker(folder: str | os.PathLike[str]) -> dict | None:
    """The marker of a folder this project wrote ({"project", "writer", "version", ...}), else None."""
    try:
        with open(Path(folder) / MARKER) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    ok = isinstance(doc, dict) and doc.get("project") == PROJECT and isinstance(doc.get("writer"), str)
    return doc if ok else None


def write_marker(folder: str | os.PathLike[str], writer: str, **extra: object) -> None:
    """Mark `folder` as written by this project's `writer` (what lets overwrite replace it later)."""
    doc = dict(project=PROJECT, writer=writer, version=_version(), format=MARKER_FORMAT, **extra)
    with open(Path(folder) / MARKER, "w") as f:
        json.dump(doc, f)
        f.write("\n")


def _holds_cwd(dest: Path) -> bool:
    try:
        cwd = Path(os.getcwd()).resolve()
    except OSError:
        return False
    real = dest.resolve()
    return cwd == real or real in cwd.parents


def replace_problem(path: str | os.PathLike[str], kind: FileKind | None) -> str | None:
    """Why overwrite may not replace the existing `path` (None: it may). `kind` None: a folder writer."""
    dest = Path(os.path.abspath(os.fspath(path)))
    if dest.is_symlink():
        return "it is a symbolic link"
    if dest.is_dir() and _holds_cwd(dest):
        return "it is the current directory or holds it"
    if kind is not None:
        why = kind.problem(dest)
        return None if why is None else f"{why}, not a {kind.name}"
    if not dest.is_dir():
        return "it is a file, not a folder"
    if read_marker(dest) is None:
        return f"it is a folder without {PROJECT}'s marker {MARKER}, so {PROJECT} did not write it"
    return None


def check_target(path: str | os.PathLike[str], overwrite: bool, kind: FileKind | None,
                 flag: str = "overwrite=True") -> None:
    """Refuse (FileExistsError, one line) an existing `path` unless `overwrite` and it is replaceable.

    `flag` names the option in the message (the CLI passes "--overwrite").
    """
    dest = Path(os.path.abspath(os.fspath(path)))
    if not os.path.lexists(dest):
        return
    if not overwrite:
        raise FileExistsError(f"{dest} exists; pass {flag} to replace it")
    why = replace_problem(dest, kind)
    if why is not None:
        what = f"a {kind.name}" if kind is not None else f"a folder {PROJECT} wrote"
        raise FileExistsError(f"{dest} exists and was not replaced: {why}; {flag} replaces only {what}. "
                              "Move it away or choose another output path")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], overwrite: bool = False, *,
                  kind: FileKind | None) -> Iterator[Path]:
    """A fresh path (nothing there yet) beside `path` to write a file (`kind`) or a folder (`kind=None`) at.

    On clean exit it takes `path`'s place; on error or interrupt it is removed. An existing `path`
    is refused (FileExistsError), before and again at the move, unless `overwrite` and it is
    replaceable (`check_target`): then it is moved aside and deleted only once the new output is
    in place. Stale temporaries of `path` whose process has ended are removed first.
    """
    dest = Path(os.path.abspath(os.fspath(path)))
    check_target(dest, overwrite, kind)
    existed = os.path.lexists(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    with _interrupts_deferred():  # the holder exists only with its owner marker
        holder = dest.parent / f".{dest.name}.{_TMP_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        holder.mkdir(mode=0o700)
        write_marker(holder, "temporary", pid=os.getpid(), host=socket.gethostname(), destination=dest.name)
    try:
        yield holder / dest.name
        if not existed and os.path.lexists(dest) and not overwrite:
            raise FileExistsError(f"{dest} appeared while writing; pass overwrite=True to replace it")
        check_target(dest, overwrite, kind)  # again: what is there now may not be what was checked
        with _interrupts_deferred():  # no half swap: the old output stays until the new one is in place
            _move_into_place(holder, dest)
    finally:
        with _interrupts_deferred():
            _remove(holder)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], overwrite: bool = False, *, writer: str) -> Iterator[Path]:
    """`atomic_output` for a folder: yields the created temporary folder, already marked as `writer`'s."""
    with atomic_output(path, overwrite, kind=None) as tmp:
        tmp.mkdir()
        write_marker(tmp, writer)
        yield tmp


def _move_into_place(holder: Path, dest: Path) -> None:
    tmp = holder / dest.name
    if not os.path.lexists(tmp):
        raise FileNotFoundError(f"nothing was written for {dest}")
    if os.path.lexists(dest):
        os.rename(dest, holder / ".old")  # inside the holder: removed with it, even after a crash
    os.rename(tmp, dest)


def _remove(folder: Path, attempts: int = 20) -> None:
    """Remove `folder`, again while writes still in flight (background threads) land in it."""
    for _ in range(attempts):
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.lexists(folder):
            return
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(dest: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries of `dest` left by a writer that is no longer running; returns them.

    Only folders named as this module names them, carrying its owner marker, written on this host
    by a process id that no longer runs (a live or reused pid, or another host: kept).
    """
    dest = Path(os.path.abspath(os.fspath(dest)))
    prefix = f".{dest.name}.{_TMP_TAG}-"
    removed = []
    try:
        entries = list(os.scandir(dest.parent))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")) or not entry.is_dir(follow_symlinks=False):
            continue
        owner = read_marker(entry.path)
        if (owner is None or owner.get("writer") != "temporary" or owner.get("host") != socket.gethostname()
                or owner.get("destination") != dest.name or not isinstance(owner.get("pid"), int)
                or _alive(owner["pid"])):
            continue
        _remove(Path(entry.path))
        removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold a SIGINT arriving inside the block until its end (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # not in the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)
