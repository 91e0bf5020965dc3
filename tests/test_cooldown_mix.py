"""The cooldown branch on a balanced mix (--cooldown_mix balanced): every done file's replay share and the file, evenly.

daemon.training.cooldown_mix.
"""

from __future__ import annotations

import pytest
from helpers import new_tree, read_status, text_file, train

from daemon.store.replay import store_files


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

    tree = new_tree(tmp_path / "t")
    flags = {"bf16": False, "replay_fraction": 0, "cooldown_fraction": 0.5, "cooldown_mix": mix}
    seen = _capture_cooldown(monkeypatch)
    train(tree, text_file(tree.root / "f0.jsonl", 0), **flags)
    if mix == "balanced":  # the first file: an empty store, so the file's own examples
        assert read_status(tree)["evaluation"]["cooldown_mix"] == {"own": len(seen[0])}
    step, path = store_files(tree.status)[0]
    earlier = {tuple(e["input_ids"]) for e in read_share(step, path).examples}
    row = train(tree, text_file(tree.root / "f1.jsonl", 12), **flags)
    branch = seen[-1]
    assert len(branch) == min(row["cooldown_steps"] * 4, len(branch)) > 0
    from_earlier = sum(tuple(ids) in earlier for ids in branch)
    if mix == "file":  # no replay: the file's own examples only
        assert from_earlier == 0
        assert "cooldown_mix" not in read_status(tree)["evaluation"]
        return
    assert from_earlier == len(branch) // 2  # two shares: the earlier file's and the file's own, evenly
    assert read_status(tree)["evaluation"]["cooldown_mix"] == {path.stem: len(branch) // 2, "own": len(branch) // 2}
