"""TensorBoard as one continuous run across files, and the report and loss series every file leaves."""

from __future__ import annotations

from helpers import stdlib_documents, train, write_jsonl

from daemon.store.status import read_loss_series
from daemon.training.tensorboard_run import tensorboard_dir


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_two_files_log_one_run_with_continuing_steps_boundaries_and_eval_scalars(tree):
    docs = stdlib_documents(limit=24)
    first = write_jsonl(tree.root / "first.jsonl", [{"text": d} for d in docs[:12]])
    second = write_jsonl(tree.root / "second.jsonl", [{"text": d} for d in docs[12:]])
    a = train(tree, first, report_to="tensorboard")
    b = train(tree, second, report_to="tensorboard")
    assert b["start_step"] == a["end_step"] > 0

    folder = tensorboard_dir(tree.status)
    assert [p.name for p in folder.iterdir() if p.is_dir()] == []  # one run: no per-process subfolder
    scalars = _scalars(folder)
    loss_steps = [step for step, _ in scalars["train/loss"]]
    assert loss_steps == sorted(set(loss_steps))
    assert loss_steps[0] <= a["end_step"] < loss_steps[-1] <= b["end_step"]  # both files, one line
    assert scalars["file/index"] == [(a["start_step"], 1.0), (b["start_step"], 2.0)]
    own = [tag for tag in scalars if tag.startswith("eval/") and tag.endswith("/loss")]
    assert len(own) == 2  # the two held-out slices
    assert {step for tag in own for step, _ in scalars[tag]} == {a["end_step"], b["end_step"]}
    assert [step for step, _ in scalars["forgetting/mean"]] == [b["end_step"]]
    assert [step for step, _ in scalars["forward_transfer/before_loss"]] == [a["end_step"], b["end_step"]]
    assert [step for step, _ in scalars["forward_transfer/mean"]] == [b["end_step"]]  # the line's first file: none

    series = read_loss_series(tree.status)  # the report's loss curve: every logging step of both files
    assert [p["step"] for p in series] == loss_steps
    assert {p["file"] for p in series} == {"first.jsonl", "second.jsonl"}
    assert (tree.status / "report.html").stat().st_size > 10_000  # rewritten after each file
