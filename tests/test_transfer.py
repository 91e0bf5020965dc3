"""Forward transfer: each file's own slice scored before training on it.

daemon.training.transfer, daemon.quality.transfer.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from helpers import Tree, interrupt_at, read_status, stdlib_documents, train, write_jsonl

from daemon.quality.forgetting import build_matrix, format_matrix, read_rows
from daemon.quality.transfer import forward_transfer, learned
from daemon.store.suite import load_suite
from daemon.training.evaluation import Scorer, SliceScore

FLAGS = {"bf16": False}  # fp32 scores on every machine: the independent score below uses no autocast


def _text_file(path: Path, first: int, count: int = 12) -> Path:
    return write_jsonl(path, [{"text": d} for d in stdlib_documents(limit=first + count)[first:]])


@pytest.fixture(scope="module")
def two_files(tmp_path_factory) -> Path:
    """A tree trained on two files of json's sources, forward transfer on (the default)."""
    tree = Tree(tmp_path_factory.mktemp("transfer"))
    for folder in (tree.inbox, tree.status, tree.output):
        folder.mkdir()
    train(tree, _text_file(tree.root / "a.jsonl", 0), **FLAGS)
    train(tree, _text_file(tree.root / "b.jsonl", 12), **FLAGS)
    return tree.root


def _scored_by_checkpoint(tree: Tree, step: int, own: dict) -> SliceScore:
    """``own``'s slice scored independently by ``checkpoint-<step>``, as the evaluation scores (fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tree.output / f"checkpoint-{step}")
    tokenizer = AutoTokenizer.from_pretrained(tree.output)
    suite, errors = load_suite(tree.status, own["step"], [], "text", 1000)
    piece = next(s for s in suite if s.name == own["slice"])
    assert errors == [] and len(piece.records) == own["examples"]
    score = SliceScore(piece.name, piece.kind)
    Scorer(model, tokenizer, max_length=32, batch_size=8, autocast=None).score(piece, 0, len(piece.records), score)
    score.vocabulary = model.get_output_embeddings().weight.shape[0]  # type: ignore[attr-defined]
    return score


def _own_row(tree: Tree, row: dict) -> dict:
    rows = read_rows(tree.status)
    return next(r for r in rows if r["step"] == row["end_step"] and r["slice"].startswith(f"{r['step']:08d}-"))


def test_the_second_files_before_loss_is_the_first_models_loss_on_its_slice_scored_independently(two_files):
    tree = Tree(two_files)
    first, second = tree.history()
    own = _own_row(tree, second)
    assert own["before_step"] == first["end_step"] == second["start_step"]

    score = _scored_by_checkpoint(tree, first["end_step"], own)  # a kept file boundary: the model b started from
    assert own["before_loss"] == pytest.approx(score.prefix_loss(score.examples), abs=1e-5)
    assert own["forward_transfer"] == pytest.approx(math.log(score.vocabulary) - own["before_loss"])
    assert own["before_bits_per_byte"] == pytest.approx(sum(score.example_nats) / (math.log(2) * score.bytes), abs=1e-6)
    assert learned(own) == pytest.approx(own["before_loss"] - own["loss"])


def test_a_file_resumed_part_way_keeps_the_score_of_the_model_it_started_from(tmp_path, monkeypatch):
    from daemon.exceptions import TrainingInterrupted

    tree = Tree(tmp_path / "t")
    tree.root.mkdir()
    first = train(tree, _text_file(tree.root / "a.jsonl", 0), **FLAGS)
    data = _text_file(tree.root / "b.jsonl", 12)
    with monkeypatch.context() as patch:
        interrupt_at(patch, first["end_step"] + 1)
        with pytest.raises(TrainingInterrupted):
            train(tree, data, save_steps=1, **FLAGS)
    second = train(tree, data, **FLAGS)  # resumes at start + 1: the model in memory is not the start's

    own = _own_row(tree, second)
    assert second["start_step"] == first["end_step"] and own["before_step"] == first["end_step"]
    score = _scored_by_checkpoint(tree, first["end_step"], own)
    assert own["before_loss"] == pytest.approx(score.prefix_loss(score.examples), abs=1e-5)


def test_the_matrix_status_and_snapshot_show_each_files_before_and_the_streams_forward_transfer(two_files):
    tree = Tree(two_files)
    rows = read_rows(tree.status)
    first, second = tree.history()
    m = build_matrix(rows)
    firsts = [r for r in rows if "before_loss" in r]
    assert [r["step"] for r in firsts] == [first["end_step"], second["end_step"]]
    assert m.before == [r["before_loss"] for r in firsts]
    assert firsts[0]["before_step"] == 0  # the line's initial model: left out of the stream's mean (GEM: i >= 2)

    status = read_status(tree)["forward_transfer"]
    assert status == forward_transfer(rows, second["end_step"])
    assert status["files"] == 1 and status["mean"] == pytest.approx(firsts[1]["forward_transfer"])
    assert status["before_loss"] == firsts[1]["before_loss"] and status["after_loss"] == firsts[1]["loss"]
    snapshot = json.loads(next((tree.status / "evolution").glob("*-b/snapshot.json")).read_text())
    assert snapshot["forward_transfer"] == status

    lines = format_matrix(rows)
    assert any(line.startswith("own slice before -> after") for line in lines)
    assert sum(line.split()[0] in ("1", "2") and len(line.split()) == 6 for line in lines) == 2


def test_no_forward_transfer_leaves_the_rows_as_before(tmp_path, two_files):
    shutil.copytree(two_files, tmp_path / "tree")
    tree = Tree(tmp_path / "tree")
    row = train(tree, _text_file(tree.root / "c.jsonl", 24), forward_transfer=False, **FLAGS)
    rows = [r for r in read_rows(tree.status) if r["step"] == row["end_step"]]
    assert rows and not any("before_loss" in r for r in rows)
    assert read_status(tree)["forward_transfer"]["before_loss"] is None  # the stream's figures stay
    assert read_status(tree)["forward_transfer"]["files"] == 1


def test_a_kept_score_of_other_examples_is_not_reported(caplog):
    # A file resumed after its slice came to encode differently: the kept score is of other examples.
    from daemon.training.evaluation import SliceScore
    from daemon.training.transfer import BeforeScore, add_before

    kept = BeforeScore(SliceScore("s", "text", [2.0, 4.0], [2, 2], 40), step=10, vocabulary=320, seconds=0.0)
    row = {"examples": 3, "bytes": 60}
    add_before(row, kept)
    assert row == {"examples": 3, "bytes": 60}
    assert "not reported" in caplog.text
    same = {"examples": 2, "bytes": 40}
    add_before(same, kept)
    assert same["before_step"] == 10 and same["forward_transfer"] == pytest.approx(math.log(320) - same["before_loss"])
