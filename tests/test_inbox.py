"""The inbox: names being written, arrival order, settling, claims and filing away."""

from __future__ import annotations

import os
import time

from daemon.inbox import Inbox, is_ignored_name


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
    time.sleep(0.01)
    path.write_text('{"text": "more"}\n')  # written again after the close: not complete
    os.utime(path, (time.time() + 1, time.time() + 1))
    assert not inbox.is_complete(cand, now=time.time() + 8)


def test_claim_moves_out_of_the_drop_zone_and_finish_files_the_result(tmp_path):
    inbox = Inbox(tmp_path / "inbox", settle_seconds=0)
    (inbox.root / "x.jsonl").write_text("{}\n")
    (cand,) = inbox.scan()
    claimed = inbox.claim(cand)
    assert claimed.parent.name == "processing" and inbox.scan() == []
    failed = inbox.finish(claimed, "no usable examples")
    assert failed == inbox.root / "failed" / "x.jsonl"
    assert "no usable examples" in (inbox.root / "failed" / "x.jsonl.error.txt").read_text()
