"""daemon/store/export_snapshot.py: the publishing marker around an install, and a whole export hard-linked.

Exports here are files written as the product lays them out (``config.json``, weights,
``export.json``), installed by the product's own code where the marker matters (a rollback
replacing the export); no model is built.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from helpers import fake_checkpoint

from daemon.store import checkpoints, export_snapshot
from daemon.store.export_snapshot import PUBLISHING, export_signature, publishing, snapshot_export


def _export(root: Path, step: int) -> Path:
    """An export at ``root`` as the product leaves it: model files, then ``export.json``, each replaced whole."""
    root.mkdir(exist_ok=True)
    for name, text in {"config.json": '{"model_type": "llama"}', "model.safetensors": f"weights {step}"}.items():
        (root / f".{name}.tmp").write_text(text)
        os.replace(root / f".{name}.tmp", root / name)
    (root / ".export.json.tmp").write_text(json.dumps({"global_step": step}))
    os.replace(root / ".export.json.tmp", root / "export.json")
    return root


def test_a_snapshot_keeps_its_step_while_a_newer_export_moves_in(tmp_path):
    root = _export(tmp_path / "current_model", 1)
    (root / "checkpoint-1").mkdir()
    (root / ".export.staged").mkdir()  # the next export being written: not the export's files
    snapshot = snapshot_export(root, tmp_path / "snap")
    assert snapshot is not None and snapshot.global_step == 1
    assert snapshot.signature == export_signature(root)
    assert sorted(p.name for p in (tmp_path / "snap").iterdir()) == ["config.json", "export.json", "model.safetensors"]
    assert (tmp_path / "snap" / "model.safetensors").stat().st_ino == (root / "model.safetensors").stat().st_ino

    _export(root, 2)
    assert (tmp_path / "snap" / "model.safetensors").read_text() == "weights 1"
    assert export_signature(root) != snapshot.signature


def test_no_snapshot_while_an_export_moves_in_or_before_there_is_one(tmp_path):
    root = tmp_path / "current_model"
    root.mkdir()
    assert export_signature(root) is None
    assert snapshot_export(root, tmp_path / "none") is None
    _export(root, 1)
    (root / PUBLISHING).touch()
    assert snapshot_export(root, tmp_path / "moving") is None
    assert not (tmp_path / "none").exists() and not (tmp_path / "moving").exists()


def test_a_file_replaced_while_linking_makes_the_snapshot_fail_whole(tmp_path, monkeypatch):
    root = _export(tmp_path / "current_model", 1)
    link = export_snapshot._link_or_copy

    def replace_weights_then_link(source: Path, target: Path) -> None:
        (root / ".w.tmp").write_text("weights 2")
        os.replace(root / ".w.tmp", root / "model.safetensors")  # an install whose marker was not seen yet
        link(source, target)

    monkeypatch.setattr(export_snapshot, "_link_or_copy", replace_weights_then_link)
    assert snapshot_export(root, tmp_path / "snap") is None
    assert not (tmp_path / "snap").exists()


def test_without_hard_links_the_files_are_copied(tmp_path, monkeypatch):
    root = _export(tmp_path / "current_model", 3)

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(export_snapshot.os, "link", no_links)
    snapshot = snapshot_export(root, tmp_path / "snap")
    assert snapshot is not None and snapshot.global_step == 3
    assert (tmp_path / "snap" / "model.safetensors").read_text() == "weights 3"


def test_the_marker_stays_when_an_install_fails_part_way(tmp_path):
    root = _export(tmp_path / "current_model", 1)
    with pytest.raises(OSError), publishing(root):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert (root / PUBLISHING).exists()
    assert snapshot_export(root, tmp_path / "snap") is None
    with publishing(root):
        pass
    assert not (root / PUBLISHING).exists()


def test_a_rollback_replaces_the_export_under_the_marker(tmp_path, monkeypatch):
    root = _export(tmp_path / "current_model", 4)
    (fake_checkpoint(root, 2) / "config.json").write_text('{"model_type": "llama"}')
    fake_checkpoint(root, 4)
    seen = []
    replace = os.replace

    def replace_noting_the_marker(source, target):
        if Path(target).parent == root and not Path(target).name.startswith("."):
            seen.append((Path(target).name, (root / PUBLISHING).exists()))
        replace(source, target)

    monkeypatch.setattr(checkpoints.os, "replace", replace_noting_the_marker)
    checkpoints.roll_back(root, 2)
    assert ("config.json", True) in seen and all(marked for _, marked in seen)
    assert not (root / PUBLISHING).exists()
    snapshot = snapshot_export(root, tmp_path / "snap")
    assert snapshot is not None and snapshot.global_step == 2


def test_a_copy_that_fails_leaves_no_partial_snapshot(tmp_path, monkeypatch):
    root = _export(tmp_path / "current_model", 3)
    copied = []

    def no_links(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def copy_until_full(source, target):
        if copied:
            raise OSError(errno.ENOSPC, "No space left on device")
        copied.append(Path(target).write_bytes(Path(source).read_bytes()))

    monkeypatch.setattr(export_snapshot.os, "link", no_links)
    monkeypatch.setattr(export_snapshot.shutil, "copy2", copy_until_full)
    with pytest.raises(OSError) as full:
        snapshot_export(root, tmp_path / "snap")
    assert full.value.errno == errno.ENOSPC and copied
    assert not (tmp_path / "snap").exists()


def test_export_step_reads_the_step_an_export_holds(tmp_path):
    root = _export(tmp_path / "current_model", 5)
    assert export_snapshot.export_step(root) == checkpoints.export_step(root) == 5
    (root / "export.json").write_text('{"step": 5}')
    assert export_snapshot.export_step(root) is None
    assert export_snapshot.export_step(tmp_path / "missing") is None
