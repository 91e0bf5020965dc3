"""``python -m daemon rollback``: back to a kept file boundary, exactly, even when killed part-way.

Three files are trained once for the module (``save_total_limit 1``, a checkpoint every 5
steps); each test works on a copy of that tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock
from helpers import REPO, Tree, run_cli, stdlib_documents, train, write_jsonl

from daemon.store.ledger import Ledger
from daemon.store.rollback import EXIT_AFTER_ENV, INTENT_FILE, kept_file_ends
from daemon.store.status import SNAPSHOT_FIGURES, history_violations, latest_snapshot

SMALL_ROTATION = {"save_steps": 5, "save_total_limit": 1}  # would keep only the newest and the file's start


def _text_file(path: Path, n: int, offset: int) -> Path:
    return write_jsonl(path, [{"text": d} for d in stdlib_documents(limit=n + offset)[offset:]])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Tree, list[dict]]:
    """A tree with three done files a, b, c (default ``--keep_file_checkpoints 3``) and their history rows."""
    tree = Tree(tmp_path_factory.mktemp("trained"))
    files = [_text_file(tree.root / f"{name}.jsonl", 10, 10 * i) for i, name in enumerate("abc")]
    return tree, [train(tree, data, **SMALL_ROTATION) for data in files]


def _copy(trained: tuple[Tree, list[dict]], to: Path) -> tuple[Tree, list[int]]:
    """A copy of the trained tree, and the three file ends."""
    source, rows = trained
    shutil.copytree(source.root, to)
    return Tree(to), [row["end_step"] for row in rows]


def _rollback(tree: Tree, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m daemon rollback`` on the tree's folders, with extra environment variables."""
    argv = ["-m", "daemon", "rollback", "--output_dir", str(tree.output), "--status_dir", str(tree.status), *args]
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *argv], cwd=tree.root, env=full, capture_output=True, text=True, timeout=120)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checkpoint_steps(tree: Tree) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in tree.output.glob("checkpoint-*"))


def _state(tree: Tree) -> dict:
    """Everything a rollback changes, without its timestamps."""
    status = json.loads((tree.status / "training_status.json").read_text())
    return {
        "output": sorted(p.name for p in tree.output.iterdir() if p.name != ".daemon.lock"),
        "export": {p.name: _digest(p) for p in tree.output.iterdir() if p.is_file() and not p.name.startswith(".")},
        "ledger": [(e.name, e.state, e.start_step, e.end_step, e.error) for e in Ledger(tree.status).entries()],
        "history": [{k: v for k, v in row.items() if k != "finished_at"} for row in tree.history()],
        "status": (status["global_step"], status["max_steps"], status["current_file"], status["files"]),
        "intent": (tree.status / INTENT_FILE).exists(),
    }


@pytest.fixture(scope="module")
def rolled_back(trained, tmp_path_factory) -> dict:
    """The state of the trained tree after an uninterrupted rollback to the first file's end."""
    tree, (a_end, _, _) = _copy(trained, tmp_path_factory.mktemp("reference") / "tree")
    result = _rollback(tree, "--to_step", str(a_end))
    assert result.returncode == 0, result.stderr
    return _state(tree)


def test_file_ends_are_kept_out_of_a_small_save_total_limit(trained):
    tree, rows = trained
    ends = [row["end_step"] for row in rows]
    assert ends[-1] - ends[0] > 2 * SMALL_ROTATION["save_steps"]  # mid-file checkpoints were saved and rotated
    assert _checkpoint_steps(tree) == ends  # without --keep_file_checkpoints: the last two only
    ledger = Ledger(tree.status)
    assert kept_file_ends(ledger, 3) == set(ends)
    assert kept_file_ends(ledger, 1) == {ends[-1]}
    assert kept_file_ends(ledger, 0) == set()


def test_list_shows_each_kept_boundary_with_its_file_and_marks_the_current_step(trained, tmp_path):
    tree, ends = _copy(trained, tmp_path / "tree")
    result = _rollback(tree, "--list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["step", "finished_at", "file"]
    for line, step, name in zip(lines[1:], ends, ["a.jsonl", "b.jsonl", "c.jsonl"], strict=True):
        mark, *fields = line[0], *line[1:].split()
        assert (fields[0], fields[2]) == (str(step), name)
        assert fields[1].endswith("Z")  # finished_at, ISO-8601 UTC
        assert mark == ("*" if step == ends[-1] else " ")


def test_rollback_restores_a_kept_boundary_and_the_next_file_continues_from_it(trained, tmp_path):
    tree, (a_end, b_end, c_end) = _copy(trained, tmp_path / "tree")
    result = _rollback(tree, "--to_step", str(a_end))
    assert result.returncode == 0, result.stderr
    assert f"rolled back to step {a_end}" in result.stdout and "b.jsonl" in result.stdout

    kept = tree.output / f"checkpoint-{a_end}"
    assert _checkpoint_steps(tree) == [a_end]
    assert _digest(tree.output / "model.safetensors") == _digest(kept / "model.safetensors")  # bitwise
    assert json.loads((tree.output / "export.json").read_text()) == {"global_step": a_end}
    assert [(e.name, e.state) for e in Ledger(tree.status).entries()] == [
        ("a.jsonl", "done"),
        ("b.jsonl", "rolled_back"),
        ("c.jsonl", "rolled_back"),
    ]
    history = tree.history()
    assert [(r["file"], r["outcome"]) for r in history[3:]] == [("b.jsonl", "rolled_back"), ("c.jsonl", "rolled_back")]
    assert (history[4]["start_step"], history[4]["end_step"]) == (b_end, c_end)
    assert history_violations(history) == []
    assert json.loads((tree.status / "training_status.json").read_text())["global_step"] == a_end
    assert not (tree.status / INTENT_FILE).exists()
    # The status describes the model at a_end again: its file's figures and snapshot, the checkpoints left
    # (it said checkpoints [c_end, b_end, a_end] and c.jsonl's evaluation, snapshot and metrics)
    status = json.loads((tree.status / "training_status.json").read_text())
    snapshot = latest_snapshot(tree.status, a_end)
    assert snapshot is not None and snapshot.name.startswith(f"{a_end:08d}-")
    assert latest_snapshot(tree.status).name.startswith(f"{c_end:08d}-")  # kept on disk as a record
    figures = json.loads((snapshot / "snapshot.json").read_text())
    assert all(status[key] == figures[key] for key in SNAPSHOT_FIGURES)
    assert (status["last_eval"]["step"], status["last_eval"]["file"]) == (a_end, "a.jsonl")
    assert status["checkpoints"]["steps"] == [a_end] and status["metrics"]["loss"] is None
    summary = run_cli(["-m", "daemon", "status", "--status_dir", str(tree.status)], cwd=tree.root).stdout
    assert f"snapshot     {snapshot}\n" in summary  # the status folder given absolute: the folder as it is

    nxt = train(tree, _text_file(tree.root / "d.jsonl", 10, 30), **SMALL_ROTATION)
    assert nxt["start_step"] == a_end
    again = train(tree, tree.root / "b.jsonl", **SMALL_ROTATION)  # rolled back: its content may train again
    assert again["start_step"] == nxt["end_step"]
    assert history_violations(tree.history()) == []
    assert [r["file"] for r in tree.history() if r["outcome"] == "done"][-2:] == ["d.jsonl", "b.jsonl"]


def _tree_files(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a hash of its content, lock files left out."""
    return {
        str(p.relative_to(root)): _digest(p) if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
        if not p.name.endswith(".lock")
    }


@pytest.mark.parametrize("owned", ["current_model", "status"])
def test_rollback_is_refused_while_a_daemon_or_train_py_owns_the_folders(trained, tmp_path, owned):
    tree, ends = _copy(trained, tmp_path / "tree")
    before = _tree_files(tree.root)
    with FileLock(str(tree.root / owned / ".daemon.lock")):  # what a running daemon or train.py holds
        result = _rollback(tree, "--to_step", str(ends[0]))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: cannot roll back: ")
    assert str(tree.root / owned) in result.stderr and "Traceback" not in result.stderr
    assert _tree_files(tree.root) == before


def test_a_step_that_is_not_a_kept_boundary_is_refused_with_the_valid_steps(trained, tmp_path):
    tree, ends = _copy(trained, tmp_path / "tree")
    before = _tree_files(tree.root)
    for step in (ends[0] + 1, 0, ends[-1] + 5):
        result = _rollback(tree, "--to_step", str(step))
        assert result.returncode == 1
        assert result.stderr == (
            f"error: cannot roll back: step {step} is not a kept file boundary; "
            f"valid steps: {', '.join(map(str, ends))}\n"
        )
    assert _tree_files(tree.root) == before


def _tear_the_deletion(tree: Tree, a_end: int, c_end: int) -> None:
    """The state a kill leaves in the middle of step 2: a folder half deleted, the export half replaced."""
    doomed = tree.output / f".deleting-checkpoint-{c_end}"
    (tree.output / f"checkpoint-{c_end}").rename(doomed)
    (doomed / "optimizer.pt").unlink()
    shutil.copy2(tree.output / f"checkpoint-{a_end}" / "model.safetensors", tree.output / "model.safetensors")


@pytest.mark.parametrize(
    "stage, resumed_by",
    [
        ("intent", "rollback"),
        ("intent+torn", "rollback"),
        ("checkpoints", "daemon"),
        ("ledger", "rollback"),
        ("history:1", "train"),
        ("status", "rollback"),
    ],
)
def test_a_rollback_killed_at_any_step_is_finished_by_whatever_starts_next(
    trained, rolled_back, tmp_path, stage, resumed_by
):
    tree, (a_end, _, c_end) = _copy(trained, tmp_path / "tree")
    killed = _rollback(tree, "--to_step", str(a_end), env={EXIT_AFTER_ENV: stage.removesuffix("+torn")})
    assert killed.returncode == 137, killed.stderr
    assert (tree.status / INTENT_FILE).exists()
    if stage.endswith("+torn"):
        _tear_the_deletion(tree, a_end, c_end)

    if resumed_by == "rollback":
        result = _rollback(tree, "--list")
        assert result.returncode == 0, result.stderr
        (only,) = result.stdout.splitlines()[1:]  # the first file's end is the only boundary left, and current
        assert only.split() == ["*", str(a_end), only.split()[2], "a.jsonl"]
        assert _state(tree) == rolled_back
    elif resumed_by == "daemon":
        tree.inbox.mkdir(exist_ok=True)
        argv = ["-m", "daemon", "--once", "--inbox_dir", str(tree.inbox), *tree.flags()]
        result = run_cli(argv, cwd=tree.root)
        assert result.returncode == 0, result.stderr
        assert _state(tree) == rolled_back
    else:  # train.py: finishes the rollback, then trains the next file from the boundary
        nxt = train(tree, _text_file(tree.root / "d.jsonl", 10, 30), **SMALL_ROTATION)
        assert nxt["start_step"] == a_end
        state, expected = _state(tree), rolled_back
        assert state["ledger"][:3] == expected["ledger"] and state["history"][:5] == expected["history"]
        assert history_violations(tree.history()) == []
        assert f"checkpoint-{a_end}" in state["output"] and not state["intent"]


def test_the_rollback_command_never_imports_torch(trained, tmp_path):
    tree, _ = _copy(trained, tmp_path / "tree")
    code = (
        "import sys; from daemon.__main__ import main; main(['rollback', '--list', '--output_dir', sys.argv[1], "
        "'--status_dir', sys.argv[2]]); assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    result = run_cli(["-c", code, str(tree.output), str(tree.status)], cwd=REPO)
    assert result.returncode == 0, result.stderr
