"""Which checkpoint a run continues from: the newest *complete* one."""

from __future__ import annotations

import pytest
from helpers import fake_checkpoint

from daemon.checkpoints import latest_complete_checkpoint


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
    from daemon.checkpoints import rotate_checkpoints

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
