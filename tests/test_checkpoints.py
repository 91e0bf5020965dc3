"""Which checkpoint a run continues from: the newest *complete* one; and a save that finds the disk full."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, fake_checkpoint, fill_disk, run_cli, small_disk, stdlib_documents, train, write_jsonl

from daemon.exceptions import DiskFull
from daemon.store.checkpoints import latest_complete_checkpoint
from daemon.store.ledger import Ledger
from daemon.store.status import history_violations


def _checkpoint(root, step: int, **kw):
    return fake_checkpoint(root, step, **kw)


def test_no_checkpoint_means_start_at_zero(tmp_path):
    assert latest_complete_checkpoint(tmp_path) is None
    assert latest_complete_checkpoint(tmp_path / "missing") is None


def test_newest_complete_checkpoint_wins_by_step_not_by_name(tmp_path):
    _checkpoint(tmp_path, 9)
    _checkpoint(tmp_path, 10)
    found = latest_complete_checkpoint(tmp_path)
    assert found is not None and found.global_step == 10 and found.path.name == "checkpoint-10"


def test_torn_checkpoints_are_skipped_and_set_aside(tmp_path, caplog):
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 20, optimizer=False)
    _checkpoint(tmp_path, 30, torn_state=True)
    _checkpoint(tmp_path, 40, weights=False)
    _checkpoint(tmp_path, 50, state=False)
    found = latest_complete_checkpoint(tmp_path)
    assert found is not None and found.global_step == 10
    for step, reason in [(20, "no optimizer state"), (30, "unreadable"), (40, "no model weights"), (50, "no trainer")]:
        assert f"checkpoint-{step}: {reason}" in caplog.text
        assert (tmp_path / f"torn-checkpoint-{step}").is_dir()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-10"]


def test_looking_without_setting_aside_leaves_the_folders(tmp_path):
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 20, optimizer=False)
    assert latest_complete_checkpoint(tmp_path, set_aside=False).global_step == 10
    assert (tmp_path / "checkpoint-20").is_dir()


def _truncate(path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda f: (f / "model.safetensors").write_bytes(b""), "model.safetensors is truncated or empty"),
        (lambda f: _truncate(f / "model.safetensors", 40), "model.safetensors is truncated or empty"),
        (lambda f: _truncate(f / "optimizer.pt", 30), "optimizer.pt is truncated or empty"),
        (lambda f: (f / "scheduler.pt").unlink(), "no scheduler.pt"),
        (lambda f: (f / "scheduler.pt").write_bytes(b""), "scheduler.pt is truncated or empty"),
    ],
)
def test_a_checkpoint_torn_by_a_power_loss_is_not_taken_as_good(tmp_path, caplog, damage, reason):
    _checkpoint(tmp_path, 10)
    damage(_checkpoint(tmp_path, 20))
    found = latest_complete_checkpoint(tmp_path)
    assert found is not None and found.global_step == 10
    assert f"checkpoint-20: {reason}" in caplog.text


def test_rotation_is_by_step_keeps_the_plan_start_and_prunes_old_torn_checkpoints(tmp_path):
    from daemon.store.checkpoints import rotate_checkpoints

    for step in (2, 4, 6, 8, 10):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 12, optimizer=False)  # torn, newer than all: never deleted by rotation
    for step in (1, 3, 5):
        (tmp_path / f"torn-checkpoint-{step}").mkdir()
    deleted = rotate_checkpoints(tmp_path, keep=2, protected_steps={4})
    assert sorted(deleted) == [2, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-10",
        "checkpoint-12",
        "checkpoint-4",
        "checkpoint-8",
        "torn-checkpoint-3",
        "torn-checkpoint-5",
    ]


def test_a_committed_checkpoint_counts_only_while_its_files_keep_their_committed_sizes(tmp_path, caplog):
    from daemon.store.durable import commit_checkpoint

    _checkpoint(tmp_path, 10)
    torn = _checkpoint(tmp_path, 20)
    (torn / "rng_state.pth").write_bytes(bytes(64))  # no format check reads it: only the marker knows its size
    commit_checkpoint(torn, 20)
    assert latest_complete_checkpoint(tmp_path, set_aside=False).global_step == 20
    _truncate(torn / "rng_state.pth", 32)
    found = latest_complete_checkpoint(tmp_path)
    assert found is not None and found.global_step == 10
    assert "checkpoint-20: rng_state.pth is 32 bytes, 64 when committed" in caplog.text


def test_an_optimizer_archive_whose_directory_points_past_its_data_is_torn(tmp_path, caplog):
    _checkpoint(tmp_path, 10)
    folder = _checkpoint(tmp_path, 20)
    data = bytearray((folder / "optimizer.pt").read_bytes())
    start = data.rfind(b"PK\x01\x02")  # the member's entry in the zip directory: its sizes at offsets 20 and 24
    data[start + 20 : start + 28] = (1 << 20).to_bytes(4, "little") * 2
    (folder / "optimizer.pt").write_bytes(bytes(data))
    found = latest_complete_checkpoint(tmp_path)
    assert found is not None and found.global_step == 10
    assert "checkpoint-20: optimizer.pt is truncated or empty" in caplog.text


# A tmpfs that holds a tiny model's first file (a checkpoint of ~0.45 MB, the export ~0.15 MB) with room to spare.
DISK_KIB = 4096


def _first_file_then_full(tree, leave: int) -> tuple[dict, Path]:
    """a.jsonl trained onto a small tmpfs output folder, which is then filled up to ``leave`` bytes free."""
    a = train(tree, write_jsonl(tree.root / "a.jsonl", [{"text": d} for d in stdlib_documents(limit=8)]))
    return a, fill_disk(tree.output, leave)


def _folders(output: Path) -> list[str]:
    return sorted(p.name for p in output.iterdir() if p.is_dir())


def test_train_py_out_of_disk_space_exits_in_one_line_and_the_next_run_trains_the_file_exactly(tree):
    data = write_jsonl(tree.root / "b.jsonl", [{"text": d} for d in stdlib_documents(limit=20)[8:]])
    with small_disk(tree.output, DISK_KIB):
        a, filler = _first_file_then_full(tree, leave=200_000)
        before = _folders(tree.output)

        result = run_cli(["train.py", "--dataset", str(data), *tree.flags()], cwd=REPO)

        assert result.returncode == 4, result.stderr[-3000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: no space left in {tree.output} for checkpoint-")
        assert "bytes needed" in last and f"training resumes at step {a['end_step']}" in last
        assert "Traceback" not in result.stderr
        assert _folders(tree.output) == before  # nothing half-written is left behind
        assert latest_complete_checkpoint(tree.output, set_aside=False).global_step == a["end_step"]
        status = json.loads((tree.status / "training_status.json").read_text())
        assert status["disk"]["needed_bytes"] > status["disk"]["free_bytes"]

        filler.unlink()
        b = train(tree, data)
        assert (b["start_step"], b["end_step"] - b["start_step"]) == (a["end_step"], b["planned_steps"])
        assert latest_complete_checkpoint(tree.output, set_aside=False).global_step == b["end_step"]
    assert [r["outcome"] for r in tree.history()] == ["done", "done"]


def test_a_save_that_runs_out_of_space_after_the_check_leaves_no_partial_folder_and_stops_the_run(tree, monkeypatch):
    import daemon.training.callbacks

    data = write_jsonl(tree.root / "b.jsonl", [{"text": d} for d in stdlib_documents(limit=20)[8:]])
    with small_disk(tree.output, DISK_KIB):
        a, filler = _first_file_then_full(tree, leave=200_000)  # the weights fit, the optimizer state does not
        before = _folders(tree.output)
        with monkeypatch.context() as patch:
            patch.setattr(
                daemon.training.callbacks, "free_bytes", lambda folder: 1 << 40
            )  # another writer fills it after
            with pytest.raises(DiskFull, match=f"no space left in {tree.output}") as caught:
                train(tree, data)
        assert caught.value.needed > caught.value.free and caught.value.resume_step == a["end_step"]
        assert _folders(tree.output) == before
        assert not (tree.output / ".export.staged").exists()
        assert [e.state for e in Ledger(tree.status).entries()] == ["done", "training"]

        filler.unlink()
        b = train(tree, data)
        assert (b["start_step"], b["end_step"] - b["start_step"]) == (a["end_step"], b["planned_steps"])
    assert history_violations(tree.history()) == []


def test_the_status_shows_what_the_kept_checkpoints_cost_on_disk(tree):
    from helpers import read_status

    from daemon.views.summary import format_summary

    first = train(tree, write_jsonl(tree.root / "a.jsonl", [{"text": d} for d in stdlib_documents(limit=30)]))
    kept = read_status(tree)["checkpoints"]
    on_disk = sum(p.stat().st_size for p in (tree.output / f"checkpoint-{first['end_step']}").rglob("*") if p.is_file())
    assert kept["steps"] == [first["end_step"]] and kept["bytes"] == kept["latest_bytes"] == on_disk > 0
    assert f"checkpoints  1 kept (steps {first['end_step']})" in format_summary(read_status(tree), None, [])
