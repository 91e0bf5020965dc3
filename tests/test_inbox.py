"""The inbox: names being written, arrival order, settling, claims, filing away, and hostile names and folders."""

from __future__ import annotations

import errno
import io
import os
import time

import pytest

import daemon.service.inbox as inbox_module
from daemon.service.entries import is_ignored_name
from daemon.service.inbox import Inbox


def test_names_being_written_are_ignored():
    assert is_ignored_name(".hidden.jsonl")
    assert is_ignored_name("drop.jsonl.tmp")
    assert is_ignored_name("drop.jsonl.part")
    assert not is_ignored_name("drop.jsonl")


def test_scan_orders_entries_by_arrival_and_skips_its_own_folders_and_ignored_names(tmp_path):
    inbox = Inbox(tmp_path / "inbox", settle_seconds=0)
    for i, name in enumerate(["b.jsonl", "a.jsonl", "c.jsonl.part", ".d.jsonl"]):
        path = inbox.root / name
        path.write_text("{}\n")
        os.utime(path, (1000 + i, 1000 + i))
    (inbox.root / "subdir").mkdir()
    os.utime(inbox.root / "subdir", (2000, 2000))
    # the directory is listed so that the daemon can reject it; done/, failed/, processing/ are not
    assert [c.path.name for c in inbox.scan()] == ["b.jsonl", "a.jsonl", "subdir"]
    later = inbox.root / "0-late.jsonl"
    later.write_text("{}\n")
    os.utime(later, (10, 10))  # an old mtime, but it arrived last
    assert [c.path.name for c in inbox.scan()] == ["b.jsonl", "a.jsonl", "subdir", "0-late.jsonl"]


def _write_again(path) -> None:
    """Write ``path`` again, its mtime a second later than now: changed after any event noted before."""
    time.sleep(0.01)
    path.write_text('{"text": "more"}\n')
    os.utime(path, (time.time() + 1, time.time() + 1))


def test_a_file_is_complete_once_unchanged_for_the_settle_time_a_quarter_of_it_after_a_close(tmp_path):
    inbox = Inbox(tmp_path / "inbox", settle_seconds=30)
    path = inbox.root / "x.jsonl"
    path.write_text("{}\n")
    (cand,) = inbox.scan()
    assert not inbox.is_complete(cand)
    assert not inbox.is_complete(cand, now=time.time() + 8)
    assert inbox.is_complete(cand, now=time.time() + 31)
    inbox.note_closed(path)
    assert not inbox.is_complete(cand)
    assert inbox.is_complete(cand, now=time.time() + 8)
    _write_again(path)  # after the close: not complete
    assert not inbox.is_complete(cand, now=time.time() + 8)


def test_a_file_renamed_into_the_drop_zone_is_complete_at_once_unless_changed_after_the_rename(tmp_path):
    inbox = Inbox(tmp_path / "inbox", settle_seconds=30)
    path = inbox.root / "x.jsonl"
    path.write_text("{}\n")
    (cand,) = inbox.scan()
    assert not inbox.is_complete(cand)
    inbox.note_renamed(path)
    assert inbox.is_complete(cand)  # no settle time: the writer said it is finished
    _write_again(path)  # after the rename: the settle time again
    assert not inbox.is_complete(cand, now=time.time() + 8)
    assert inbox.is_complete(cand, now=time.time() + 32)


def test_claim_moves_out_of_the_drop_zone_and_finish_files_the_result(tmp_path):
    inbox = Inbox(tmp_path / "inbox", settle_seconds=0)
    (inbox.root / "x.jsonl").write_text("{}\n")
    (cand,) = inbox.scan()
    claimed = inbox.claim(cand)
    assert claimed.parent.name == "processing" and inbox.scan() == []
    failed = inbox.finish(claimed, "no usable examples")
    assert failed == inbox.root / "failed" / "x.jsonl"
    assert "no usable examples" in (inbox.root / "failed" / "x.jsonl.error.txt").read_text()


def _claimed(inbox: Inbox, name: str, text: str = "{}\n"):
    (inbox.root / name).write_text(text)
    (cand,) = inbox.scan()
    return inbox.claim(cand)


def _full_disk_in(monkeypatch: pytest.MonkeyPatch, folder: str) -> None:
    """Every file opened for writing inside ``folder`` fails to write with ENOSPC."""
    real_open = io.open

    class Full:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def __getattr__(self, name):
            return getattr(self._f, name)

    def full_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        where = os.readlink(f"/proc/self/fd/{f.fileno()}")
        return Full(f) if "w" in mode and f"{os.sep}{folder}{os.sep}" in where else f

    monkeypatch.setattr(io, "open", full_open)


def test_a_subfolder_replaced_by_a_symlink_is_moved_aside_and_never_followed(tmp_path, caplog):
    inbox = Inbox(tmp_path / "inbox", settle_seconds=0)
    claimed = _claimed(inbox, "x.jsonl")
    outside = tmp_path / "outside"
    outside.mkdir()
    (inbox.root / "done").rmdir()
    (inbox.root / "done").symlink_to(outside)
    assert inbox.finish(claimed, None) == inbox.root / "done" / "x.jsonl"
    assert list(outside.iterdir()) == []
    assert (inbox.root / "done").is_dir() and not (inbox.root / "done").is_symlink()
    assert (inbox.root / "done" / "x.jsonl").read_text() == "{}\n"
    assert (inbox.root / "done.not-a-folder").is_symlink()  # left in the drop zone, to be rejected as a symlink
    assert [c.path.name for c in inbox.scan()] == ["done.not-a-folder"]
    assert "inbox/done was a symbolic link" in caplog.text


def test_a_folder_swapped_for_a_symlink_after_its_check_does_not_redirect_the_move(tmp_path, monkeypatch):
    inbox = Inbox(tmp_path / "inbox", settle_seconds=0)
    claimed = _claimed(inbox, "x.jsonl")
    outside = tmp_path / "outside"
    outside.mkdir()
    real_free_name = inbox_module._free_name

    def free_name_then_swap(*args):  # the swap lands between the folder's check and the rename
        name = real_free_name(*args)
        (inbox.root / "done").rename(inbox.root / "done-real")
        (inbox.root / "done").symlink_to(outside)
        return name

    monkeypatch.setattr(inbox_module, "_free_name", free_name_then_swap)
    inbox.finish(claimed, None)
    assert list(outside.iterdir()) == []
    assert (inbox.root / "done-real" / "x.jsonl").exists()


def test_an_error_file_planted_as_a_symlink_is_replaced_never_written_through(tmp_path):
    inbox = Inbox(tmp_path / "inbox", settle_seconds=0)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (inbox.root / "failed" / "x.jsonl.error.txt").symlink_to(victim)
    inbox.finish(_claimed(inbox, "x.jsonl"), "no usable examples")
    assert victim.read_text() == "precious\n"
    error_file = inbox.root / "failed" / "x.jsonl.error.txt"
    assert not error_file.is_symlink() and "no usable examples" in error_file.read_text()


def test_names_too_long_for_derived_names_get_short_unique_ones(tmp_path):
    inbox = Inbox(tmp_path / "inbox", settle_seconds=0)
    name = "é" * 120 + "-data.jsonl"  # 251 bytes: "-1" or ".error.txt" would not fit in 255
    first = inbox.finish(_claimed(inbox, name), "no usable examples")
    second = inbox.finish(_claimed(inbox, name), "no usable examples")
    third = inbox.finish(_claimed(inbox, name), "no usable examples")
    assert first.name == name and len({first, second, third}) == 3
    failed = sorted(p.name for p in (inbox.root / "failed").iterdir())
    assert len(failed) == 6 and all(len(os.fsencode(n)) <= 255 for n in failed)
    assert all(n.startswith("é" * 100) for n in failed)  # recognisable: the name's start, then a hash
    reasons = [(inbox.root / "failed" / n).read_text() for n in failed if n.endswith(".error.txt")]
    assert sorted(r.split(" failed at ")[0] for r in reasons) == sorted(p.name for p in (first, second, third))
    assert all("no usable examples" in r for r in reasons)


def test_a_full_disk_while_writing_the_reason_still_files_the_entry_and_logs_it(tmp_path, monkeypatch, caplog):
    inbox = Inbox(tmp_path / "inbox", settle_seconds=0)
    claimed = _claimed(inbox, "x.jsonl")
    _full_disk_in(monkeypatch, "failed")
    assert inbox.finish(claimed, "no usable examples") == inbox.root / "failed" / "x.jsonl"
    assert sorted(p.name for p in (inbox.root / "failed").iterdir()) == ["x.jsonl"]  # no torn or temporary file
    assert "could not write the reason why x.jsonl failed" in caplog.text and "No space left" in caplog.text


def test_a_name_with_a_newline_cannot_forge_lines_in_its_error_file(tmp_path):
    inbox = Inbox(tmp_path / "inbox", settle_seconds=0)
    name = "x.jsonl\nforged: done"
    inbox.finish(_claimed(inbox, name), f"{name}: no usable examples")
    lines = (inbox.root / "failed" / f"{name}.error.txt").read_text().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("x.jsonl\\x0aforged: done failed at ")
    assert lines[1] == "x.jsonl\\x0aforged: done: no usable examples"


def test_a_writer_that_paused_past_the_settle_time_but_still_has_the_file_open_is_not_claimed(tmp_path):
    inbox = Inbox(tmp_path / "inbox", settle_seconds=1)
    path = inbox.root / "slow.jsonl"
    with open(path, "w") as writer:
        writer.write('{"text": "half of it"}\n')
        writer.flush()
        (cand,) = inbox.scan()
        assert not inbox.is_complete(cand, now=time.time() + 60)  # quiet for a minute, still open
    assert inbox.is_complete(cand, now=time.time() + 60)  # closed: complete
