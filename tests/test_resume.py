"""Interrupted mid-file and restarted, a file trains exactly its remaining steps on its unseen part.

So does a done file whose end checkpoint came back torn: the daemon reopens it (daemon/store/reconcile.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import Tree, daemon_argv, interrupt_at, run_cli, stdlib_documents, train, write_jsonl

from daemon.exceptions import CheckpointError, TrainingInterrupted
from daemon.store.checkpoints import latest_complete_checkpoint
from daemon.store.ledger import Ledger
from daemon.store.status import history_violations
from daemon.training.plan import StepPlan


class Crash(Exception):
    """Stands in for a kill: not a DaemonError, so nothing is recorded as failed."""


def _losses(tree: Tree) -> dict[int, float]:
    checkpoint = max(tree.output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e["loss"] for e in history if "loss" in e}


def test_segments_cover_the_remaining_steps_epoch_by_epoch():
    plan = StepPlan(10, 10, 2, 1, 1, epochs=2.5)  # 5 steps per epoch, 13 for the file
    assert plan.planned_steps == 13
    assert plan.segments(0) == [(0, 0, 5), (1, 0, 5), (2, 0, 3)]
    assert plan.segments(7) == [(1, 2, 3), (2, 0, 3)]
    assert plan.segments(13) == []


@pytest.mark.parametrize("how", ["sigterm", "crash"])
def test_an_interrupted_file_resumes_and_matches_an_uninterrupted_run(tmp_path, monkeypatch, how):
    docs = [{"text": d} for d in stdlib_documents(limit=40)]
    flags = {"save_steps": 4, "num_train_epochs": 2}

    straight = Tree(tmp_path / "straight")
    straight.root.mkdir()
    train(straight, write_jsonl(straight.root / "warmup.jsonl", docs[:10]), **flags)
    expected = train(straight, write_jsonl(straight.root / "a.jsonl", docs[10:]), **flags)

    tree = Tree(tmp_path / "interrupted")
    tree.root.mkdir()
    train(tree, write_jsonl(tree.root / "warmup.jsonl", docs[:10]), **flags)
    data = write_jsonl(tree.root / "a.jsonl", docs[10:])
    stop_at = expected["start_step"] + expected["planned_steps"] // 2 + 1
    with monkeypatch.context() as patch:
        interrupt_at(patch, stop_at, Crash(f"killed at step {stop_at}") if how == "crash" else None)
        with pytest.raises(TrainingInterrupted if how == "sigterm" else Crash):
            train(tree, data, **flags)
    (entry,) = Ledger(tree.status).entries("training")
    assert (entry.start_step, entry.planned_steps) == (expected["start_step"], expected["planned_steps"])
    resumed = train(tree, data, **flags)

    assert resumed["start_step"] == expected["start_step"]
    assert resumed["end_step"] == expected["end_step"]
    assert history_violations(tree.history()) == []
    assert [r["file"] for r in tree.history()] == ["warmup.jsonl", "a.jsonl"]  # trained once, recorded once
    # Same data order, optimizer and RNG state: the per-step losses of both runs agree.
    assert _losses(tree) == pytest.approx(_losses(straight), rel=1e-4)
    assert Ledger(tree.status).entries("done")[-1].end_step == expected["end_step"]


def test_a_file_trained_but_not_finished_is_not_trained_again(tree, monkeypatch):
    import daemon.training.outputs as run

    data = write_jsonl(tree.root / "a.jsonl", [{"text": d} for d in stdlib_documents(limit=20)])
    with monkeypatch.context() as patch:
        patch.setattr(run, "export_model", lambda *a, **k: (_ for _ in ()).throw(Crash("killed in export")))
        with pytest.raises(Crash):
            train(tree, data)
    assert tree.history() == []
    row = train(tree, data)
    assert row["train_loss"] is None  # no step left: only evaluation, samples, export and the record
    assert row["end_step"] - row["start_step"] == row["planned_steps"] > 0
    assert len(tree.history()) == 1


def _two_done_files(tree: Tree, **flags: object) -> tuple[dict, dict]:
    """a.jsonl and b.jsonl trained from ``inbox/done/``, where the daemon files them, with mid-file checkpoints."""
    docs = [{"text": d} for d in stdlib_documents(limit=40)]
    a = train(tree, write_jsonl(tree.inbox / "done" / "a.jsonl", docs[:8]), **flags)
    b = train(tree, write_jsonl(tree.inbox / "done" / "b.jsonl", docs[8:20]), **flags)
    return a, b


def _tear_in_half(path: Path) -> None:
    """What a power loss can leave of a file whose data was not yet on disk."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _steps_of_done_files(tree: Tree) -> int:
    return sum(e.planned_steps or 0 for e in Ledger(tree.status).entries("done"))


def test_a_torn_end_checkpoint_reopens_its_file_and_the_steps_add_up_after_the_next_file(tree):
    from safetensors.torch import load_file

    flags = {"save_steps": 4}
    a, b = _two_done_files(tree, **flags)
    end = tree.output / f"checkpoint-{b['end_step']}"
    before = {k: v.clone() for k, v in load_file(end / "model.safetensors").items()}  # mapped: copied before the tear
    _tear_in_half(end / "model.safetensors")
    usable = latest_complete_checkpoint(tree.output, set_aside=False)
    assert usable is not None and b["start_step"] < usable.global_step < b["end_step"]
    write_jsonl(tree.inbox / "c.jsonl", [{"text": d} for d in stdlib_documents(limit=30)[20:]])

    result = run_cli(daemon_argv(tree, "--once", **flags), cwd=tree.root)

    assert result.returncode == 0, result.stderr[-3000:]
    assert f"b.jsonl: reopened: the latest usable checkpoint is step {usable.global_step}" in result.stderr
    outcomes = [(r["file"], r["outcome"], r["start_step"], r["end_step"]) for r in tree.history()]
    assert outcomes == [
        ("a.jsonl", "done", 0, a["end_step"]),
        ("b.jsonl", "done", b["start_step"], b["end_step"]),
        ("b.jsonl", "reopened", b["start_step"], b["end_step"]),
        ("b.jsonl", "done", b["start_step"], b["end_step"]),
        ("c.jsonl", "done", b["end_step"], tree.history()[-1]["end_step"]),
    ]
    assert history_violations(tree.history()) == []
    assert json.loads((tree.status / "training_status.json").read_text())["files"]["done"] == 3
    latest = latest_complete_checkpoint(tree.output, set_aside=False)
    assert latest is not None and latest.global_step == _steps_of_done_files(tree) == tree.history()[-1]["end_step"]
    # b's lost steps were trained again on the same examples in the same order: the same weights.
    again = load_file(tree.output / f"checkpoint-{b['end_step']}" / "model.safetensors")
    assert all(torch.allclose(again[k], before[k], rtol=1e-4, atol=1e-6) for k in before)
    assert sorted(p.name for p in (tree.inbox / "done").iterdir()) == ["a.jsonl", "b.jsonl", "c.jsonl"]


def test_a_run_on_its_own_refuses_to_train_past_a_done_file_whose_steps_are_missing(tree):
    _, b = _two_done_files(tree, save_steps=4)
    _tear_in_half(tree.output / f"checkpoint-{b['end_step']}" / "model.safetensors")
    c = write_jsonl(tree.root / "c.jsonl", [{"text": d} for d in stdlib_documents(limit=30)[20:]])
    with pytest.raises(CheckpointError, match=r"behind done files the ledger counts: b\.jsonl") as caught:
        train(tree, c, save_steps=4)
    assert "python -m daemon" in str(caught.value) and "\n" not in str(caught.value)
    assert [e.name for e in Ledger(tree.status).entries("done")] == ["a.jsonl", "b.jsonl"]


def test_a_daemon_whose_reopened_file_is_gone_from_the_inbox_stops_in_one_line_and_changes_nothing(tree):
    a, b = _two_done_files(tree, save_steps=4)
    _tear_in_half(tree.output / f"checkpoint-{b['end_step']}" / "model.safetensors")
    (tree.inbox / "done" / "b.jsonl").unlink()
    write_jsonl(tree.inbox / "c.jsonl", [{"text": d} for d in stdlib_documents(limit=30)[20:]])
    history = tree.history()

    result = run_cli(daemon_argv(tree, "--once", save_steps=4), cwd=tree.root)

    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the latest usable checkpoint in ") and "b.jsonl (steps" in last
    assert f"python -m daemon rollback --to_step {a['end_step']}" in last
    assert "Traceback" not in result.stderr
    assert tree.history() == history
    assert [e.state for e in Ledger(tree.status).entries()] == ["done", "done"]
    assert (tree.inbox / "c.jsonl").exists()  # not claimed
