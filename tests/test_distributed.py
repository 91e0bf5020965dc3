"""FSDP through accelerate: two CPU processes over gloo, the product's own code path (docs/distributed.md).

accelerate 1.16 shards only on accelerator process groups (a CPU group is ``MULTI_CPU``, and its
FSDP plugin is dropped): the runs here put tests/cpu_fsdp/sitecustomize.py on the ranks' path, which
takes the plugin on the CPU group as accelerate's GPU branch does; the sharding, the sharded save and
load and the gathering are accelerate's and torch's own. One test runs without it: what a CPU user
who launches with the FSDP config gets (one line, before training).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, Tree, daemon_argv, export_tiny, stdlib_documents, write_jsonl
from safetensors.torch import load_file

from daemon.exceptions import ConfigError
from daemon.store.checkpoints import _why_incomplete, latest_complete_checkpoint
from daemon.store.durable import commit_checkpoint
from daemon.store.sharded_files import MODEL_SHARDS, OPTIMIZER_SHARDS, is_sharded_checkpoint, merge_weights
from daemon.training.speed.accumulation import resolve_workers

CPU_FSDP = REPO / "tests" / "cpu_fsdp"  # the stand-in for a GPU machine (its sitecustomize.py)


def _cpu_config(folder: Path) -> Path:
    """examples/fsdp.yaml as it is, but for the CPU (``use_cpu: true``)."""
    text = (REPO / "examples" / "fsdp.yaml").read_text(encoding="utf-8")
    assert "use_cpu: false" in text
    path = folder / "fsdp-cpu.yaml"
    path.write_text(text.replace("use_cpu: false", "use_cpu: true"), encoding="utf-8")
    return path


def _launcher(tree: Tree) -> str:
    # a free port each (accelerate's default is 29500, which another launch on the machine may hold)
    return (
        f"{sys.executable} -m accelerate.commands.launch --main_process_port 0 --config_file {_cpu_config(tree.root)}"
    )


def _env(stand_in: bool = True, **extra: str) -> dict[str, str]:
    path = [str(CPU_FSDP)] if stand_in else []
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([*path, str(REPO)]), **extra}


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 480) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _drop(tree: Tree, name: str, docs: list[str]) -> None:
    part = write_jsonl(tree.inbox / f".{name}.part", [{"text": d} for d in docs])
    part.rename(tree.inbox / name)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).state_dict()


def _merged(checkpoint: Path, into: Path) -> dict[str, torch.Tensor]:
    into.mkdir()
    merge_weights(checkpoint, into)
    return load_file(into / "model.safetensors")


def _same(loaded: dict[str, torch.Tensor], merged: dict[str, torch.Tensor]) -> bool:
    return set(merged) <= set(loaded) and all(torch.equal(loaded[k], v) for k, v in merged.items())


def test_two_files_under_fsdp_continue_one_another_and_the_export_is_the_whole_model(tree):
    docs = stdlib_documents(limit=40)
    _drop(tree, "1-a.jsonl", docs[:20])
    _drop(tree, "2-b.jsonl", docs[20:])
    argv = daemon_argv(tree, "--once", "--launcher", _launcher(tree), replay_fraction=0)
    result = _run(argv, tree.root, _env())
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = tree.history()
    assert [first["outcome"], second["outcome"]] == ["done", "done"]
    assert "accelerate set up" not in result.stderr  # FSDP was in effect, not refused
    for row in (first, second):  # effective batch 4 per device x 1 accumulation x world size 2
        assert row["planned_steps"] == math.ceil(row["examples"] / 8)
        assert row["end_step"] == row["start_step"] + row["planned_steps"]
    assert second["start_step"] == first["end_step"]
    latest = latest_complete_checkpoint(tree.output, set_aside=False)
    assert latest is not None and latest.global_step == second["end_step"]
    assert is_sharded_checkpoint(latest.path)  # each rank wrote its shards
    assert sorted(p.name for p in (latest.path / MODEL_SHARDS).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert json.loads((tree.output / "export.json").read_text())["global_step"] == second["end_step"]
    # The export is a whole model any client loads, and it is the checkpoint's shards put together.
    assert _same(_weights(tree.output), _merged(latest.path, tree.root / "merged-end"))
    # A rollback to the first file's end exports that sharded checkpoint, consolidated.
    back = _run(
        ["-m", "daemon", "rollback", "--to_step", str(first["end_step"]), *_folders(tree)], tree.root, _env(False)
    )
    assert back.returncode == 0, back.stderr[-2000:]
    assert json.loads((tree.output / "export.json").read_text())["global_step"] == first["end_step"]
    start = tree.output / f"checkpoint-{first['end_step']}"
    assert not (tree.output / f"checkpoint-{second['end_step']}").exists()
    assert _same(_weights(tree.output), _merged(start, tree.root / "merged-start"))
    # Without the FSDP launcher the sharded line is refused in one line, before training.
    write_jsonl(tree.root / "3-c.jsonl", [{"text": d} for d in docs[:8]])
    plain = _run([str(REPO / "train.py"), "--dataset", str(tree.root / "3-c.jsonl"), *tree.flags()], tree.root, _env())
    assert plain.returncode == 1
    assert plain.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint-{first['end_step']} holds FSDP shards: continue it with the FSDP launcher "
        "(docs/distributed.md), or roll back to a whole-model checkpoint"
    )


def _folders(tree: Tree) -> list[str]:
    return ["--output_dir", str(tree.output), "--status_dir", str(tree.status), "--inbox_dir", str(tree.inbox)]


def test_the_fsdp_config_on_cpu_without_the_stand_in_is_refused_in_one_line_before_training(tree):
    data = write_jsonl(tree.root / "a.jsonl", [{"text": d} for d in stdlib_documents(limit=8)])
    argv = [
        "-m",
        "accelerate.commands.launch",
        "--main_process_port",
        "0",
        "--config_file",
        str(_cpu_config(tree.root)),
    ]
    result = _run([*argv, str(REPO / "train.py"), "--dataset", str(data), *tree.flags()], tree.root, _env(False))
    assert result.returncode != 0
    assert (
        "error: the launcher asks for FSDP but accelerate set up MULTI_CPU on cpu (world size 2): accelerate "
        "shards only on GPUs and other accelerators; on CPU use --launcher 'torchrun --nproc_per_node N' (DDP)"
    ) in result.stderr
    assert latest_complete_checkpoint(tree.output, set_aside=False) is None
    assert not any(tree.output.glob("checkpoint-*"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"grad_workers": 2}, "--grad_workers 2 cannot run under FSDP"),
        ({"use_peft": True}, "--use_peft is not supported under FSDP yet"),
        ({"cooldown_fraction": 0.1}, "--cooldown_fraction is not supported under FSDP yet"),
        ({"average_exports": "lawa"}, "--average_exports is not supported under FSDP yet"),
        ({"replay_distillation": 1}, "--replay_distillation is not supported under FSDP yet"),
        ({"file_distillation": 0.5}, "--file_distillation is not supported under FSDP yet"),
    ],
)
def test_what_cannot_run_sharded_is_refused_before_the_file_is_read(tree, monkeypatch, flags, message):
    from daemon.training.arguments import parse_args
    from daemon.training.sharding import refuse_unsupported

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    if "use_peft" in flags:  # LoRA needs a pretrained base
        flags = {**flags, "model_name_or_path": export_tiny(tree.root / "base")}
    parsed = parse_args(["--dataset", str(tree.root / "none.jsonl"), *tree.flags(**flags)])
    with pytest.raises(ConfigError, match=message):
        refuse_unsupported(parsed)


def test_grad_workers_auto_takes_the_stock_step_under_fsdp_even_on_one_process():
    def measured(workers: int) -> int:
        raise AssertionError("no measurement under FSDP")

    assert resolve_workers("auto", "cpu", 1, 1000, cores=4, measure=measured, sharded=True) == 0
    assert resolve_workers("auto", "cpu", 1, 1000, cores=4) == 2  # the same run unsharded


def _sharded_checkpoint(folder: Path, step: int) -> Path:
    checkpoint = folder / f"checkpoint-{step}"
    for part in (MODEL_SHARDS, OPTIMIZER_SHARDS):
        (checkpoint / part).mkdir(parents=True)
        for rank in (0, 1):
            (checkpoint / part / f"__{rank}_0.distcp").write_bytes(b"x" * 64)
        (checkpoint / part / ".metadata").write_bytes(b"m" * 16)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (checkpoint / "config.json").write_text("{}")
    torch.save({}, checkpoint / "scheduler.pt")
    return checkpoint


def test_a_sharded_checkpoint_is_complete_with_its_shards_metadata_and_config_and_torn_without(tmp_path):
    whole = _sharded_checkpoint(tmp_path, 4)
    commit_checkpoint(whole, 4)
    assert _why_incomplete(whole) is None
    cut = _sharded_checkpoint(tmp_path, 6)
    commit_checkpoint(cut, 6)
    (cut / MODEL_SHARDS / "__1_0.distcp").write_bytes(b"x" * 10)  # a shard cut short after the commit
    assert "__1_0.distcp is 10 bytes" in str(_why_incomplete(cut))
    unsaved = _sharded_checkpoint(tmp_path, 8)
    (unsaved / OPTIMIZER_SHARDS / ".metadata").unlink()  # killed before DCP wrote its metadata
    assert _why_incomplete(unsaved) == "no optimizer_0/.metadata (the optimizer's shards are not whole)"
    undescribed = _sharded_checkpoint(tmp_path, 12)
    (undescribed / "config.json").unlink()
    assert _why_incomplete(undescribed) == "no config.json beside the shards"
    assert latest_complete_checkpoint(tmp_path, set_aside=False).global_step == 4


def test_ranks_that_planned_a_file_differently_are_refused_on_every_rank():
    from daemon.training.plan import StepPlan
    from daemon.training.sharding import refuse_diverging_plans

    plan = StepPlan(
        start_step=10,
        examples=40,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        world_size=2,
        epochs=1.0,
    )
    other = dataclasses.replace(plan, start_step=5)
    mine = ("abc", 10, 5, 0, 8)
    refuse_diverging_plans(plan, "abc", gather=lambda t: [t, mine])  # the same plan: nothing to say
    theirs = ("abc", other.start_step, other.planned_steps, 0, 8)
    with pytest.raises(ConfigError, match=r"planned this file differently \(rank 0: 10 -> 15, rank 1: 5 -> 10\)"):
        refuse_diverging_plans(plan, "abc", gather=lambda t: [t, theirs])
    refuse_diverging_plans(plan, "abc")  # one process: nothing gathered


@pytest.mark.slow  # about a minute on 2 idle cores
def test_a_rank_killed_mid_file_is_retried_and_the_file_resumes_at_its_last_checkpoint(tree):
    _drop(tree, "1-a.jsonl", stdlib_documents(limit=20))
    marker = tree.root / "killed"
    argv = daemon_argv(tree, "--once", "--launcher", _launcher(tree), replay_fraction=0, save_steps=5)
    result = _run(argv, tree.root, _env(CPU_FSDP_KILL=f"12:1:{marker}"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.exists()  # rank 1 was killed at step 12, after checkpoint-10
    (row,) = tree.history()
    assert row["outcome"] == "done"
    assert (row["start_step"], row["end_step"]) == (0, row["planned_steps"])
    assert row["planned_steps"] == math.ceil(row["examples"] / 8)
    assert "resuming 1-a.jsonl at step 10 of its plan 0 -> " in result.stderr
    assert latest_complete_checkpoint(tree.output, set_aside=False).global_step == row["end_step"]
    assert json.loads((tree.output / "export.json").read_text())["global_step"] == row["end_step"]
