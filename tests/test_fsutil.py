"""fsutil's atomic file writes: the target is the old file or the complete new one, and no temporary file stays."""

from __future__ import annotations

from pathlib import Path

import pytest

from mistral_tune.fsutil import atomic_path, atomic_write_text


class _Boom(Exception):
    pass


def test_atomic_write_text_replaces_and_leaves_nothing_beside(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old\n", encoding="utf-8")
    atomic_write_text(target, "new \u00e9\n")
    assert target.read_text(encoding="utf-8") == "new \u00e9\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failing_writer_keeps_the_old_file_and_removes_the_temporary_one(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    target.write_text("old\n", encoding="utf-8")
    with pytest.raises(_Boom), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("half written", encoding="utf-8")
        raise _Boom
    assert target.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_a_failing_writer_creates_no_target(tmp_path: Path) -> None:
    target = tmp_path / "new.txt"
    with pytest.raises(_Boom), atomic_path(target) as tmp:
        tmp.write_text("x")
        raise _Boom
    assert list(tmp_path.iterdir()) == []


def test_the_temporary_name_never_takes_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    with atomic_path(target) as first:  # the name this process picks first
        first.write_text("done\n")
    first.write_text("a user's file that only looks like our temporary one\n")
    with atomic_path(target) as second:
        assert second != first
        second.write_text("again\n")
    assert first.read_text() == "a user's file that only looks like our temporary one\n"
    assert target.read_text() == "again\n"
