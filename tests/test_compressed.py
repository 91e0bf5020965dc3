"""Compressed drops: gzip and zstd files train like their content; the hash is of the file as dropped."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import zstandard
from helpers import Tree, daemon_argv, run_cli, stdlib_documents, train, write_jsonl

from daemon.exceptions import DatasetError
from daemon.store.jsonl import iter_records, scan_jsonl


def _rows(limit: int = 12, start: int = 0) -> list[dict]:
    return [{"text": d} for d in stdlib_documents(limit=start + limit)[start:]]


def _plain(path: Path, rows: list[dict]) -> bytes:
    return write_jsonl(path, rows).read_bytes()


def _compressed(path: Path, content: bytes, kind: str) -> Path:
    data = gzip.compress(content, mtime=0) if kind == "gzip" else zstandard.ZstdCompressor().compress(content)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_compressed_file_is_read_as_its_content_even_under_a_plain_name(tmp_path, kind):
    content = _plain(tmp_path / "plain.jsonl", _rows())
    for name in (f"x.jsonl.{'gz' if kind == 'gzip' else 'zst'}", "no-suffix-says-so.jsonl"):
        path = _compressed(tmp_path / name, content, kind)
        report = scan_jsonl(path)
        assert (report.usable, report.shape, report.bad_lines) == (12, "text", 0)
        assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()  # of the file as dropped
        assert [r["text"] for r in iter_records(report)] == [r["text"] for r in _rows()]


def test_zstd_frames_one_after_another_are_all_read(tmp_path):
    first, second = _plain(tmp_path / "a", _rows(6)), _plain(tmp_path / "b", _rows(6, start=6))
    compressor = zstandard.ZstdCompressor()
    path = tmp_path / "two-frames.jsonl.zst"
    path.write_bytes(compressor.compress(first) + compressor.compress(second))
    assert scan_jsonl(path).usable == 12


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_truncated_compressed_file_fails_with_one_line_instead_of_training_half_of_it(tmp_path, kind):
    content = b"".join(json.dumps({"text": f"line {i} " * 20}).encode() + b"\n" for i in range(2000))
    whole = _compressed(tmp_path / "whole", content, kind).read_bytes()
    path = tmp_path / "cut.jsonl.z"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DatasetError, match=rf"cut.jsonl.z: damaged or truncated {kind} data") as failed:
        scan_jsonl(path)
    assert "\n" not in str(failed.value)


def test_a_compressed_file_of_binary_content_is_still_called_binary(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(gzip.compress(bytes(range(256)) * 8))
    with pytest.raises(DatasetError, match="binary file"):
        scan_jsonl(path)


def test_gzip_and_zstd_files_train_the_same_steps_as_their_plain_content(tree):
    content = _plain(tree.root / "data" / "plain.jsonl", _rows(16))
    rows = [train(tree, tree.root / "data" / "plain.jsonl", replay_fraction=0)]  # each file its own steps only
    for name, kind in (("drop.jsonl.gz", "gzip"), ("drop.jsonl.zst", "zstd")):
        path = _compressed(tree.root / "data" / name, content, kind)
        rows.append(train(tree, path, replay_fraction=0))
        assert rows[-1]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len({(r["examples"], r["tokens"], r["planned_steps"]) for r in rows}) == 1
    assert [r["outcome"] for r in rows] == ["done"] * 3
    assert rows[2]["end_step"] == 3 * rows[0]["planned_steps"]


def test_the_daemon_trains_gzip_and_zstd_drops_and_skips_one_dropped_again(tree: Tree):
    content = _plain(tree.root / "plain.jsonl", _rows(16))
    _compressed(tree.inbox / "1-drop.jsonl.gz", content, "gzip")
    _compressed(tree.inbox / "2-drop.jsonl.zst", content, "zstd")
    _compressed(tree.root / "again.gz", content, "gzip")
    result = run_cli(daemon_argv(tree, "--once", replay_fraction=0), cwd=tree.root)
    assert result.returncode == 0, result.stderr[-3000:]
    gz, zst = tree.history()
    assert (gz["file"], gz["outcome"], zst["file"], zst["outcome"]) == (
        "1-drop.jsonl.gz",
        "done",
        "2-drop.jsonl.zst",
        "done",
    )
    assert gz["planned_steps"] == zst["planned_steps"] and zst["start_step"] == gz["end_step"]
    assert sorted(p.name for p in (tree.inbox / "done").iterdir()) == ["1-drop.jsonl.gz", "2-drop.jsonl.zst"]

    (tree.root / "again.gz").rename(tree.inbox / "3-same-bytes.jsonl.gz")  # the same file as dropped: once only
    result = run_cli(daemon_argv(tree, "--once", replay_fraction=0), cwd=tree.root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped: same content" in (tree.inbox / "failed" / "3-same-bytes.jsonl.gz.error.txt").read_text()
    assert len(tree.history()) == 2
