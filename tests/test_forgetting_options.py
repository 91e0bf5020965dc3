"""Options against forgetting: the cooldown's balanced mix and forgetting-weighted replay.

daemon.store.replay_mix, daemon.training.cooldown_mix, daemon.training.technique_flags.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Tree, read_status, stdlib_documents, train, write_jsonl

from daemon.exceptions import ConfigError
from daemon.store.replay import REPLAY_DIR, Share, store_files, write_share
from daemon.store.replay_mix import (
    FLOOR_SHARE,
    draw,
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


def _text_file(path: Path, first: int, count: int = 12) -> Path:
    return write_jsonl(path, [{"text": d} for d in stdlib_documents(limit=first + count)[first:]])


def _new_tree(root: Path) -> Tree:
    tree = Tree(root)
    for folder in (tree.inbox, tree.status, tree.output):
        folder.mkdir(parents=True)
    return tree


def _capture_cooldown(monkeypatch) -> list:
    """The datasets the cooldown branch trains on, as lists of ``input_ids``."""
    import daemon.training.cooldown as cooldown

    seen: list = []
    real = cooldown.cooldown_examples

    def capture(prepared, flags, count):
        data = real(prepared, flags, count)
        seen.append([list(map(int, ids)) for ids in data.with_format(None)["input_ids"]])
        return data

    monkeypatch.setattr(cooldown, "cooldown_examples", capture)
    return seen


@pytest.mark.parametrize("mix", ["file", "balanced"])
def test_the_balanced_cooldown_trains_on_every_done_files_share_and_the_file(tmp_path, monkeypatch, mix):
    from daemon.store.replay import read_share

    tree = _new_tree(tmp_path / "t")
    flags = {"bf16": False, "replay_fraction": 0, "cooldown_fraction": 0.5, "cooldown_mix": mix}
    seen = _capture_cooldown(monkeypatch)
    train(tree, _text_file(tree.root / "f0.jsonl", 0), **flags)
    if mix == "balanced":  # the first file: an empty store, so the file's own examples
        assert read_status(tree)["evaluation"]["cooldown_mix"] == {"own": len(seen[0])}
    step, path = store_files(tree.status)[0]
    earlier = {tuple(e["input_ids"]) for e in read_share(step, path).examples}
    row = train(tree, _text_file(tree.root / "f1.jsonl", 12), **flags)
    branch = seen[-1]
    assert len(branch) == min(row["cooldown_steps"] * 4, len(branch)) > 0
    from_earlier = sum(tuple(ids) in earlier for ids in branch)
    if mix == "file":  # no replay: the file's own examples only
        assert from_earlier == 0
        assert "cooldown_mix" not in read_status(tree)["evaluation"]
        return
    assert from_earlier == len(branch) // 2  # two shares: the earlier file's and the file's own, evenly
    assert read_status(tree)["evaluation"]["cooldown_mix"] == {path.stem: len(branch) // 2, "own": len(branch) // 2}


def test_forgetting_weighted_replay_records_its_weights_and_replays_as_many(tmp_path):
    tree = _new_tree(tmp_path / "t")
    flags = {"bf16": False, "replay_fraction": 0.3, "replay_weighting": "forgetting"}
    for n in range(3):
        row = train(tree, _text_file(tree.root / f"f{n}.jsonl", 12 * n), **flags)
    weights = read_status(tree)["evaluation"]["replay_weights"]
    assert [w["share"] for w in weights] == [p.stem for _, p in store_files(tree.status)][:2]
    assert sum(w["examples"] for w in weights) == row["replayed_examples"] > 0
    assert all(w["weight"] > 0 for w in weights)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"cooldown_mix": "balanced"}, "--cooldown_mix balanced .* needs --cooldown_fraction > 0"),
        ({"replay_weighting": "forgetting", "replay_fraction": 0}, "needs --replay_fraction > 0"),
        ({"wise_ft": True}, "--wise_ft .* needs a line started from --model_name_or_path"),
    ],
)
def test_options_that_cannot_work_are_refused_in_one_line(tree, flags, message):
    from daemon.training.arguments import parse_args

    with pytest.raises(ConfigError, match=message):
        parse_args(["--dataset", "x.jsonl", *tree.flags(**flags)])


def test_every_option_is_off_by_default(tree):
    from daemon.training.arguments import parse_args

    techniques = parse_args(["--dataset", "x.jsonl", *tree.flags()]).techniques
    assert (techniques.cooldown_mix, techniques.replay_weighting, techniques.wise_ft) == ("file", "even", False)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_the_wise_ft_export_interpolates_the_end_checkpoint_with_the_base_at_the_best_weight(
    tmp_path, monkeypatch, exported
):
    import hashlib

    import torch

    import daemon.training.wise as wise

    monkeypatch.setattr(wise, "ALPHAS", (0.5, 0.75))  # neither is the trained model itself
    digest = hashlib.sha256((exported / "model.safetensors").read_bytes()).hexdigest()
    tree = _new_tree(tmp_path / "t")
    row = train(tree, _text_file(tree.root / "f0.jsonl", 0), bf16=False, wise_ft=True, model_name_or_path=exported)
    recorded = read_status(tree)["evaluation"]["wise_ft"]
    assert set(recorded["losses"]) == {"0.5", "0.75"}
    alpha = recorded["alpha"]
    assert recorded["losses"][str(alpha)] == min(recorded["losses"].values())
    base, end = _weights(exported), _weights(tree.output / f"checkpoint-{row['end_step']}")
    export = _weights(tree.output)
    for name, tensor in export.items():
        expected = (1 - alpha) * base[name].double() + alpha * end[name].double()
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6)
    assert not torch.equal(export["model.norm.weight"], end["model.norm.weight"])
    assert hashlib.sha256((exported / "model.safetensors").read_bytes()).hexdigest() == digest  # never written


def test_wise_ft_is_refused_with_peft_and_on_a_base_in_the_output_folder(tree, exported):
    import shutil

    from daemon.training.arguments import parse_args

    with pytest.raises(ConfigError, match="--wise_ft interpolates every weight"):
        parse_args(["--dataset", "x.jsonl", *tree.flags(wise_ft=True, model_name_or_path=exported, use_peft=True)])
    shutil.rmtree(tree.output)
    shutil.copytree(exported, tree.output)
    with pytest.raises(ConfigError, match="--wise_ft needs the base model's weights kept"):
        parse_args(["--dataset", "x.jsonl", *tree.flags(wise_ft=True)])
