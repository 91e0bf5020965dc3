"""Interrupted mid-file and restarted, a file trains exactly its remaining steps on its unseen part."""

from __future__ import annotations

import json

import pytest
from helpers import Tree, stdlib_documents, train, write_jsonl

from daemon.callbacks import PlanCallback
from daemon.exceptions import TrainingInterrupted
from daemon.ledger import Ledger
from daemon.plan import StepPlan
from daemon.status import history_violations


class Crash(Exception):
    """Stands in for a kill: not a DaemonError, so nothing is recorded as failed."""


def _losses(tree: Tree) -> dict[int, float]:
    checkpoint = max(tree.output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e["loss"] for e in history if "loss" in e}


def _interrupt_at(monkeypatch, step: int, how: str) -> None:
    original = PlanCallback.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == step:
            if how == "crash":
                raise Crash(f"killed at step {step}")
            self.stop_requested.set()  # what the SIGTERM handler does
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(PlanCallback, "on_step_end", on_step_end)


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
        _interrupt_at(patch, stop_at, how)
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
    import daemon.run as run

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
