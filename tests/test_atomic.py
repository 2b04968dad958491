"""sampler.atomic.atomic_output: one mechanism for every writer's files and folders."""

from __future__ import annotations

import os

import pytest

from sampler.atomic import atomic_directory, atomic_output


def hidden(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def test_a_file_and_a_folder_land_whole_and_leave_nothing_beside(tmp_path):
    with atomic_output(tmp_path / "a.txt") as tmp:
        assert not os.path.lexists(tmp) and not (tmp_path / "a.txt").exists()
        tmp.write_text("one")
    assert (tmp_path / "a.txt").read_text() == "one"
    with atomic_directory(tmp_path / "d") as tmp:
        (tmp / "x").write_text("inside")
    assert (tmp_path / "d" / "x").read_text() == "inside"
    assert hidden(tmp_path) == []
    assert oct((tmp_path / "d").stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # not mkdtemp's private 0o700


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_refuses_to_overwrite_unless_asked_and_replaces_a_folder_by_a_file(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("old")
    with pytest.raises(FileExistsError, match="out exists; pass overwrite=True"), atomic_output(tmp_path / "out"):
        pass
    with atomic_output(tmp_path / "out", overwrite=True) as tmp:
        tmp.write_text("new")
    assert (tmp_path / "out").is_file() and (tmp_path / "out").read_text() == "new"
    assert hidden(tmp_path) == []


def test_an_error_leaves_the_destination_as_it_was(tmp_path):
    (tmp_path / "keep.txt").write_text("before")
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "keep.txt", overwrite=True) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert (tmp_path / "keep.txt").read_text() == "before"
    assert hidden(tmp_path) == []


def test_a_destination_that_appears_meanwhile_is_not_clobbered(tmp_path):
    with pytest.raises(FileExistsError, match="appeared while writing"), \
            atomic_output(tmp_path / "race.txt") as tmp:
        tmp.write_text("mine")
        (tmp_path / "race.txt").write_text("theirs")
    assert (tmp_path / "race.txt").read_text() == "theirs"
    assert hidden(tmp_path) == []


def test_nothing_written_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic_output(tmp_path / "empty"):
        pass
    assert not (tmp_path / "empty").exists() and hidden(tmp_path) == []
