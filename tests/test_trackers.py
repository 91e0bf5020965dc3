"""MLflow and W&B as one continuous run across files, and the MLflow model registry (docs/trackers.md).

Real stores: MLflow on a SQLite database read back with ``MlflowClient``; W&B in offline mode, its
``.wandb`` run files read back record by record (wandb's LevelDB-style log of protobuf ``Record``s).
"""

from __future__ import annotations

import glob
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import daemon_argv, run_cli, stdlib_documents, train, write_jsonl

from daemon.store.rollback import main as rollback_main
from daemon.store.trackers import read_trackers

pytest.importorskip("mlflow")
pytest.importorskip("wandb")

MLFLOW_ENV = ("MLFLOW_RUN_ID", "MLFLOW_MAX_LOG_PARAMS", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_URI")
WANDB_ENV = ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_DIR", "WANDB_MODE", "WANDB_SILENT")


@pytest.fixture
def drops(tree):
    """Three small files of different documents in the tree's root."""
    docs = stdlib_documents(limit=30)
    return [
        write_jsonl(tree.root / f"drop{i}.jsonl", [{"text": d} for d in docs[i * 10 : i * 10 + 10]]) for i in range(3)
    ]


@pytest.fixture(scope="session")
def mlflow_db(tmp_path_factory):
    """One SQLite tracking store for the session (MLflow creates its tables in seconds); tests use their own
    experiment and registered model in it."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@dataclass
class Store:
    uri: str
    experiment: str
    model: str


@pytest.fixture
def mlflow_store(mlflow_db, tmp_path, monkeypatch):
    """The session's tracking store with an experiment and a model name of this test's own; the process's
    MLflow variables restored after the test."""
    for name in MLFLOW_ENV:
        monkeypatch.setenv(name, "x")  # remembered as unset, so whatever the run sets is undone after the test
        monkeypatch.delenv(name)
    store = Store(mlflow_db, experiment=tmp_path.name, model=f"tiny-{tmp_path.name}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", store.experiment)
    yield store
    import mlflow

    mlflow.flush_async_logging()
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B in offline mode under ``tmp_path``; its service process stopped after the test."""
    for name in WANDB_ENV:
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    yield tmp_path
    import wandb

    wandb.finish()
    wandb.teardown()


def _history(client, run_id, key):
    return [
        (m.step, m.value, m.timestamp)
        for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
    ]


def test_two_files_log_one_mlflow_run_with_params_once_evaluations_and_registered_versions(tree, drops, mlflow_store):
    from mlflow import MlflowClient

    a = train(tree, drops[0], report_to="mlflow", register_model=mlflow_store.model)
    b = train(tree, drops[1], report_to="mlflow", register_model=mlflow_store.model)
    assert b["start_step"] == a["end_step"] > 0

    client = MlflowClient(tracking_uri=mlflow_store.uri)
    experiment = client.get_experiment_by_name(mlflow_store.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # one run for both files' processes
    run = runs[0]
    assert read_trackers(tree.status)["mlflow"]["run_id"] == run.info.run_id

    loss_steps = [step for step, _, _ in _history(client, run.info.run_id, "loss")]
    assert loss_steps == sorted(set(loss_steps))  # increasing global_step across both files
    assert loss_steps[0] <= a["end_step"] < loss_steps[-1] <= b["end_step"]
    # Params logged once: the first file's values stand (the second process would have been refused a change).
    assert int(run.data.params["max_steps"]) == a["end_step"]
    assert run.data.params["learning_rate"] == "0.001"

    starts = [(step, value) for step, value, _ in _history(client, run.info.run_id, "file/index")]
    assert starts == [(a["start_step"], 1.0), (b["start_step"], 2.0)]
    own = [k for k in run.data.metrics if k.startswith("eval/") and k.endswith("/loss")]
    assert len(own) == 2  # the two held-out slices
    assert {s for k in own for s, _, _ in _history(client, run.info.run_id, k)} == {a["end_step"], b["end_step"]}
    assert [s for s, _, _ in _history(client, run.info.run_id, "forgetting/mean")] == [b["end_step"]]
    assert [s for s, _, _ in _history(client, run.info.run_id, "eval/own_slice_loss")] == [a["end_step"], b["end_step"]]

    versions = sorted(client.search_model_versions(f"name = '{mlflow_store.model}'"), key=lambda v: int(v.version))
    assert [v.tags["global_step"] for v in versions] == [str(a["end_step"]), str(b["end_step"])]
    assert json.loads(versions[1].tags["files"]) == ["drop0.jsonl", "drop1.jsonl"]
    assert float(versions[1].tags["eval_loss"]) == pytest.approx(b["eval_loss"])
    assert "forgetting/mean" in json.loads(versions[1].tags["evaluation"])
    assert len(versions[1].tags["weights_sha256"]) == 64 != versions[0].tags["weights_sha256"]
    assert all(v.run_id == run.info.run_id for v in versions)
    assert client.get_model_version_by_alias(mlflow_store.model, "champion").version == versions[1].version


def test_rollback_moves_champion_back_keeps_versions_and_marks_the_undone_steps(tree, drops, mlflow_store, capsys):
    from mlflow import MlflowClient

    a = train(tree, drops[0], report_to="mlflow", register_model=mlflow_store.model)
    b = train(tree, drops[1], report_to="mlflow", register_model=mlflow_store.model)
    flags = ["--output_dir", str(tree.output), "--status_dir", str(tree.status)]
    assert rollback_main(["--to_step", str(a["end_step"]), *flags]) == 0

    client = MlflowClient(tracking_uri=mlflow_store.uri)
    versions = sorted(client.search_model_versions(f"name = '{mlflow_store.model}'"), key=lambda v: int(v.version))
    assert len(versions) == 2  # none deleted
    assert client.get_model_version_by_alias(mlflow_store.model, "champion").version == versions[0].version
    assert versions[1].tags["rolled_back"] == str(a["end_step"])

    c = train(tree, drops[2], report_to="mlflow", register_model=mlflow_store.model)
    assert c["start_step"] == a["end_step"]
    (run,) = client.search_runs([client.get_experiment_by_name(mlflow_store.experiment).experiment_id])
    run_id = run.info.run_id
    # The rolled-back file's steps are marked: undone/to_step = their last step, at the step the model returned to.
    ((mark_step, mark_value, mark_time),) = _history(client, run_id, "undone/to_step")
    assert (mark_step, mark_value) == (a["end_step"], float(b["end_step"]))
    assert run.data.tags["undone_steps"] == f"{a['end_step'] + 1}-{b['end_step']}"
    # Every point above the mark's step logged before the mark is of the undone line; after it, of drop2's.
    losses = _history(client, run_id, "loss")
    before = [step for step, _, t in losses if t < mark_time and step > a["end_step"]]
    after = [step for step, _, t in losses if t >= mark_time]
    assert before and max(before) <= b["end_step"]
    assert after and min(after) > a["end_step"] and max(after) == c["end_step"]

    versions = sorted(client.search_model_versions(f"name = '{mlflow_store.model}'"), key=lambda v: int(v.version))
    assert [v.tags["global_step"] for v in versions] == [str(s) for s in (a["end_step"], b["end_step"], c["end_step"])]
    assert client.get_model_version_by_alias(mlflow_store.model, "champion").version == versions[2].version


def _wandb_records(path: Path):
    """Every ``Record`` of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then LevelDB log blocks
    of 32 KiB, each record split in chunks with a 7-byte header (CRC32, length, type: 1 full, 2 first, 3 middle,
    4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunks = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def _key(item) -> str:
    """A history item's name: ``key``, or its ``nested_key`` parts (wandb 0.31 writes names with a slash so)."""
    return item.key or "/".join(item.nested_key)


def _wandb_run_files(folder: Path) -> list[Path]:
    """The offline run files, in the order the processes started (their folders are named by start time)."""
    return [Path(p) for p in sorted(glob.glob(str(folder / "wandb" / "offline-run-*" / "run-*.wandb")))]


def test_two_files_log_one_wandb_offline_run_with_evaluations_and_a_rollback_marked(tree, drops, wandb_offline):
    a = train(tree, drops[0], report_to="wandb")
    b = train(tree, drops[1], report_to="wandb")

    assert len(_wandb_run_files(wandb_offline)) == 2  # one per process (here: per train() call), all of one run
    run_ids, history = _wandb_history(wandb_offline)
    assert run_ids == {read_trackers(tree.status)["wandb"]["run_id"]}
    losses = [row["train/global_step"] for row in history if "train/loss" in row]
    assert losses == sorted(set(losses))
    assert losses[0] <= a["end_step"] < losses[-1] <= b["end_step"]
    starts = [(row["train/global_step"], row["file/index"]) for row in history if "file/index" in row]
    assert starts == [(a["start_step"], 1), (b["start_step"], 2)]
    own = [(row["train/global_step"], row["eval/own_slice_loss"]) for row in history if "eval/own_slice_loss" in row]
    assert own == [(a["end_step"], pytest.approx(a["eval_loss"])), (b["end_step"], pytest.approx(b["eval_loss"]))]
    assert [row["train/global_step"] for row in history if "forgetting/mean" in row] == [b["end_step"]]

    flags = ["--output_dir", str(tree.output), "--status_dir", str(tree.status)]
    assert rollback_main(["--to_step", str(a["end_step"]), *flags]) == 0
    c = train(tree, drops[2], report_to="wandb")
    _, history = _wandb_history(wandb_offline)
    # The mark: at the step the model returned to, the last step of the undone line; the file's steps follow it.
    (mark,) = [i for i, row in enumerate(history) if "undone/to_step" in row]
    assert (history[mark]["train/global_step"], history[mark]["undone/to_step"]) == (a["end_step"], b["end_step"])
    after = [row["train/global_step"] for row in history[mark:] if "train/loss" in row]
    assert after and min(after) > a["end_step"] and max(after) == c["end_step"]
    assert _wandb_summary(wandb_offline)["undone_steps"] == f"{a['end_step'] + 1}-{b['end_step']}"


def _wandb_history(folder: Path) -> tuple[set[str], list[dict]]:
    """The run ids and the history rows (name: value) of every offline run file under ``folder``, in order."""
    run_ids, history = set(), []
    for path in _wandb_run_files(folder):
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_ids.add(record.run.run_id)
            elif kind == "history":
                history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
    return run_ids, history


def _wandb_summary(folder: Path) -> dict:
    """The run's summary as the offline files leave it: every summary update, in order."""
    summary: dict = {}
    for path in _wandb_run_files(folder):
        for record in _wandb_records(path):
            if record.WhichOneof("record_type") == "summary":
                summary.update({_key(item): json.loads(item.value_json) for item in record.summary.update})
    return summary


def test_the_daemon_hands_each_child_the_same_mlflow_and_wandb_runs(
    tree, drops, mlflow_store, wandb_offline, monkeypatch
):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the default: status/mlflow.db
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    monkeypatch.delenv("WANDB_DIR")  # the default: the status folder
    for i, drop in enumerate(drops[:2]):
        drop.rename(tree.inbox / f"{i}-{drop.name}")
    # Two children, each importing torch, mlflow and wandb: about 30 s on an idle 2-core machine.
    result = run_cli(daemon_argv(tree, "--once", report_to="mlflow,wandb"), cwd=tree.root, timeout=280)
    # This process's MLflow calls after the test (the fixture's flush) go to the session's store, not a
    # default ./mlflow.db in pytest's folder.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store.uri)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = tree.history()
    assert b["start_step"] == a["end_step"]
    assert not (tree.root / "mlflow.db").exists()  # the default store is the status folder's, nowhere else

    client = MlflowClient(tracking_uri=f"sqlite:///{tree.status / 'mlflow.db'}")
    (run,) = client.search_runs(["0"])  # the default experiment; one run for the two children
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == sorted(set(steps)) and steps[0] <= a["end_step"] < steps[-1] <= b["end_step"]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/own_slice_loss")) == [
        a["end_step"],
        b["end_step"],
    ]

    run_ids, history = _wandb_history(tree.status)
    assert len(_wandb_run_files(tree.status)) == 2 and run_ids == {read_trackers(tree.status)["wandb"]["run_id"]}
    losses = [row["train/global_step"] for row in history if "train/loss" in row]
    assert losses == sorted(set(losses)) and losses[0] <= a["end_step"] < losses[-1] <= b["end_step"]


def test_a_tracker_that_is_not_installed_is_one_clear_config_error(tree, monkeypatch):
    import importlib.util

    from daemon.exceptions import ConfigError
    from daemon.training.arguments import parse_args

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--report_to wandb needs wandb, which is not installed: pip install"):
        parse_args(["--dataset", "x.jsonl", "--report_to", "mlflow,wandb", *tree.flags()])
    flags = parse_args(["--dataset", "x.jsonl", "--report_to", "mlflow,tensorboard", *tree.flags()])
    assert flags.training.report_to == ["mlflow", "tensorboard"]  # several trackers, comma-separated


def test_the_run_id_is_kept_and_handed_on_and_a_run_deleted_by_hand_is_started_anew(tree, mlflow_store, monkeypatch):
    import os

    from mlflow import MlflowClient

    from daemon.training.trackers import continue_runs

    first = continue_runs(tree.status, ["mlflow"])["mlflow"]
    assert os.environ["MLFLOW_RUN_ID"] == first["run_id"] and "MLFLOW_MAX_LOG_PARAMS" not in os.environ
    monkeypatch.delenv("MLFLOW_RUN_ID")
    assert continue_runs(tree.status, ["mlflow"])["mlflow"]["run_id"] == first["run_id"]  # the next process: same run
    assert os.environ["MLFLOW_RUN_ID"] == first["run_id"]

    MlflowClient(tracking_uri=mlflow_store.uri).delete_run(first["run_id"])
    second = continue_runs(tree.status, ["mlflow"])["mlflow"]
    assert second["run_id"] != first["run_id"] and os.environ["MLFLOW_RUN_ID"] == second["run_id"]


def test_the_cooldown_branch_stays_out_of_the_run(tree, drops, mlflow_store):
    from mlflow import MlflowClient

    a = train(tree, drops[0], report_to="mlflow", cooldown_fraction=0.5)
    assert a["cooldown_steps"] > 0
    client = MlflowClient(tracking_uri=mlflow_store.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(mlflow_store.experiment).experiment_id])
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == a["end_step"]
    assert int(run.data.params["max_steps"]) == a["end_step"]  # the main line's, not the branch's


def test_a_file_resumed_below_the_steps_logged_marks_them_undone(tree, mlflow_store):
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from daemon.store.trackers import update_trackers
    from daemon.training.trackers import RunMarks, continue_runs

    run_id = continue_runs(tree.status, ["mlflow"])["mlflow"]["run_id"]
    update_trackers(tree.status, logged_to=37)  # a crash at step 37, after the checkpoint of step 30
    main = SimpleNamespace(is_world_process_zero=True)
    RunMarks(tree.status, ["mlflow"], start_step=30).on_train_begin(None, main, None)

    client = MlflowClient(tracking_uri=mlflow_store.uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "undone/to_step")] == [(30, 37.0)]
    assert client.get_run(run_id).data.tags["undone_steps"] == "31-37"
    assert read_trackers(tree.status)["logged_to"] == 30
    RunMarks(tree.status, ["mlflow"], start_step=30).on_train_begin(None, main, None)  # nothing above 30 now
    assert len(client.get_metric_history(run_id, "undone/to_step")) == 1


@pytest.mark.parametrize("name", ["team/model", "model:v2", "../model", 'it\'s a "model"'])
def test_a_registered_model_name_mlflow_would_refuse_is_one_config_error(name):
    """MLflow refused such a name at the first export: a traceback logged after every file, nothing registered."""
    from daemon.exceptions import ConfigError
    from daemon.training.tracker_flags import TrackerArguments

    with pytest.raises(ConfigError, match="--register_model .*: "):
        TrackerArguments(register_model=name)


def test_a_name_with_a_quote_registers_its_versions_and_rolls_its_champion_back(tmp_path, mlflow_store):
    """The versions' search quoted the name in ' and failed on one that holds a ': no version was ever created."""
    from mlflow import MlflowClient

    from daemon.store.registry import register_export, roll_back_champion

    name = f"bob's-{mlflow_store.model}"
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.safetensors").write_bytes(b"weights")
    versions = [register_export(tmp_path, mlflow_store.uri, name, tmp_path / "export", step, {}) for step in (3, 7)]
    assert versions == ["1", "2"]
    assert register_export(tmp_path, mlflow_store.uri, name, tmp_path / "export", 7, {}) == "2"  # found, not again
    roll_back_champion(tmp_path, 3)
    client = MlflowClient(tracking_uri=mlflow_store.uri, registry_uri=mlflow_store.uri)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert client.get_model_version(name, "2").tags["rolled_back"] == "3"
