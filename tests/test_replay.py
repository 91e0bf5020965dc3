"""Replay of earlier files (the store, the mix, exactly-once) and cooldown exports."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
from helpers import SHAPES, read_status, shape_rows, stdlib_documents, train, write_jsonl

from daemon.store.checkpoints import latest_complete_checkpoint
from daemon.store.replay import add_file, fair_share, read_share, replay_count, select_replay, store_files

TOKENIZER = "t0"


def _text_file(path: Path, n: int, offset: int = 0) -> Path:
    return write_jsonl(path, [{"text": d} for d in stdlib_documents(limit=n + offset)[offset:]])


def _add(status: Path, step: int, name: str, lengths: list[int], budget: int) -> None:
    def fetch(indices: list[int]) -> list[dict[str, list[int]]]:
        return [{"input_ids": [step, i] + [0] * (lengths[i] - 2)} for i in indices]

    add_file(status, step, name, f"sha-{name}", TOKENIZER, lengths, fetch, budget, seed=0)


def _share_tokens(status: Path) -> dict[str, int]:
    return {read_share(s, p).header["file"]: read_share(s, p).tokens for s, p in store_files(status)}


def test_store_keeps_a_fair_share_per_file_within_the_token_budget(tmp_path):
    budget = 600
    for n, name in enumerate(["a", "b", "c"], start=1):
        before = {
            f: read_share(s, p).examples for s, p in store_files(tmp_path) for f in [read_share(s, p).header["file"]]
        }
        _add(tmp_path, 10 * n, name, [10 + (i % 7) for i in range(100)], budget)
        tokens = _share_tokens(tmp_path)
        assert sum(tokens.values()) <= budget
        assert all(budget // n - 16 < t <= fair_share(budget, n) for t in tokens.values())  # full up to one example
        for s, p in store_files(tmp_path):  # an earlier share is cut from its end: a prefix of what it held
            share = read_share(s, p)
            if share.header["file"] in before:
                assert share.examples == before[share.header["file"]][: len(share.examples)]
    # the same file added again (a save repeated after a crash) changes nothing
    again = _share_tokens(tmp_path)
    _add(tmp_path, 30, "c", [10 + (i % 7) for i in range(100)], budget)
    assert _share_tokens(tmp_path) == again


def test_replay_selection_is_a_function_of_the_seed_and_the_files_done_before_the_start(tmp_path):
    _add(tmp_path, 10, "a", [8] * 20, 1000)
    _add(tmp_path, 20, "b", [8] * 20, 1000)
    first = select_replay(tmp_path, 20, 30, "0:sha:20", TOKENIZER)
    assert first == select_replay(tmp_path, 20, 30, "0:sha:20", TOKENIZER)  # a resumed file: same examples, same order
    assert len(first) == 30 and {e["input_ids"][0] for e in first} == {10, 20}
    assert first != select_replay(tmp_path, 20, 30, "1:sha:20", TOKENIZER)
    # a share of a file that ended after the start (e.g. this very file, after a crash in its save) is never drawn
    assert {e["input_ids"][0] for e in select_replay(tmp_path, 10, 30, "0:sha:10", TOKENIZER)} == {10}
    assert select_replay(tmp_path, 20, 30, "0:sha:20", "another tokenizer") == []
    assert replay_count(95, 0.05) == 5 and replay_count(30, 0.25) == 10 and replay_count(30, 0.0) == 0


def test_a_file_with_replay_trains_exactly_its_planned_steps_and_reports_both_counts(tree):
    first = train(tree, _text_file(tree.root / "a.jsonl", 30), replay_fraction=0.25)
    assert first["replayed_examples"] == 0  # nothing to replay yet
    second = train(tree, _text_file(tree.root / "b.jsonl", 30, offset=30), replay_fraction=0.25)

    assert second["replayed_examples"] == replay_count(second["examples"], 0.25) > 0
    assert first["replayed_tokens"] == 0 and second["replayed_tokens"] > 0  # exact count: the test below
    assert second["planned_steps"] == math.ceil((second["examples"] + second["replayed_examples"]) / 4)
    assert second["end_step"] - second["start_step"] == second["planned_steps"]
    checkpoint = latest_complete_checkpoint(tree.output)
    assert checkpoint is not None and checkpoint.global_step == first["planned_steps"] + second["planned_steps"]
    from daemon.store.ledger import Ledger

    rows = Ledger(tree.status).entries()
    assert [r.replayed_examples for r in rows] == [0, second["replayed_examples"]]
    assert read_status(tree)["files"]["done"] == 2
    # the store holds both files' training examples, never a held-out one
    assert [read_share(s, p).header["file"] for s, p in store_files(tree.status)] == ["a.jsonl", "b.jsonl"]


def test_a_resumed_file_replays_the_same_examples_in_the_same_order(tree):
    from daemon.store.ledger import Ledger
    from daemon.training.arguments import parse_args
    from daemon.training.data import example_lengths
    from daemon.training.prepare import setup

    train(tree, _text_file(tree.root / "a.jsonl", 30))
    flags = parse_args(["--dataset", str(_text_file(tree.root / "b.jsonl", 30, offset=30)), *tree.flags()])
    flags.replay.replay_fraction = 0.25
    once = setup(flags, Ledger(tree.status), None)
    again = setup(flags, Ledger(tree.status), None)
    assert once.plan.replayed_examples == again.plan.replayed_examples > 0
    trained = int(example_lengths(once.datasets.train).sum())  # every token of the file's steps
    assert once.progress.replayed_tokens == trained - once.progress.tokens > 0
    assert once.datasets.train["input_ids"] == again.datasets.train["input_ids"]
    heldout = {tuple(ids) for ids in once.datasets.eval["input_ids"]} if once.datasets.eval is not None else set()
    stored = [e["input_ids"] for s, p in store_files(tree.status) for e in read_share(s, p).examples]
    assert stored and not heldout & {tuple(ids) for ids in stored}


def test_a_file_that_fails_after_entering_the_store_is_removed_from_it(tree, monkeypatch):
    from daemon.exceptions import TrainingError
    from daemon.store.ledger import Ledger

    train(tree, _text_file(tree.root / "a.jsonl", 30))

    def crash(self, entry_id, end_step):
        raise TrainingError("disk gone while finishing")

    monkeypatch.setattr(Ledger, "finish", crash)
    with pytest.raises(TrainingError):
        train(tree, _text_file(tree.root / "b.jsonl", 30, offset=30))
    assert [read_share(s, p).header["file"] for s, p in store_files(tree.status)] == ["a.jsonl"]


def test_a_rolled_back_file_leaves_the_store(tree):
    from daemon.store.rollback import roll_back_to

    first = train(tree, _text_file(tree.root / "a.jsonl", 30))
    train(tree, _text_file(tree.root / "b.jsonl", 30, offset=30))
    assert len(store_files(tree.status)) == 2
    roll_back_to(tree.output, tree.status, first["end_step"])
    assert [read_share(s, p).header["file"] for s, p in store_files(tree.status)] == ["a.jsonl"]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_cooldown_exports_a_cooled_branch_and_the_main_line_continues_from_before_it(tree):
    first = train(tree, _text_file(tree.root / "a.jsonl", 30), cooldown_fraction=0.5)
    assert first["cooldown_steps"] == math.ceil(0.5 * first["planned_steps"]) and first["cooldown_seconds"] > 0
    checkpoint = latest_complete_checkpoint(tree.output)
    assert checkpoint is not None and checkpoint.global_step == first["end_step"] == first["planned_steps"]
    assert sorted(p.name for p in tree.output.iterdir() if p.name.startswith(("checkpoint-", ".cooldown"))) == [
        f"checkpoint-{first['end_step']}"
    ]
    assert json.loads((tree.output / "export.json").read_text()) == {
        "global_step": first["end_step"],
        "cooldown_steps": first["cooldown_steps"],
    }
    main, exported = _weights(checkpoint.path), _weights(tree.output)
    assert any(not main[k].equal(exported[k]) for k in main)  # the export is the cooled model

    second = train(tree, _text_file(tree.root / "b.jsonl", 30, offset=30), cooldown_fraction=0.5)
    assert second["start_step"] == first["end_step"]
    log = json.loads((latest_complete_checkpoint(tree.output).path / "trainer_state.json").read_text())["log_history"]
    rates = [e["learning_rate"] for e in log if "learning_rate" in e and e["step"] > first["end_step"]]
    assert rates[0] == pytest.approx(1e-3)  # the main line's constant rate: no decayed rate carried over


def test_cooldown_learning_rate_decays_towards_zero(tree):
    from daemon.training.cooldown import branch_lambda, cooldown_steps, decay

    assert cooldown_steps(10, 0.2) == 2 and cooldown_steps(10, 0.0) == 0
    factor = branch_lambda(1.0, 100, 4, "1-sqrt")
    rates = [factor(s) for s in range(100, 104)]  # the four steps of the branch
    assert rates == sorted(rates, reverse=True) and 0 < rates[-1] < rates[0] < 1
    assert decay(1.0, "linear") == decay(1.0, "1-sqrt") == 0.0


@pytest.mark.parametrize(("first", "second"), list(itertools.product(SHAPES, repeat=2)))
def test_every_ordered_pair_of_shapes_trains_with_the_default_replay(tree, first, second):
    from daemon.store.ledger import Ledger
    from daemon.training.arguments import parse_args
    from daemon.training.prepare import setup

    docs = stdlib_documents(limit=60)
    train(tree, write_jsonl(tree.root / f"a-{first}.jsonl", shape_rows(first, docs[:30])))
    b = write_jsonl(tree.root / f"b-{second}.jsonl", shape_rows(second, docs[30:]))
    # The replayed examples keep their own label masks beside the new file's.
    prepared = setup(parse_args(["--dataset", str(b), *tree.flags()]), Ledger(tree.status), None)
    assert prepared.plan.replayed_examples > 0
    stored = {
        tuple(e["input_ids"]): e.get("labels", e["input_ids"])
        for s, p in store_files(tree.status)
        for e in read_share(s, p).examples
    }
    mixed = prepared.datasets.train.with_format(None)
    replayed = {
        tuple(ids): labels
        for ids, labels in zip(mixed["input_ids"], mixed["labels"], strict=True)
        if tuple(ids) in stored
    }
    assert replayed and all(
        (list(ids) if labels is None else labels) == stored[ids] for ids, labels in replayed.items()
    )
    row = train(tree, b)
    assert row["outcome"] == "done" and row["replayed_examples"] > 0
    assert row["end_step"] - row["start_step"] == row["planned_steps"]


def test_a_stream_of_the_three_shapes_trains_every_file_with_replay_and_a_cooldown(tree):
    docs = stdlib_documents(limit=90)
    rows = [
        train(
            tree,
            write_jsonl(tree.root / f"{n}-{shape}.jsonl", shape_rows(shape, docs[30 * n : 30 * (n + 1)])),
            cooldown_fraction=0.5,  # the cooled branch trains on the mixed examples too
        )
        for n, shape in enumerate(SHAPES[::-1])
    ]
    assert [r["outcome"] for r in rows] == ["done"] * 3
    assert rows[1]["replayed_examples"] > 0 and rows[2]["replayed_examples"] > 0
    assert [r["start_step"] for r in rows[1:]] == [r["end_step"] for r in rows[:-1]]
    assert latest_complete_checkpoint(tree.output).global_step == sum(r["planned_steps"] for r in rows)
