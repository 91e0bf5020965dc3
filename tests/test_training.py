"""The training code path: step accounting, resume, learning rate, shapes, status, snapshots."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path

import pytest
from helpers import Tree, read_status, stdlib_documents, train, write_jsonl

from daemon.config import DEFAULT_SAMPLE_PROMPTS
from daemon.store.checkpoints import latest_complete_checkpoint
from daemon.store.status import history_violations


def _text_file(path: Path, n: int = 30, offset: int = 0) -> Path:
    return write_jsonl(path, [{"text": d} for d in stdlib_documents(limit=n + offset)[offset:]])


def _log_history(tree: Tree) -> list[dict]:
    checkpoint = latest_complete_checkpoint(tree.output)
    assert checkpoint is not None
    return json.loads((checkpoint.path / "trainer_state.json").read_text())["log_history"]


def test_step_plan_uses_the_effective_batch_and_rounds_up_per_epoch():
    from daemon.training.plan import StepPlan

    plan = StepPlan(
        start_step=100,
        examples=50,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=3,
        world_size=2,
        epochs=2,
    )
    assert plan.effective_batch == 24
    assert plan.steps_per_epoch == 3  # ceil(50 / 24)
    assert plan.planned_steps == 6
    assert plan.max_steps == 106


def test_second_file_trains_its_own_steps_and_starts_where_the_first_ended(tree):
    first = train(tree, _text_file(tree.root / "a.jsonl", 30))
    second = train(tree, _text_file(tree.root / "b.jsonl", 20, offset=30))

    rows = tree.history()
    assert [r["file"] for r in rows] == ["a.jsonl", "b.jsonl"]
    assert rows == [first, second]
    assert history_violations(rows) == []
    assert second["planned_steps"] > 0
    assert second["start_step"] == first["end_step"]
    assert second["end_step"] - second["start_step"] == second["planned_steps"]
    # the planned steps follow the formula over the examples counted after packing
    for row in rows:
        assert row["planned_steps"] == math.ceil((row["examples"] + row["replayed_examples"]) / 4)
    checkpoint = latest_complete_checkpoint(tree.output)
    assert checkpoint is not None
    assert checkpoint.global_step == first["planned_steps"] + second["planned_steps"]


def test_naive_resume_trains_zero_steps_and_the_invariant_check_catches_it(tree):
    """The bug this product exists to prevent: num_train_epochs=1 resumed from a checkpoint at epoch 1.0."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from daemon.config import DataArguments
    from daemon.store.jsonl import load_records, scan_jsonl
    from daemon.training.data import prepare_datasets

    train(tree, _text_file(tree.root / "a.jsonl", 30))
    checkpoint = latest_complete_checkpoint(tree.output)
    assert checkpoint is not None
    state = json.loads((checkpoint.path / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(1.0)

    from daemon.training.model import load_pretrained

    model, tokenizer = load_pretrained(checkpoint.path)
    data_args = DataArguments(max_seq_length=32, dataset_cache_dir=str(tree.cache), eval_fraction=0.0)
    report = scan_jsonl(_text_file(tree.root / "b.jsonl", 20, offset=30))
    data = prepare_datasets(load_records(report, data_args), report.shape, tokenizer, data_args, seed=0)
    naive_args = TrainingArguments(
        output_dir=str(tree.output), num_train_epochs=1, per_device_train_batch_size=4, report_to="none"
    )
    trainer = Trainer(
        model=model,
        args=naive_args,
        train_dataset=data.train,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
    )
    trainer.train(resume_from_checkpoint=str(checkpoint.path))
    naive_row = {
        "file": "b.jsonl",
        "outcome": "done",
        "start_step": checkpoint.global_step,
        "end_step": trainer.state.global_step,
        "planned_steps": math.ceil(data.examples / 4),
    }
    assert trainer.state.global_step == checkpoint.global_step  # zero steps: the naive resume is broken
    assert history_violations([*tree.history(), naive_row]) != []


def test_learning_rate_continues_across_the_file_boundary(tree):
    # A warmup longer than both files: a restart at file 2 would fall back to lr 0.
    flags = {"warmup_steps": 100, "learning_rate": 1e-3}
    first = train(tree, _text_file(tree.root / "a.jsonl", 20), **flags)
    train(tree, _text_file(tree.root / "b.jsonl", 20, offset=20), **flags)
    lr = {e["step"]: e["learning_rate"] for e in _log_history(tree) if "learning_rate" in e}
    boundary = first["end_step"]
    increment = 1e-3 / 100
    assert lr[boundary + 1] == pytest.approx(lr[boundary] + increment)
    assert lr[boundary + 1] == pytest.approx(boundary * increment)


def test_learning_rate_is_constant_after_warmup_across_files(tree):
    flags = {"warmup_steps": 2, "learning_rate": 1e-3}
    first = train(tree, _text_file(tree.root / "a.jsonl", 20), **flags)
    train(tree, _text_file(tree.root / "b.jsonl", 20, offset=20), **flags)
    lr = {e["step"]: e["learning_rate"] for e in _log_history(tree) if "learning_rate" in e}
    assert lr[first["end_step"]] == pytest.approx(1e-3)
    assert lr[first["end_step"] + 1] == pytest.approx(1e-3)


def test_file_smaller_than_one_batch_trains_one_step(tree):
    tiny = write_jsonl(tree.root / "tiny.jsonl", [{"text": "def f():\n    return 1\n"}])
    row = train(tree, tiny, per_device_train_batch_size=8, gradient_accumulation_steps=4)
    assert row["examples"] == 1
    assert row["planned_steps"] == 1
    assert row["end_step"] == 1


def test_several_epochs_train_epochs_times_the_steps_per_epoch(tree):
    row = train(tree, _text_file(tree.root / "a.jsonl", 10), num_train_epochs=3, gradient_accumulation_steps=2)
    assert row["planned_steps"] == 3 * math.ceil(row["examples"] / 8)
    assert row["end_step"] == row["planned_steps"]


@pytest.mark.parametrize(
    "rows",
    [
        [{"prompt": f"Q: what is {i}+{i}?\nA:", "completion": f" {2 * i}"} for i in range(12)],
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": f"What is {i}+{i}?"},
                    {"role": "assistant", "content": f"{2 * i}."},
                ]
            }
            for i in range(12)
        ],
    ],
    ids=["prompt_completion", "messages"],
)
def test_each_conversational_shape_trains(tree, rows):
    row = train(tree, write_jsonl(tree.root / "chat.jsonl", rows), max_seq_length=128)
    assert row["outcome"] == "done"
    assert row["planned_steps"] == math.ceil(row["examples"] / 4) > 0


def test_model_name_or_path_starts_from_a_local_model(tree, tmp_path):
    from daemon.training.model import has_model

    base = Tree(tmp_path / "base")
    base.root.mkdir()
    train(base, _text_file(tmp_path / "seed.jsonl", 10), output_dir=base.output)
    assert has_model(base.output)
    row = train(tree, _text_file(tree.root / "a.jsonl", 10), model_name_or_path=base.output)
    assert row["start_step"] == 0  # a new run: fresh optimizer and step count
    assert has_model(tree.output)


def test_incomplete_newest_checkpoint_is_skipped_with_a_warning(tree, caplog):
    first = train(tree, _text_file(tree.root / "a.jsonl", 20))
    torn = tree.output / f"checkpoint-{first['end_step'] + 5}"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="daemon.store.checkpoints"):
        second = train(tree, _text_file(tree.root / "b.jsonl", 20, offset=20))
    assert second["start_step"] == first["end_step"]
    assert any("incomplete checkpoint" in r.getMessage() and torn.name in r.getMessage() for r in caplog.records)
    assert not torn.exists()
    assert (tree.output / f"torn-{torn.name}").is_dir()


def test_owned_flags_are_overridden_and_the_user_is_told(tree, caplog):
    with caplog.at_level(logging.WARNING, logger="daemon.training.arguments"):
        row = train(tree, _text_file(tree.root / "a.jsonl", 12), max_steps=1000)
    assert row["end_step"] == row["planned_steps"] == math.ceil(row["examples"] / 4)
    assert row["end_step"] != 1000
    assert any("--max_steps is set by the product" in r.getMessage() for r in caplog.records)


def test_status_reader_never_sees_a_partial_document(tree):
    path = tree.status / "training_status.json"
    stop = threading.Event()
    reads: list[dict] = []
    torn: list[str] = []

    def poll() -> None:
        while not stop.is_set():
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            try:
                reads.append(json.loads(text))
            except ValueError:
                torn.append(text)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        train(tree, _text_file(tree.root / "a.jsonl", 40), status_interval=0.01)
    finally:
        stop.set()
        reader.join()
    assert torn == []
    assert len(reads) > 10
    states = {doc["state"] for doc in reads}
    assert "idle" in states and len(states) > 1
    final = json.loads(path.read_text())
    for key in ("schema_version", "global_step", "max_steps", "metrics", "files", "gradient_guard", "last_eval"):
        assert key in final
    assert final["files"]["done"] == 1
    assert final["total_evals"] == 1
    assert final["last_eval"]["perplexity"] == pytest.approx(math.exp(final["last_eval"]["eval_loss"]))


def test_every_trained_file_has_an_evolution_snapshot_with_samples(tree):
    small_file = write_jsonl(tree.root / "b.jsonl", [{"text": "import json\n"}, {"text": "x = 1\n"}])
    rows = [train(tree, _text_file(tree.root / "a.jsonl", 30)), train(tree, small_file)]
    for row in rows:
        folder = tree.status / "evolution" / f"{row['end_step']:08d}-{Path(row['file']).stem}"
        snapshot = json.loads((folder / "snapshot.json").read_text())
        assert snapshot["step"] == row["end_step"]
        assert [s["prompt"] for s in snapshot["samples"]] == DEFAULT_SAMPLE_PROMPTS
        assert snapshot["generation"]["seed"] == 0
        markdown = (folder / "samples.md").read_text()
        assert all(s["prompt"] + s["completion"] in markdown for s in snapshot["samples"])
    folders = sorted((tree.status / "evolution").iterdir())
    big, small = (json.loads((folder / "snapshot.json").read_text()) for folder in folders)
    assert big["eval_loss"] is not None and big["perplexity"] == pytest.approx(math.exp(big["eval_loss"]))
    assert small["eval_loss"] is None and "too small" in small["eval_note"]


def test_exported_model_loads_with_from_pretrained(tree):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train(tree, _text_file(tree.root / "a.jsonl", 10))
    model = AutoModelForCausalLM.from_pretrained(tree.output, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tree.output, local_files_only=True)
    assert model.config.model_type == "llama"
    assert tokenizer.eos_token == "<|endoftext|>"
    assert not list(tree.output.glob(".export*"))


def test_checkpoint_rotation_keeps_the_newest_complete_checkpoint(tree):
    row = train(tree, _text_file(tree.root / "a.jsonl", 30), save_steps=2, save_total_limit=1)
    checkpoints = sorted(p.name for p in tree.output.glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{row['end_step']}"]
    found = latest_complete_checkpoint(tree.output, set_aside=False)
    assert found is not None and found.global_step == row["end_step"]


def test_an_empty_sample_prompt_starts_from_eos(tree):
    row = train(tree, _text_file(tree.root / "a.jsonl", 8), sample_prompts=["", "def "])
    folder = tree.status / "evolution" / f"{row['end_step']:08d}-a"
    samples = json.loads((folder / "snapshot.json").read_text())["samples"]
    assert [s["prompt"] for s in samples] == ["", "def "]
    markdown = (folder / "samples.md").read_text()
    assert samples[0]["completion"] in markdown and "def " + samples[1]["completion"] in markdown


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu avx512f avx512_bf16 avx512_vnni", True),
        ("fpu amx_bf16 amx_tile", True),
        ("fpu avx512f avx2", False),
    ],
)
def test_fast_bf16_is_detected_from_the_cpu_flags(tmp_path, flags, expected):
    from daemon.training.arguments import cpu_has_fast_bf16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert cpu_has_fast_bf16(cpuinfo) is expected
    assert cpu_has_fast_bf16(tmp_path / "missing") is False


@pytest.mark.parametrize(
    ("accelerator", "gpu_bf16", "cpu_flags", "expected"),
    [
        (None, False, "fpu avx2", False),  # fp32-only CPU
        (None, False, "fpu avx512_bf16", True),
        ("cuda", True, "fpu avx2", True),  # Ampere or newer: bf16 whatever the host CPU
        ("cuda", False, "fpu avx512_bf16", False),  # an older GPU: the host CPU's flags do not matter
        ("mps", False, "fpu amx_bf16", False),
    ],
)
def test_the_bf16_default_follows_the_device_that_trains(
    tmp_path, monkeypatch, accelerator, gpu_bf16, cpu_flags, expected
):
    """The GPU path of the precision default, exercised on a CPU machine with the device queries faked."""
    import torch

    from daemon.training.arguments import default_bf16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {cpu_flags}\n")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: accelerator is not None)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device(accelerator or "cpu"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: gpu_bf16)
    assert default_bf16(cpuinfo) is expected


def test_bf16_is_the_default_on_a_cpu_that_has_it_and_fp16_replaces_it(tree):
    from daemon.training.arguments import default_bf16, parse_args

    defaults = parse_args(["--dataset", "x.jsonl", *tree.flags()]).training
    assert defaults.bf16 is default_bf16()
    fp16 = parse_args(["--dataset", "x.jsonl", *tree.flags(), "--fp16"]).training
    assert (fp16.fp16, fp16.bf16) == (True, False)


@pytest.mark.parametrize(
    ("device", "capability", "triton", "expected"),
    [
        ("cpu", None, True, False),  # measured: no file of the AVX2 EPYC pays for compiling
        ("cuda", (9, 0), True, True),  # an H100: 50 ms a step against 90 eager
        ("cuda", (8, 0), False, False),  # no Triton, no inductor on a GPU
        ("cuda", (7, 5), True, False),  # before Ampere
        ("mps", None, True, False),
    ],
)
def test_the_compile_default_follows_the_device_that_trains(monkeypatch, device, capability, triton, expected):
    """The GPU path of the torch.compile default, exercised on a CPU machine with the device queries faked."""
    import torch
    import torch.utils._triton

    from daemon.training.arguments import default_torch_compile

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: triton)
    assert default_torch_compile(torch.device(device)) is expected


def test_parse_args_compiles_where_the_default_says_so_and_an_explicit_flag_wins(tree, monkeypatch):
    import daemon.training.arguments
    from daemon.training.arguments import parse_args

    flags = ["--dataset", "x.jsonl", *tree.flags()]
    assert parse_args(flags).training.torch_compile is False  # this machine: a CPU
    monkeypatch.setattr(daemon.training.arguments, "default_torch_compile", lambda device: True)
    compiled = parse_args(flags).training
    assert (compiled.torch_compile, compiled.torch_compile_backend) == (True, "inductor")  # set up by __post_init__
    assert parse_args([*flags, "--torch_compile", "False"]).training.torch_compile is False


def test_bf16_autocasts_every_worker_and_keeps_fp32_master_weights(tree):
    """Each worker thread's forward runs its matmuls in bf16; parameters and the export stay fp32."""
    import torch

    from daemon.training.speed.accumulation import ThreadedAccumulationTrainer

    seen: list[tuple[str, torch.dtype]] = []
    original = ThreadedAccumulationTrainer.__init__

    def watch(self, *args, **kwargs):
        original(self, *args, **kwargs)
        layer = self.model.model.layers[0].mlp.down_proj

        def hook(module, inputs, output):
            if module.training:
                seen.append((threading.current_thread().name, output.dtype))

        layer.register_forward_hook(hook)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ThreadedAccumulationTrainer, "__init__", watch)
        train(tree, _text_file(tree.root / "a.jsonl"), grad_workers=2, bf16=True)
    assert seen and {dtype for _, dtype in seen} == {torch.bfloat16}
    assert all(name.startswith("grad-worker") for name, _ in seen)
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tree.output)
    assert {p.dtype for p in exported.parameters()} == {torch.float32}


def test_the_first_step_of_every_file_is_logged(tree, caplog):
    first = train(tree, _text_file(tree.root / "a.jsonl", 12), logging_steps=1000)
    with caplog.at_level(logging.INFO, logger="daemon.training.callbacks"):
        train(tree, _text_file(tree.root / "b.jsonl", 12, offset=12), logging_steps=1000)
    logged = [e["step"] for e in _log_history(tree) if "loss" in e]
    assert logged == [1, first["end_step"] + 1]
    assert any(f"step {first['end_step'] + 1}/" in r.getMessage() and "(1/" in r.getMessage() for r in caplog.records)


def test_a_clock_stepped_backwards_never_rotates_away_the_newest_checkpoint(tree):
    first = train(tree, _text_file(tree.root / "a.jsonl", 12), save_total_limit=1)
    future = time.time() + 86_400  # the clock was a day ahead when this checkpoint was saved
    os.utime(tree.output / f"checkpoint-{first['end_step']}", (future, future))
    second = train(tree, _text_file(tree.root / "b.jsonl", 12, offset=12), save_total_limit=1)
    found = latest_complete_checkpoint(tree.output, set_aside=False)
    assert found is not None and found.global_step == second["end_step"]
    # Rotation alone: no file boundary kept beyond the file's start (tests/test_rollback.py covers those).
    third = train(tree, _text_file(tree.root / "c.jsonl", 12, offset=24), save_total_limit=1, keep_file_checkpoints=0)
    assert third["start_step"] == second["end_step"]
    assert history_violations(tree.history()) == []
    kept = sorted(int(p.name.split("-")[1]) for p in tree.output.glob("checkpoint-*"))
    assert kept == [second["end_step"], third["end_step"]]  # the newest, and the last file's start


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_file_that_fails_after_some_of_its_steps_leaves_the_model_as_before_it(tree, monkeypatch):
    import daemon.store.undo as undo
    from daemon.exceptions import TrainingError
    from daemon.store.checkpoints import roll_back
    from daemon.store.ledger import Ledger
    from daemon.training.speed.accumulation import ThreadedAccumulationTrainer

    first = train(tree, _text_file(tree.root / "a.jsonl", 12))
    start = tree.output / f"checkpoint-{first['end_step']}"
    before = {"start": _files(start), "export": _files(tree.output)}
    original = ThreadedAccumulationTrainer.__init__
    poison_from = first["end_step"] + 2  # steps start+1 and start+2 train and are checkpointed

    def poison_after_two_steps(trainer, *args, **kwargs):
        original(trainer, *args, **kwargs)

        def hook(module, args, output):
            return output * float("nan") if trainer.state.global_step >= poison_from else output

        trainer.model.get_input_embeddings().register_forward_hook(hook)

    seen: dict[str, set[str]] = {}

    def spy_roll_back(output_dir, start_step, end_step, *rest):
        seen["at the failure"] = {p.name for p in tree.output.glob("checkpoint-*")}
        return roll_back(output_dir, start_step, end_step, *rest)

    with monkeypatch.context() as patch:
        patch.setattr(ThreadedAccumulationTrainer, "__init__", poison_after_two_steps)
        patch.setattr(undo, "roll_back", spy_roll_back)  # the failure path's undo_after
        with pytest.raises(TrainingError, match="no finite gradient"):
            train(tree, _text_file(tree.root / "b.jsonl", 30, offset=12), save_steps=1, max_consecutive_skipped_steps=2)
    assert {f"checkpoint-{poison_from - 1}", f"checkpoint-{poison_from}"} <= seen["at the failure"]
    assert sorted(p.name for p in tree.output.glob("checkpoint-*")) == [start.name]
    assert {"start": _files(start), "export": _files(tree.output)} == before  # bitwise the pre-file model
    failed = Ledger(tree.status).entries()[-1]
    assert (failed.name, failed.state) == ("b.jsonl", "failed")
    third = train(tree, _text_file(tree.root / "c.jsonl", 12, offset=42))
    assert third["start_step"] == first["end_step"]
    assert history_violations(tree.history()) == []


def test_save_and_logging_steps_given_for_a_later_file_apply_to_it(tree):
    first = train(tree, _text_file(tree.root / "a.jsonl", 12))  # save_steps 1000, logging_steps 1
    second = train(tree, _text_file(tree.root / "b.jsonl", 12, offset=12), save_steps=1, save_total_limit=100)
    saved = sorted(int(p.name.split("-")[1]) for p in tree.output.glob("checkpoint-*"))
    assert saved == list(range(first["end_step"], second["end_step"] + 1))


def test_a_claimed_file_whose_content_changed_is_failed_and_never_trained(tree):
    from daemon.exceptions import DatasetError
    from daemon.store.ledger import Ledger

    data = _text_file(tree.root / "a.jsonl", 12)
    claim = Ledger(tree.status).add("a.jsonl", "queued", sha256="0" * 64, size=1)  # hashed at the claim
    with pytest.raises(DatasetError, match="changed after the daemon claimed it"):
        train(tree, data, ledger_id=claim.id)
    assert list(tree.output.glob("checkpoint-*")) == []
    assert Ledger(tree.status).get(claim.id).state == "failed"


def test_progress_beats_while_a_long_file_is_read_before_training(tree, monkeypatch):
    import daemon.store.jsonl as data

    slow_parse = data.parse_line

    def parse_slowly(raw, text_field):
        time.sleep(0.04)  # a file that takes seconds to read, as a multi-GB one does
        return slow_parse(raw, text_field)

    seen: list[tuple[str, float]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            doc = read_status(tree)
            if doc.get("progress_at"):
                seen.append((doc["state"], doc["progress_at"]))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        monkeypatch.setattr(data, "parse_line", parse_slowly)
        train(tree, _text_file(tree.root / "a.jsonl", 40), status_interval=0.1)
    finally:
        done.set()
        watcher.join()
    before_training = {at for state, at in seen if state in ("loading", "tokenizing")}
    assert len(before_training) >= 5  # the stall detector sees the read going on


def test_a_file_that_starts_after_an_idle_hour_marks_progress_as_it_starts_loading(tree, monkeypatch):
    """The status said loading while progress_at was still the last file's: a scrape then read a working state an
    hour without progress, and docs/metrics.md's ContinualNoProgress rule fired on a file that had just begun."""
    from daemon.store.status import StatusFile
    from daemon.training.run import FileRun

    StatusFile(tree.status).update(state="idle", progress_at=time.time() - 3600)
    seen: dict = {}

    def setup(self):
        seen.update(read_status(tree))  # what a scrape reads the moment the file starts
        raise RuntimeError("stop here")

    monkeypatch.setattr(FileRun, "setup", setup)
    started = time.time()
    with pytest.raises(RuntimeError, match="stop here"):
        train(tree, _text_file(tree.root / "a.jsonl", 4))
    assert seen["state"] == "loading" and seen["progress_at"] >= started


def test_periodic_checkpoints_are_held_to_their_share_of_training_time(monkeypatch):
    import threading

    from transformers import TrainerControl, TrainerState, TrainingArguments

    import daemon.training.callbacks
    from daemon.training.callbacks import PlanCallback

    clock = [0.0]
    monkeypatch.setattr(daemon.training.callbacks.time, "monotonic", lambda: clock[0])
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    state = TrainerState(max_steps=1000)
    stop = threading.Event()
    callback = PlanCallback(stop, max_save_overhead=0.02)
    callback.on_train_begin(args, state, TrainerControl())

    def step(at: float, global_step: int, save_steps_due: bool, save_seconds: float = 1.7) -> bool:
        """One optimizer step ending at ``at``; whether it checkpoints (the write takes ``save_seconds``)."""
        clock[0], state.global_step = at, global_step
        control = TrainerControl(should_save=save_steps_due)  # as DefaultFlowCallback sets it
        saved = callback.on_step_end(args, state, control).should_save
        clock[0] = at + (save_seconds if saved else 0.0)
        callback.on_step_begin(args, state, TrainerControl())
        return saved

    assert step(18.0, 200, True)  # the first one measures what a checkpoint costs here
    assert not step(37.7, 400, True)  # 1.7 s > 2 % of the 18 s trained since
    assert not step(38.0, 401, False)  # nothing is due
    assert step(106.0, 600, True)  # 1.7 s <= 2 % of the 86.3 s trained since
    assert step(107.0, 1000, False)  # the segment's end always checkpoints
    state.max_steps = 2000
    assert not step(115.0, 1200, True)
    stop.set()
    assert step(116.0, 1201, False)  # a stop request always checkpoints
    callback = PlanCallback(threading.Event(), max_save_overhead=0)
    assert [step(120.0 + i, 1300 + i, True) for i in range(3)] == [True, True, True]  # 0: every --save_steps
