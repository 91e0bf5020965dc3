"""``python train.py`` as a user runs it: exit codes, one-line errors, nothing touched on failure."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

import pytest
from filelock import FileLock
from helpers import REPO, run_cli, stdlib_documents, train, write_jsonl

from daemon.config import LEDGER_ENV
from daemon.store.ledger import Ledger


def _fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


BAD_FILES = {
    "empty": b"",
    "all-bad": b'{oops\n[1, 2]\n"just a string"\n',
    "binary": bytes(range(256)) * 8,
    "non-utf8": '{"text": "na\u00efve caf\u00e9"}\n{"text": "\u00fcber"}\n'.encode("latin-1"),
}


def test_bad_files_exit_non_zero_with_one_line_and_leave_the_model_untouched(tree):
    train(tree, write_jsonl(tree.root / "good.jsonl", [{"text": d} for d in stdlib_documents(limit=8)]))
    before = _fingerprint(tree.output)
    for name, content in BAD_FILES.items():
        path = tree.root / f"{name}.jsonl"
        path.write_bytes(content)
        result = run_cli([str(REPO / "train.py"), "--dataset", str(path), *tree.flags()], cwd=tree.root)
        assert result.returncode == 1, (name, result.stderr)
        assert "Traceback" not in result.stderr, name
        error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(error_lines) == 1, (name, result.stderr)
        assert path.name in error_lines[0]
        assert _fingerprint(tree.output) == before, name
    rows = tree.history()
    assert [r["outcome"] for r in rows] == ["done"] + ["failed"] * len(BAD_FILES)
    assert all(r["error"] for r in rows[1:])
    status = json.loads((tree.status / "training_status.json").read_text())
    assert status["state"] == "failed"
    assert status["last_error"]["file"] == "non-utf8.jsonl"
    assert status["files"] == {"queued": 0, "done": 1, "failed": len(BAD_FILES)}


def test_train_script_trains_and_reports(tree):
    data = write_jsonl(tree.root / "d.jsonl", [{"text": d} for d in stdlib_documents(limit=8)] + ["{broken"])
    result = run_cli([str(REPO / "train.py"), "--dataset", str(data), *tree.flags()], cwd=tree.root)
    assert result.returncode == 0, result.stderr
    assert "trained d.jsonl: steps 0 -> " in result.stdout
    assert "line 9 (bad JSON" in result.stderr
    assert "step 1/" in result.stderr  # progress lines reach the log unbuffered
    (row,) = tree.history()
    assert 0 < row["train_seconds"] < row["wall_seconds"]


def test_resuming_a_model_with_tied_embeddings_does_not_warn_of_a_missing_lm_head(tree):
    # Each epoch is a segment resumed from the checkpoint before it; the checkpoint stores the tied
    # embedding once, and transformers' Trainer warned on every resume that lm_head.weight was missing.
    data = write_jsonl(tree.root / "d.jsonl", [{"text": d} for d in stdlib_documents(limit=4)])
    result = run_cli([str(REPO / "train.py"), "--dataset", str(data), *tree.flags(num_train_epochs=2)], cwd=tree.root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "missing keys" not in result.stderr, result.stderr[-3000:]


# A cold compile takes tens of seconds: `make test SLOW=1` runs it.
@pytest.mark.slow
def test_a_compiled_run_trains_its_planned_steps_on_the_stock_step_with_its_cache_in_a_known_folder(tree, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    docs = [{"text": d} for d in stdlib_documents(limit=16)]
    for name, rows in (("a.jsonl", docs[:8]), ("b.jsonl", docs[8:])):  # two processes: the second reads the cache
        data = write_jsonl(tree.root / name, rows)
        argv = [str(REPO / "train.py"), "--dataset", str(data), "--torch_compile", "True", *tree.flags()]
        result = run_cli(argv, cwd=tree.root)
        assert result.returncode == 0, result.stderr[-3000:]
        status = json.loads((tree.status / "training_status.json").read_text())
        assert status["gradient_guard"]["workers"] == 0  # --grad_workers auto: the stock step under compile
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "continual-daemon" / "inductor"
    assert f"torch.compile: inductor's cache in {cache}" in result.stderr
    assert any(cache.rglob("*")), "nothing compiled into the cache"
    first, second = tree.history()
    assert [r["outcome"] for r in (first, second)] == ["done", "done"]
    assert second["start_step"] == first["end_step"]
    assert second["end_step"] - second["start_step"] == second["planned_steps"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--warmup_steps", "0.1"], "--warmup_steps must be a whole number"),
        (["--max_seq_length", "2"], "--max_seq_length must be at least 8"),
        (["--model_name_or_path", "no/such/dir"], "not a local directory"),
        ([], "--dataset FILE.jsonl is required"),
    ],
)
def test_bad_flags_fail_with_a_message_naming_the_flag(tree, flags, message):
    result = run_cli(["-m", "daemon", "check-args" if flags else "train", *flags], cwd=REPO)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_config_file_holds_the_same_keys_as_the_flags(tree):
    from daemon.training.arguments import parse_args

    config = tree.root / "train.json"
    config.write_text(json.dumps({"learning_rate": 0.01, "max_seq_length": 48, "sample_prompts": ["a", "b"]}))
    flags = parse_args(["--config", str(config), "--max_seq_length", "64"])
    assert flags.training.learning_rate == 0.01
    assert flags.data.max_seq_length == 64  # the command line wins over the file
    assert flags.samples.sample_prompts == ["a", "b"]
    yaml_config = tree.root / "train.yaml"
    yaml_config.write_text("learning_rate: 0.02\nstrict: true\n")
    flags = parse_args(["--config", str(yaml_config)])
    assert flags.training.learning_rate == 0.02 and flags.data.strict is True


def test_a_resume_with_no_step_left_exits_zero_and_says_so(tree, monkeypatch):
    import daemon.training.outputs as run

    data = write_jsonl(tree.root / "a.jsonl", [{"text": d} for d in stdlib_documents(limit=8)])
    with monkeypatch.context() as patch:  # trained to its end, then killed before the export
        patch.setattr(run, "export_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            train(tree, data)
    result = run_cli([str(REPO / "train.py"), "--dataset", str(data), *tree.flags()], cwd=tree.root)
    assert result.returncode == 0, result.stderr
    assert "train_loss -" in result.stdout


def _tree_files(root: Path) -> dict[str, str]:
    """Every path under ``root`` (folders too) with a hash of its content, lock files left out."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
        if not p.name.endswith(".lock")
    }


@pytest.mark.parametrize("owned", ["current_model", "status"])
def test_train_py_on_folders_a_daemon_owns_exits_with_one_line_and_touches_nothing(tree, owned):
    data = write_jsonl(tree.root / "d.jsonl", [{"text": d} for d in stdlib_documents(limit=8)])
    before = _tree_files(tree.root)
    with FileLock(str(tree.root / owned / ".daemon.lock")):  # what a running daemon holds
        result = run_cli([str(REPO / "train.py"), "--dataset", str(data), *tree.flags()], cwd=tree.root)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    assert str(tree.root / owned) in error_lines[0]
    assert _tree_files(tree.root) == before


def test_a_training_child_refuses_a_ledger_other_than_its_daemons(tree, monkeypatch):
    data = write_jsonl(tree.root / "d.jsonl", [{"text": d} for d in stdlib_documents(limit=8)])
    claim = Ledger(tree.status).add("d.jsonl", "queued", sha256=hashlib.sha256(data.read_bytes()).hexdigest())
    before = _tree_files(tree.status), _tree_files(tree.output)
    # The daemon's ledger was deleted, and another one now has a row with this id.
    monkeypatch.setenv(LEDGER_ENV, "0" * 32)
    result = run_cli(
        ["-m", "daemon", "train", "--dataset", str(data), "--ledger_id", str(claim.id), *tree.flags()], cwd=tree.root
    )
    assert result.returncode == 1, result.stderr
    assert "not the daemon's ledger" in result.stderr and "Traceback" not in result.stderr
    assert (_tree_files(tree.status), _tree_files(tree.output)) == before
    assert Ledger(tree.status).get(claim.id).state == "queued"


def test_the_cache_is_cleaned_only_while_no_other_run_holds_it_and_only_in_the_products_folders(tmp_path):
    from daemon.training.claims import CACHE_LOCK, dataset_cache_claim

    ours = tmp_path / "generator" / f"default-fingerprint=text-text-{'ab' * 32}-rules2"
    foreign = tmp_path / "generator" / "default-fingerprint=someone-elses-dataset"
    for folder in (ours, foreign):
        (folder / "0.0.0").mkdir(parents=True)
        (folder / "0.0.0" / "tmpab12cd34").write_bytes(b"partial arrow")
        (folder / "0.0.0.incomplete").mkdir()
        (folder / "0.0.0_builder.lock").touch()
    other_run = os.open(tmp_path / CACHE_LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(other_run, fcntl.LOCK_SH)  # a live run: its temporary files may be being written
        with dataset_cache_claim(str(tmp_path)):
            assert (ours / "0.0.0" / "tmpab12cd34").exists() and (ours / "0.0.0.incomplete").exists()
    finally:
        os.close(other_run)
    with dataset_cache_claim(str(tmp_path)):  # no other run: what killed runs left goes
        assert not (ours / "0.0.0" / "tmpab12cd34").exists() and not (ours / "0.0.0.incomplete").exists()
    assert (ours / "0.0.0_builder.lock").exists()  # lock files stay: another process may hold one
    assert (foreign / "0.0.0" / "tmpab12cd34").exists() and (foreign / "0.0.0.incomplete").exists()


def test_a_subcommand_given_a_file_for_its_folder_says_so_in_one_line(tmp_path, capsys):
    from daemon.__main__ import main

    not_a_folder = tmp_path / "status"
    not_a_folder.write_text("a file\n")
    assert main(["status", "--status_dir", str(not_a_folder)]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {not_a_folder} is a file where a folder belongs") and "--status_dir" in line


def test_an_os_error_without_a_path_is_a_bug_and_keeps_its_traceback():
    import errno

    from daemon.store.failures import fault_message

    assert fault_message(OSError(errno.EACCES, "Permission denied")) is None
    assert fault_message(OSError(errno.EBADF, "Bad file descriptor", "/some/file")) is None
    assert "read-only" in (fault_message(OSError(errno.EROFS, "Read-only file system", "/mnt/x")) or "")


# Every flag whose value the product decides itself (a default from the machine or from another flag, or a value
# it owns), given a value other than the one it would decide: `--name=value` must mean what `--name value` means.
# (flag, value given, what the run reads, what it must be, whether a warning says the product owns it)
DECIDED_FLAGS = [
    ("torch_compile", "False", lambda f: f.training.torch_compile, False, False),
    ("bf16", "False", lambda f: f.training.bf16, False, False),
    ("fp16", "True", lambda f: (f.training.fp16, f.training.bf16), (True, False), False),
    ("use_cpu", "True", lambda f: (f.training.use_cpu, f.training.device.type), (True, "cpu"), False),
    ("disable_tqdm", "False", lambda f: f.training.disable_tqdm, False, False),
    ("dataloader_pin_memory", "False", lambda f: f.training.dataloader_pin_memory, False, False),
    ("grad_workers", "3", lambda f: f.accumulation.grad_workers, "3", False),
    ("output_dir", "elsewhere", lambda f: f.training.output_dir, "elsewhere", False),
    ("learning_rate", "0.002", lambda f: f.training.learning_rate, 0.002, False),
    ("warmup_steps", "7", lambda f: f.training.warmup_steps, 7, False),
    ("max_steps", "5", lambda f: f.training.max_steps, -1, True),
    ("ignore_data_skip", "False", lambda f: f.training.ignore_data_skip, True, True),
    ("train_sampling_strategy", "random", lambda f: f.training.train_sampling_strategy, "sequential", True),
]


@pytest.mark.parametrize(
    ("flag", "value", "read", "expected", "owned"), DECIDED_FLAGS, ids=[f[0] for f in DECIDED_FLAGS]
)
def test_a_flag_the_product_decides_means_the_same_written_with_an_equals_sign(
    monkeypatch, caplog, flag, value, read, expected, owned
):
    import daemon.training.arguments
    from daemon.training.arguments import parse_args

    # Decided otherwise on this machine, so that a given value that is not honoured shows.
    monkeypatch.setattr(daemon.training.arguments, "default_torch_compile", lambda device: True)
    monkeypatch.setattr(daemon.training.arguments, "cpu_has_fast_bf16", lambda *a: True)
    for argv in ([f"--{flag}", value], [f"--{flag}={value}"]):
        caplog.clear()
        assert read(parse_args(["--dataset", "x.jsonl", *argv])) == expected, argv
        assert (f"--{flag} is set by the product" in caplog.text) is owned, argv


@pytest.mark.parametrize("flag", ["bf16", "torch_compile", "use_cpu"])
def test_a_decided_switch_given_alone_is_on(monkeypatch, flag):
    import daemon.training.arguments
    from daemon.training.arguments import parse_args

    monkeypatch.setattr(daemon.training.arguments, "default_torch_compile", lambda device: False)
    monkeypatch.setattr(daemon.training.arguments, "cpu_has_fast_bf16", lambda *a: False)
    assert getattr(parse_args(["--dataset", "x.jsonl", f"--{flag}"]).training, flag) is True


def test_a_config_file_written_with_an_equals_sign_is_read(tmp_path):
    from daemon.training.arguments import parse_args

    config = tmp_path / "train.yaml"
    config.write_text("learning_rate: 1e-3\ngrad_workers: 2\nmax_regression: null\nsample_prompts: [a, 1]\n")
    spaced, equals = (parse_args(argv) for argv in (["--config", str(config)], [f"--config={config}"]))
    for flags in (spaced, equals):
        assert flags.training.learning_rate == 0.001  # YAML reads 1e-3 as a string: typed as the flag is
        assert flags.accumulation.grad_workers == "2" and flags.evaluation.max_regression is None
        assert flags.samples.sample_prompts == ["a", "1"]


def test_a_config_file_key_no_command_knows_fails_naming_the_file_and_the_key(tmp_path):
    from daemon.exceptions import ConfigError
    from daemon.training.arguments import parse_args

    config = tmp_path / "train.json"
    config.write_text(json.dumps({"learning_rat": 0.01, "inbox_dir": "inbox", "once": True}))
    with pytest.raises(ConfigError, match=r"--config .*train\.json: unknown key learning_rat"):
        parse_args(["--config", str(config)])


def test_importing_the_flags_probes_neither_the_cpu_nor_the_accelerator():
    probe = (
        "import pathlib, torch\n"
        "read = pathlib.Path.read_text\n"
        "seen = []\n"
        "def spy(self, *a, **k):\n"
        "    if 'cpuinfo' in str(self):\n"
        "        seen.append(str(self))\n"
        "    return read(self, *a, **k)\n"
        "pathlib.Path.read_text = spy\n"
        "torch.accelerator.is_available = lambda: seen.append('accelerator') or False\n"
        "import daemon.training.arguments\n"
        "print(seen)\n"
    )
    result = run_cli(["-c", probe], cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_command_runs_from_the_daemons_config_file(tree):
    """The daemon's file holds its folders, its own flags and training flags: each command takes what it uses."""
    import yaml

    flags = tree.flags()
    training = {key.removeprefix("--"): value for key, value in zip(flags[::2], flags[1::2], strict=True)}
    config = tree.root / "daemon.yaml"
    daemon = {"inbox_dir": str(tree.inbox), "settle_seconds": 0, "rescan_seconds": 0.5, "prestart": False}
    config.write_text(yaml.safe_dump({**training, **daemon}))
    write_jsonl(tree.inbox / "a.jsonl", [{"text": d} for d in stdlib_documents(limit=8)])
    elsewhere = tree.root / "elsewhere"  # no inbox, status or model here: the folders come from the file
    elsewhere.mkdir()

    result = run_cli(["-m", "daemon", "--once", f"--config={config}"], cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = tree.history()
    assert (row["file"], row["outcome"]) == ("a.jsonl", "done")
    commands = {  # each spelling of --config, taken in turn
        "status": (["status", f"--config={config}"], "1 done"),
        "rollback": (
            ["rollback", "--list", "--config", str(config), "--inbox_dir", str(tree.inbox)],
            f"{row['end_step']:>5}",
        ),
        "report": (["report", "--config", str(config)], str(tree.status / "report.html")),
        "generate": (["generate", "def ", "--max_new_tokens", "4", f"--config={config}"], "def "),
    }
    for name, (argv, shown) in commands.items():
        result = run_cli(["-m", "daemon", *argv], cwd=elsewhere)
        assert result.returncode == 0, (name, result.stderr[-3000:])
        assert shown in result.stdout, (name, result.stdout)
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # nothing was made in the working directory
