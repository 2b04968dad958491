"""sampler.atomic: one mechanism for every writer's files and folders; overwrite replaces only our own outputs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sampler.atomic import (MARKER, PNG, JSON_REPORT, FileKind, atomic_directory, atomic_output, read_marker,
                            remove_stale_temporaries)

TEXT = FileKind("text file", magic=b"", suffixes=(".txt",))
REPO = Path(__file__).resolve().parents[1]


def hidden(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes): what must survive a refused overwrite."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def foreign_folder(path: Path) -> dict[str, bytes]:
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my thesis")
    (path / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return snapshot(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_file_and_a_folder_land_whole_and_leave_nothing_beside(tmp_path):
    with atomic_output(tmp_path / "a.txt", kind=TEXT) as tmp:
        assert not os.path.lexists(tmp) and not (tmp_path / "a.txt").exists()
        tmp.write_text("one")
    assert (tmp_path / "a.txt").read_text() == "one"
    with atomic_directory(tmp_path / "d", writer="test") as tmp:
        (tmp / "x").write_text("inside")
    assert (tmp_path / "d" / "x").read_text() == "inside"
    marker = read_marker(tmp_path / "d")
    assert marker is not None and marker["writer"] == "test" and marker["project"] == "dynaclr-dali"
    assert "version" in json.loads((tmp_path / "d" / MARKER).read_text())
    assert hidden(tmp_path) == []
    assert oct((tmp_path / "d").stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # not the holder's private 0o700


def test_refuses_to_overwrite_unless_asked_and_replaces_only_its_own_kind(tmp_path):
    (tmp_path / "out.txt").write_text("old")
    with pytest.raises(FileExistsError, match="out.txt exists; pass overwrite=True"), \
            atomic_output(tmp_path / "out.txt", kind=TEXT):
        pass
    with atomic_output(tmp_path / "out.txt", overwrite=True, kind=TEXT) as tmp:
        tmp.write_text("new")
    assert (tmp_path / "out.txt").read_text() == "new"
    (tmp_path / "fake.png").write_bytes(b"not a png at all")
    with pytest.raises(FileExistsError, match=r"fake.png exists and was not replaced: its content is not of that "
                                              r"kind, not a PNG image.*Move it away"):
        with atomic_output(tmp_path / "fake.png", overwrite=True, kind=PNG):
            raise AssertionError("refused before the body runs")
    assert (tmp_path / "fake.png").read_bytes() == b"not a png at all"
    (tmp_path / "report").write_text('{"a": 1}')
    with pytest.raises(FileExistsError, match="its name does not end in .json"), \
            atomic_output(tmp_path / "report", overwrite=True, kind=JSON_REPORT):
        pass
    assert hidden(tmp_path) == []


def test_a_foreign_folder_survives_byte_for_byte_as_a_file_or_a_folder_target(tmp_path):
    target = tmp_path / "mine"
    before = foreign_folder(target)
    with pytest.raises(FileExistsError, match="mine exists and was not replaced: it is a folder, not a PNG image"), \
            atomic_output(target, overwrite=True, kind=PNG):
        pass
    with pytest.raises(FileExistsError, match="without dynaclr-dali's marker .dynaclr-dali.json"), \
            atomic_directory(target, overwrite=True, writer="synthetic"):
        pass
    assert snapshot(target) == before
    (target / MARKER).write_text('{"writer": "synthetic"}')  # not ours: no project field
    with pytest.raises(FileExistsError, match="without dynaclr-dali's marker"), \
            atomic_directory(target, overwrite=True, writer="synthetic"):
        pass
    assert hidden(tmp_path) == []
    (tmp_path / "plain").write_text("a file")
    with pytest.raises(FileExistsError, match="it is a file, not a folder"), \
            atomic_directory(tmp_path / "plain", overwrite=True, writer="synthetic"):
        pass
    assert (tmp_path / "plain").read_text() == "a file"


def test_a_folder_this_project_wrote_is_replaced(tmp_path):
    with atomic_directory(tmp_path / "d", writer="synthetic") as tmp:
        (tmp / "old").write_text("old")
    with atomic_directory(tmp_path / "d", overwrite=True, writer="convert-ctc") as tmp:
        (tmp / "new").write_text("new")
    assert sorted(os.listdir(tmp_path / "d")) == [MARKER, "new"]
    assert read_marker(tmp_path / "d")["writer"] == "convert-ctc"
    assert hidden(tmp_path) == []


def test_the_current_directory_and_its_parents_are_refused(tmp_path, monkeypatch):
    with atomic_directory(tmp_path / "d", writer="synthetic") as tmp:
        (tmp / "inner").mkdir()
    for cwd in (tmp_path / "d", tmp_path / "d" / "inner"):
        monkeypatch.chdir(cwd)
        with pytest.raises(FileExistsError, match="it is the current directory or holds it"), \
                atomic_directory(tmp_path / "d", overwrite=True, writer="synthetic"):
            pass
    with pytest.raises(FileExistsError, match="current directory"), \
            atomic_directory(".", overwrite=True, writer="synthetic"):
        pass
    assert (tmp_path / "d" / "inner").is_dir()


def test_a_symbolic_link_is_refused(tmp_path):
    (tmp_path / "real.txt").write_text("real")
    (tmp_path / "link.txt").symlink_to(tmp_path / "real.txt")
    with pytest.raises(FileExistsError, match="symbolic link"), \
            atomic_output(tmp_path / "link.txt", overwrite=True, kind=TEXT):
        pass
    assert (tmp_path / "link.txt").is_symlink()


def test_an_error_or_an_interrupt_leaves_the_destination_as_it_was(tmp_path):
    (tmp_path / "keep.txt").write_text("before")
    for exc in (RuntimeError("writer failed"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), atomic_output(tmp_path / "keep.txt", overwrite=True, kind=TEXT) as tmp:
            tmp.write_text("half")
            raise exc
        assert (tmp_path / "keep.txt").read_text() == "before"
        assert hidden(tmp_path) == []


def test_a_destination_that_appears_meanwhile_is_not_clobbered(tmp_path):
    with pytest.raises(FileExistsError, match="appeared while writing"), \
            atomic_output(tmp_path / "race.txt", kind=TEXT) as tmp:
        tmp.write_text("mine")
        (tmp_path / "race.txt").write_text("theirs")
    assert (tmp_path / "race.txt").read_text() == "theirs"
    with pytest.raises(FileExistsError, match="it is a folder"), \
            atomic_output(tmp_path / "race2.txt", overwrite=True, kind=TEXT) as tmp:
        tmp.write_text("mine")
        (tmp_path / "race2.txt").mkdir()  # appeared meanwhile, and not ours: kept even with overwrite
        (tmp_path / "race2.txt" / "f").write_text("theirs")
    assert (tmp_path / "race2.txt" / "f").read_text() == "theirs"
    assert hidden(tmp_path) == []


def test_nothing_written_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic_output(tmp_path / "empty", kind=TEXT):
        pass
    assert not (tmp_path / "empty").exists() and hidden(tmp_path) == []


# ---------------------------------------------------------------------- stale temporaries
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def fake_temporary(parent: Path, dest: str, pid: int, host: str | None = None, marked: bool = True) -> Path:
    holder = parent / f".{dest}.dynaclr-{pid}-0000abcd.tmp"
    (holder / dest).mkdir(parents=True)
    (holder / dest / "chunk").write_bytes(b"x" * 10)
    if marked:
        (holder / MARKER).write_text(json.dumps(dict(project="dynaclr-dali", writer="temporary", pid=pid,
                                                     host=host or socket.gethostname(), destination=dest)))
    return holder


def test_stale_temporaries_are_removed_only_when_their_writer_has_ended(tmp_path):
    dead = fake_temporary(tmp_path, "out", dead_pid())
    alive = fake_temporary(tmp_path, "out", os.getppid())
    elsewhere = fake_temporary(tmp_path, "out", dead_pid(), host="another-host")
    unmarked = fake_temporary(tmp_path, "out", dead_pid(), marked=False)
    other_dest = fake_temporary(tmp_path, "other", dead_pid())
    with atomic_directory(tmp_path / "out", writer="test") as tmp:
        (tmp / "f").write_text("new")
    assert not dead.exists()
    assert alive.exists() and elsewhere.exists() and unmarked.exists() and other_dest.exists()
    assert remove_stale_temporaries(tmp_path / "other") == [other_dest] and not other_dest.exists()


def interrupt_when_ready(code: str, arg: Path, while_running=lambda: None, timeout: float = 60) -> tuple[int, bytes]:
    """Run `python -c code arg`, wait for its 'ready' line, call `while_running`, send SIGINT (Ctrl-C);
    its exit status and stderr."""
    proc = subprocess.Popen([sys.executable, "-c", code, str(arg)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline() == b"ready\n", proc.stderr.read()
        while_running()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_sigint_in_a_subprocess_removes_the_temporary(tmp_path):
    code = (
        "import sys, time; from pathlib import Path; from sampler.atomic import atomic_directory\n"
        "with atomic_directory(sys.argv[1], writer='test') as tmp:\n"
        "    for i in range(50): (tmp / f'f{i}').write_bytes(b'x' * 1000)\n"
        "    print('ready', flush=True); time.sleep(60)\n"
    )

    def temporary_exists():
        assert any(n.endswith(".tmp") for n in hidden(tmp_path))

    _, err = interrupt_when_ready(code, tmp_path / "out", temporary_exists, timeout=30)
    assert b"KeyboardInterrupt" in err
    assert os.listdir(tmp_path) == []


def test_interrupts_are_held_while_the_output_moves_into_place(tmp_path, monkeypatch):
    """A SIGINT during the swap lands after it: the old output is never left moved aside."""
    import sampler.atomic as atomic

    real = atomic._move_into_place

    def swap_then_interrupt(holder, dest):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler would have run here if it were not held
        real(holder, dest)

    with atomic_directory(tmp_path / "d", writer="test") as tmp:
        (tmp / "v").write_text("1")
    monkeypatch.setattr(atomic, "_move_into_place", swap_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(tmp_path / "d", overwrite=True, writer="test") as tmp:
            (tmp / "v").write_text("2")
    assert (tmp_path / "d" / "v").read_text() == "2" and hidden(tmp_path) == []
