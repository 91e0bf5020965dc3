"""Forgetting-weighted replay (--replay_weighting forgetting): the replay split over earlier files by their forgetting.

daemon.store.replay_mix.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Tree, interrupt_at, new_tree, read_status, text_file, train

from daemon.store.replay import REPLAY_DIR, Share, draw, store_files, write_share
from daemon.store.replay_mix import (
    FLOOR_SHARE,
    forgetting_weights,
    select_weighted_replay,
    split_count,
)
from daemon.store.suite import HELD_OUT


def _row(step: int, name: str, loss: float, examples: int = 4) -> dict:
    return {"step": step, "slice": name, "kind": HELD_OUT, "examples": examples, "loss": loss, "prefix_loss": {}}


def _store(status: Path, steps_and_sizes: list[tuple[int, int]]) -> None:
    """Shares at the given end steps, share ``j``'s examples all ``[step, i]`` so a draw tells whose it is."""
    for step, size in steps_and_sizes:
        path = status / REPLAY_DIR / f"{step:08d}-f{step}.jsonl"
        header = {"file": f"f{step}", "sha256": "x", "end_step": step, "tokenizer": "tok"}
        write_share(Share(step, path, header, [{"input_ids": [step, i]} for i in range(size)]))


def test_split_count_is_proportional_whole_and_sums_to_the_count():
    assert split_count(10, [1, 1]) == [5, 5]
    assert split_count(10, [3, 1]) == [8, 2]  # 7.5 / 2.5: the tie goes to the earlier
    assert split_count(7, [1, 1, 1]) == [3, 2, 2]
    assert sum(split_count(101, [0.3, 0.2, 0.5, 0.01])) == 101
    with pytest.raises(ValueError):
        split_count(3, [0, 0])


def test_draw_is_seeded_and_reuses_a_small_pool_in_fresh_orders():
    assert draw(range(10), 4, "s") == draw(range(10), 4, "s")
    twice = draw(range(3), 7, "s")
    assert len(twice) == 7 and sorted(twice[:3]) == [0, 1, 2] and sorted(twice[3:6]) == [0, 1, 2]


def test_forgetting_weights_follow_the_rise_of_each_slice_floored_and_default_to_the_mean():
    rows = [
        _row(10, "00000010-a", 2.0),
        _row(20, "00000010-a", 2.5),  # forgot 0.5
        _row(20, "00000020-b", 1.0),
        _row(30, "00000010-a", 3.0),  # forgot 1.0 by step 30
        _row(30, "00000020-b", 0.8),  # improved: floored
        _row(30, "00000030-c", 1.0),  # just trained: 0, floored
    ]
    weights = forgetting_weights(rows, [10, 20, 30, 40], 30)
    assert weights[0] == pytest.approx(1.0)
    assert weights[1] == weights[2] == pytest.approx(FLOOR_SHARE * 1.0)
    assert weights[3] == pytest.approx(sum(weights[:3]) / 3)  # no slice: the mean
    assert forgetting_weights(rows, [10, 20], 20) == pytest.approx([0.5, FLOOR_SHARE * 0.5])  # rows up to 20 only
    assert forgetting_weights([], [10, 20], 30) == [1.0, 1.0]


def test_a_file_that_forgot_more_is_replayed_more_and_the_total_is_unchanged(tmp_path):
    _store(tmp_path, [(10, 50), (20, 50)])
    rows = [_row(10, "00000010-a", 2.0), _row(20, "00000020-b", 1.0), _row(30, "00000010-a", 2.1)]
    rows += [_row(30, "00000020-b", 1.9)]  # b forgot 0.9, a 0.1
    chosen, record = select_weighted_replay(tmp_path, 30, 40, "0:sha:30", "tok", rows)
    assert len(chosen) == 40
    by_file = {10: sum(e["input_ids"][0] == 10 for e in chosen), 20: sum(e["input_ids"][0] == 20 for e in chosen)}
    assert by_file == {10: 4, 20: 36}  # 0.1 : 0.9
    assert [(r["share"], r["examples"]) for r in record] == [("00000010-f10", 4), ("00000020-f20", 36)]
    assert record[1]["forgetting"] == pytest.approx(0.9)
    # Even replay (the pool) would give each file about half: the weighting is what moved it.
    from daemon.store.replay import select_replay

    even = select_replay(tmp_path, 30, 40, "0:sha:30", "tok")
    assert 10 < sum(e["input_ids"][0] == 20 for e in even) < 30


def test_the_weighted_draw_of_a_resumed_file_is_the_same_whatever_rows_its_first_attempt_wrote(tmp_path):
    _store(tmp_path, [(10, 20), (20, 20), (40, 20)])  # the share at 40 ended after the file's start: left out
    rows = [_row(10, "00000010-a", 2.0), _row(20, "00000020-b", 1.0), _row(30, "00000010-a", 2.6)]
    first = select_weighted_replay(tmp_path, 30, 25, "0:sha:30", "tok", rows)
    # The first attempt evaluated and wrote its own rows at its end step (40), then crashed.
    later = rows + [_row(40, "00000010-a", 9.0), _row(40, "00000020-b", 0.1)]
    assert select_weighted_replay(tmp_path, 30, 25, "0:sha:30", "tok", later) == first
    assert all(e["input_ids"][0] != 40 for e in first[0])
    assert select_weighted_replay(tmp_path, 30, 25, "0:sha:31", "tok", rows)[0] != first[0]  # the seed matters


WEIGHTED = {"bf16": False, "replay_fraction": 0.3, "replay_weighting": "forgetting", "save_steps": 1}


class Crash(Exception):
    """Stands in for a kill: not a DaemonError, so nothing is recorded as failed."""


@pytest.fixture(scope="module")
def weighted(tmp_path_factory) -> Path:
    """Three files trained straight through with --replay_weighting forgetting."""
    tree = new_tree(tmp_path_factory.mktemp("weighted") / "t")
    for n in range(3):
        train(tree, text_file(tree.root / f"f{n}.jsonl", 12 * n), **WEIGHTED)
    return tree.root


def test_forgetting_weighted_replay_records_its_weights_and_replays_as_many(weighted):
    tree = Tree(weighted)
    row = tree.history()[-1]
    weights = read_status(tree)["evaluation"]["replay_weights"]
    assert [w["share"] for w in weights] == [p.stem for _, p in store_files(tree.status)][:2]
    assert sum(w["examples"] for w in weights) == row["replayed_examples"] > 0
    assert all(w["weight"] > 0 for w in weights)
    assert weights[0]["forgetting"] is not None  # the first file's slice was scored twice by then


def test_a_weighted_file_killed_part_way_resumes_to_the_weights_of_one_trained_straight_through(
    weighted, tmp_path, monkeypatch
):
    import torch
    from safetensors.torch import load_file

    straight = Tree(weighted)
    last = straight.history()[-1]
    tree = new_tree(tmp_path / "t")
    for n in range(2):
        train(tree, text_file(tree.root / f"f{n}.jsonl", 12 * n), **WEIGHTED)
    data = text_file(tree.root / "f2.jsonl", 24)
    stop_at = last["start_step"] + 2
    with monkeypatch.context() as patch:
        interrupt_at(patch, stop_at, Crash(f"killed at step {stop_at}"))
        with pytest.raises(Crash):
            train(tree, data, **WEIGHTED)
    row = train(tree, data, **WEIGHTED)
    assert (row["start_step"], row["end_step"], row["replayed_examples"]) == (
        last["start_step"],
        last["end_step"],
        last["replayed_examples"],
    )
    assert read_status(tree)["evaluation"]["replay_weights"] == read_status(straight)["evaluation"]["replay_weights"]
    ours = load_file(tree.output / f"checkpoint-{row['end_step']}" / "model.safetensors")
    theirs = load_file(straight.output / f"checkpoint-{row['end_step']}" / "model.safetensors")
    for name, tensor in theirs.items():  # the same replayed examples in the same order
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6)
