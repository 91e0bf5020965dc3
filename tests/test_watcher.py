"""The inbox daemon's basic loop: pick-up rules, order, done/ and failed/."""

from __future__ import annotations

import json
import os

from conftest import REPO, run_cli, stdlib_documents, write_jsonl


def test_daemon_once_drains_the_inbox_in_order_and_files_each_result(tree):
    docs = stdlib_documents(limit=24)
    write_jsonl(tree.inbox / "1-first.jsonl", [{"text": d} for d in docs[:12]])
    (tree.inbox / "2-bad.jsonl").write_bytes(b"{nope\n")
    write_jsonl(tree.inbox / "3-second.jsonl", [{"text": d} for d in docs[12:]])
    write_jsonl(tree.inbox / "4-writing.jsonl.part", [{"text": "not yet"}])
    for i, name in enumerate(["1-first.jsonl", "2-bad.jsonl", "3-second.jsonl"]):
        os.utime(tree.inbox / name, (1000 + i, 1000 + i))
    flags = tree.flags()
    result = run_cli(
        ["-m", "daemon", "--once", "--inbox_dir", str(tree.inbox), "--settle_seconds", "0", *flags], cwd=tree.root
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tree.inbox / "done").iterdir()) == ["1-first.jsonl", "3-second.jsonl"]
    assert sorted(p.name for p in (tree.inbox / "failed").iterdir()) == ["2-bad.jsonl", "2-bad.jsonl.error.txt"]
    assert "no usable examples" in (tree.inbox / "failed" / "2-bad.jsonl.error.txt").read_text()
    assert (tree.inbox / "4-writing.jsonl.part").exists()
    assert list((tree.inbox / "processing").iterdir()) == []
    rows = tree.history()
    assert [(r["file"], r["outcome"]) for r in rows] == [
        ("1-first.jsonl", "done"),
        ("2-bad.jsonl", "failed"),
        ("3-second.jsonl", "done"),
    ]
    assert rows[2]["start_step"] == rows[0]["end_step"]
    status = json.loads((tree.status / "training_status.json").read_text())
    assert status["files"]["done"] == 2 and status["files"]["failed"] == 1
    assert status["state"] == "idle" and status["global_step"] == rows[2]["end_step"]
    summary = run_cli(["-m", "daemon", "status", "--status_dir", str(tree.status)], cwd=tree.root)
    assert "2 done, 1 failed" in summary.stdout
    assert f"global_step  {rows[2]['end_step']}" in summary.stdout


def test_a_second_daemon_on_the_same_output_dir_exits_with_a_clear_message(tree):
    from filelock import FileLock

    with FileLock(str(tree.output / ".daemon.lock")):
        result = run_cli(["-m", "daemon", "--once", *_dirs(tree)], cwd=tree.root)
    assert result.returncode == 1
    assert "another daemon is already training" in result.stderr


def test_daemon_rejects_a_bad_training_flag_before_touching_any_file(tree):
    write_jsonl(tree.inbox / "a.jsonl", [{"text": "x"}])
    result = run_cli(["-m", "daemon", "--once", *_dirs(tree), "--warmup_steps", "0.5"], cwd=tree.root)
    assert result.returncode == 1
    assert "--warmup_steps" in result.stderr
    assert (tree.inbox / "a.jsonl").exists()


def _dirs(tree) -> list[str]:
    return ["--inbox_dir", str(tree.inbox), "--status_dir", str(tree.status), "--output_dir", str(tree.output)]


def test_make_dataset_turns_a_folder_into_text_lines_and_skips_binaries(tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("print('a')\n")
    (src / "big.txt").write_text("line\n" * 100)
    (src / "blob.bin").write_bytes(b"\x00\x01\x02")
    (src / ".hidden").mkdir()
    (src / ".hidden" / "x.py").write_text("secret\n")
    out = tmp_path / "out.jsonl"
    result = run_cli(["-m", "daemon.make_dataset", str(src), str(out), "--max_chars", "100"], cwd=REPO)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(len(r["text"]) <= 100 for r in rows)
    assert "".join(r["text"] for r in rows[:-1]) == "line\n" * 100  # big.txt, split at line ends
    assert rows[-1]["text"] == "print('a')\n"
    assert "skipped 1 binary" in result.stdout


def test_the_daemon_process_imports_no_ml_library():
    """Start-up cost belongs to the training child (prestarted while idle), not to the daemon."""
    probe = (
        "import sys; from daemon import __main__, watcher; "
        "print(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))"
    )
    result = run_cli(["-c", probe], cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
