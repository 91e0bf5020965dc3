"""Multi-thread CPU gradient accumulation and the gradient guard (docs/speed.md "Multi-thread ...")."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import Tree, stdlib_documents, tiny_model, train, write_jsonl

from daemon.exceptions import ConfigError, TrainingError
from daemon.training.speed.accumulation import (
    ThreadedAccumulationTrainer,
    all_finite,
    resolve_workers,
    split_batch,
    worker_threads_alive,
)

VOCAB = 64


def _tiny_model(seed: int = 0):
    return tiny_model(VOCAB, seed)


def _micro_batch(rows: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Random ids with right padding (mask 0, label -100) and some -100 labels inside."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for r in range(rows):
        pad = int(torch.randint(0, length // 2, (1,), generator=g))
        if pad:
            mask[r, -pad:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a masked prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _items(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    # As Trainer._get_num_items_in_batch counts for causal LMs (labels are shifted).
    return sum(b["labels"][..., 1:].ne(-100).sum() for b in batches)


def _trainer(model, workers: int, tmp_path, **kwargs) -> ThreadedAccumulationTrainer:
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / f"out{workers}"), report_to="none", use_cpu=True, **kwargs)
    return ThreadedAccumulationTrainer(model=model, args=args, grad_workers=workers)


def _accumulate(trainer, model, batches, num_items) -> None:
    trainer.current_gradient_accumulation_steps = len(batches)
    for batch in batches:
        trainer.training_step(model, {k: v.clone() for k, v in batch.items()}, num_items)
    trainer.shutdown_workers()


def _assert_grads_close(a, b, rel: float = 1e-5) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert pa.grad is not None and pb.grad is not None, name
        err = (pa.grad - pb.grad).norm() / pb.grad.norm().clamp_min(1e-12)
        assert err < rel, (name, float(err))


def test_split_batch_makes_near_equal_shards_and_never_empty_ones():
    batch = {"input_ids": torch.arange(10).view(5, 2), "flag": "x"}
    sizes = [s["input_ids"].shape[0] for s in split_batch(batch, 2)]
    assert sizes == [3, 2]
    assert [s["input_ids"].shape[0] for s in split_batch(batch, 8)] == [1] * 5
    assert torch.equal(torch.cat([s["input_ids"] for s in split_batch(batch, 3)]), batch["input_ids"])
    assert all(s["flag"] == "x" for s in split_batch(batch, 3))


def test_workers_are_resolved_per_device_world_size_and_model_size():
    small, large = 20_000_000, 60_000_000
    assert resolve_workers("auto", "cpu", 1, small, cores=8) == 2
    assert resolve_workers("auto", "cpu", 1, small, cores=1) == 1
    assert resolve_workers("auto", "cpu", 1, large, cores=8) == 0  # measuring would take minutes
    assert resolve_workers("4", "cpu", 1, large) == 4
    assert resolve_workers("0", "cpu", 1, small) == 0
    assert resolve_workers("4", "cuda", 1, small) == 0
    assert resolve_workers("4", "cpu", 2, small) == 0
    with pytest.raises(ConfigError, match="--grad_workers"):
        resolve_workers("many", "cpu", 1, small)
    asked = []
    measured = lambda n: asked.append(n) or 0  # noqa: E731  # the machine says: stock
    assert resolve_workers("auto", "cpu", 1, small, cores=8, measure=measured) == 0 and asked == [2]
    assert resolve_workers("auto", "cpu", 1, large, cores=8, measure=measured) == 0 and asked == [2]  # not measured
    assert resolve_workers("3", "cpu", 1, small, measure=measured) == 3 and asked == [2]  # a number is obeyed
    # A compiled model takes the stock step without a measurement; a number is still obeyed.
    assert resolve_workers("auto", "cpu", 1, small, cores=8, measure=measured, compiled=True) == 0 and asked == [2]
    assert resolve_workers("2", "cpu", 1, small, compiled=True) == 2


def test_auto_workers_are_measured_once_per_shape_and_leave_the_model_untouched(monkeypatch):
    from daemon.training.speed import autotune

    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    rng = torch.random.get_rng_state()
    timings = iter([(1.0, 0.5, 0.0), (0.5, 1.0, None), (0.5, 1.0, 0.01)])  # first shape: threads win; then stock
    real = autotune.measure_seconds
    calls = []

    def measure(*args):
        calls.append(args[1:])
        real(*args)  # the real passes run, so that their side effects are checked below
        return next(timings)

    monkeypatch.setattr(autotune, "measure_seconds", measure)
    assert autotune.choose_workers(model, 4, 16, False, 2) == 2
    assert autotune.choose_workers(model, 4, 16, False, 2) == 2  # cached: not measured again
    assert autotune.choose_workers(model, 2, 16, False, 2) == 0  # another micro-batch shape is measured
    assert calls == [(4, 16, False, 2), (2, 16, False, 2)]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not model.training
    assert torch.equal(torch.random.get_rng_state(), rng)
    cache = json.loads(autotune.cache_path().read_text())
    assert sorted(r["workers"] for r in cache.values()) == [0, 2] and all("micro-batch" in k for k in cache)
    autotune.cache_path().write_text("not json")
    assert autotune.choose_workers(model, 4, 16, False, 2) == 0  # an unreadable cache is measured again (stock wins)


def test_auto_measures_three_to_ten_passes_each_way_within_its_time_and_remeasures_older_choices(monkeypatch, tmp_path):
    from daemon.training.speed import autotune

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = _tiny_model()
    passes = []
    monkeypatch.setattr(autotune, "mark_progress", lambda: passes.append(1))
    autotune.measure_seconds(model, 4, 16, False, 2)  # a tiny model: every pass fits in the time
    assert len(passes) == 2 * (autotune.MAX_MEASURED_MICRO_BATCHES + 1)  # one warm-up pass each way
    passes.clear()
    monkeypatch.setattr(autotune, "MEASUREMENT_SECONDS", 0.0)
    autotune.measure_seconds(model, 4, 16, False, 2)
    assert len(passes) == 2 * (autotune.MIN_MEASURED_MICRO_BATCHES + 1)

    # A choice cached by the earlier rule (three passes, no "method") is measured again, then kept.
    key = autotune.shape_key(model, 4, 16, False, 2)
    autotune.cache_path().parent.mkdir(parents=True)
    autotune.cache_path().write_text(json.dumps({key: {"workers": 0, "contended_measurements": 0, "at": "then"}}))
    measured = []
    monkeypatch.setattr(autotune, "measure_seconds", lambda *args: measured.append(1) or (1.0, 0.5, 0.0))
    assert autotune.choose_workers(model, 4, 16, False, 2) == 2
    assert autotune.choose_workers(model, 4, 16, False, 2) == 2
    assert (
        measured == [1] and json.loads(autotune.cache_path().read_text())[key]["method"] == autotune.MEASUREMENT_METHOD
    )


def test_other_load_is_the_busy_time_that_was_not_this_process(tmp_path):
    from daemon.training.speed.autotune import OtherLoad

    stat = tmp_path / "stat"
    cpus = sorted(os.sched_getaffinity(0))

    def write(user: int, idle: int, steal: int) -> None:
        # user nice system idle iowait irq softirq steal guest guest_nice, per CPU, and a CPU this process may not use
        lines = [f"cpu{n} {user} 0 0 {idle} 0 0 0 {steal} 0 0" for n in [*cpus, max(cpus) + 1]]
        stat.write_text("\n".join(["cpu 1 2 3 4 5 6 7 8 0 0", *lines, "intr 1 2"]) + "\n")

    write(user=1000, idle=1000, steal=0)
    with OtherLoad(stat) as load:
        write(user=1300, idle=1600, steal=100)  # per CPU: 300 busy + 100 stolen of 1000 ticks
    assert load.share == pytest.approx(0.4, abs=0.01)  # this process used (next to) no CPU meanwhile
    with OtherLoad(tmp_path / "absent") as unknown:
        pass
    assert unknown.share is None


def test_a_measurement_while_other_work_holds_the_cpu_is_taken_again_by_the_next_process(monkeypatch, caplog, tmp_path):
    from daemon.training.speed import autotune

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = _tiny_model()
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(len(os.sched_getaffinity(0)))
    ]
    try:
        time.sleep(0.5)  # the spinners are running
        with caplog.at_level("WARNING", logger="daemon.training.speed.autotune"):
            chosen = autotune.choose_workers(model, 4, 64, False, 2)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert chosen in (0, 2) and "measured again by the next training process" in caplog.text

    def record() -> dict:
        (only,) = json.loads(autotune.cache_path().read_text()).values()
        return only

    assert record()["contended_measurements"] == 1
    measured = []
    quiet, busy = (1.0, 0.5, 0.02), (0.5, 1.0, 0.5)  # (stock s, threaded s, other load)
    monkeypatch.setattr(autotune, "measure_seconds", lambda *args: measured.append(1) or next(timings))
    timings = iter([quiet])
    assert autotune.choose_workers(model, 4, 64, False, 2) == 2  # measured again, on a quiet CPU
    assert autotune.choose_workers(model, 4, 64, False, 2) == 2  # and kept
    assert measured == [1] and record()["contended_measurements"] == 0 and record()["other_load"] == 0.02
    # A machine that stays busy is measured at most MAX_CONTENDED_MEASUREMENTS times in a row.
    autotune.cache_path().unlink()
    timings = iter([busy] * autotune.MAX_CONTENDED_MEASUREMENTS)
    for _ in range(autotune.MAX_CONTENDED_MEASUREMENTS + 2):
        assert autotune.choose_workers(model, 4, 64, False, 2) == 0
    assert len(measured) == 1 + autotune.MAX_CONTENDED_MEASUREMENTS
    assert record()["contended_measurements"] == autotune.MAX_CONTENDED_MEASUREMENTS


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 8])
def test_summed_shard_gradients_equal_the_stock_trainer_gradient(tmp_path, workers):
    batches = [_micro_batch(5, 12, seed=1), _micro_batch(3, 12, seed=2)]  # uneven shards, GA = 2
    num_items = _items(batches)
    stock_model = _tiny_model()
    threaded_model = copy.deepcopy(stock_model)
    _accumulate(_trainer(stock_model, 0, tmp_path), stock_model, batches, num_items)
    threaded = _trainer(threaded_model, workers, tmp_path)
    _accumulate(threaded, threaded_model, batches, num_items)
    _assert_grads_close(threaded_model, stock_model)
    assert threaded.guard.dropped_shards == 0


class _PoisonRows:
    """A forward hook on the embeddings that turns a shard holding a row starting with ``marker`` into NaN."""

    def __init__(self, model, marker: int | None) -> None:
        self.marker = marker
        self.handle = model.get_input_embeddings().register_forward_hook(self)

    def __call__(self, module, args, output):
        # The whole shard or nothing: torch.where would send 0 * NaN = NaN into the clean rows' backward.
        if self.marker is None or bool((args[0][:, 0] == self.marker).any()):
            return output * float("nan")
        return output


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_element_among_tensors_of_several_dtypes_and_changes_none(bad):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(300, 7, generator=g) * 1e30, torch.randn(5, generator=g).bfloat16(), torch.randn(64, 3)]
    before = [t.clone() for t in tensors]
    assert all_finite(tensors) and all(torch.equal(a, b) for a, b in zip(tensors, before, strict=True))
    for tensor in tensors:
        flat = tensor.view(-1)
        flat[len(flat) // 2] = bad
        assert not all_finite(tensors)
        flat[len(flat) // 2] = 1.0
    assert all_finite(tensors) and all_finite([])


def test_a_non_finite_shard_is_dropped_and_its_tokens_leave_the_normalisation(tmp_path):
    batch = _micro_batch(4, 12, seed=3)
    batch["input_ids"][2:, 0] = 0  # rows 2-3 form the second shard of two; token 0 marks them
    batch["labels"][2:, 0] = -100
    clean = {k: v[:2] for k, v in batch.items()}
    reference = _tiny_model()
    guarded = copy.deepcopy(reference)
    _accumulate(_trainer(reference, 0, tmp_path), reference, [clean], _items([clean]))

    trainer = _trainer(guarded, 2, tmp_path)
    _PoisonRows(guarded, marker=0)
    _accumulate(trainer, guarded, [batch], _items([batch]))
    assert trainer.guard.dropped_shards == 1
    assert trainer.guard.skipped_steps == 0
    _assert_grads_close(guarded, reference)  # as if the poisoned rows had never been in the step


def test_a_step_without_any_finite_shard_is_skipped_and_leaves_parameters_bitwise_unchanged(tmp_path):
    model = _tiny_model()
    trainer = _trainer(model, 2, tmp_path, max_steps=3, learning_rate=0.1, per_device_train_batch_size=4)
    trainer.create_optimizer_and_scheduler(num_training_steps=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hook = _PoisonRows(model, marker=None)
    batch = _micro_batch(4, 12, seed=4)
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(model, batch, _items([batch]))
    trainer.shutdown_workers()
    hook.handle.remove()
    assert all(p.grad is None for p in model.parameters())
    assert trainer.guard.skipped_steps == 1 and trainer.guard.dropped_shards == 2
    trainer.optimizer.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_training_with_every_gradient_non_finite_fails_the_file_instead_of_looping(tree, monkeypatch):
    original = ThreadedAccumulationTrainer.__init__

    def poisoned_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        _PoisonRows(self.model, marker=None)

    monkeypatch.setattr(ThreadedAccumulationTrainer, "__init__", poisoned_init)
    data = write_jsonl(tree.root / "a.jsonl", [{"text": d} for d in stdlib_documents(limit=20)])
    with pytest.raises(TrainingError, match="3 optimizer steps in a row had no finite gradient"):
        train(tree, data, grad_workers=2, max_consecutive_skipped_steps=3)
    (row,) = tree.history()
    assert row["outcome"] == "failed" and "no finite gradient" in row["error"]
    status = json.loads((tree.status / "training_status.json").read_text())
    assert status["gradient_guard"]["skipped_steps"] >= 2
    assert worker_threads_alive() == []


def test_skipped_steps_do_not_advance_the_scheduler(tree, monkeypatch):
    original = ThreadedAccumulationTrainer.__init__
    calls = {"n": 0}

    def poison_first_steps(self, *args, **kwargs):
        original(self, *args, **kwargs)
        embed = self.model.get_input_embeddings()

        def hook(module, args, output):
            if not module.training:  # the evaluation's forwards (forward transfer scores before step 1) pass
                return output
            calls["n"] += 1
            return output * float("nan") if calls["n"] <= 4 else output  # two steps x 2 shards

        embed.register_forward_hook(hook)

    monkeypatch.setattr(ThreadedAccumulationTrainer, "__init__", poison_first_steps)
    data = write_jsonl(tree.root / "a.jsonl", [{"text": d} for d in stdlib_documents(limit=20)])
    row = train(tree, data, grad_workers=2, warmup_steps=10, learning_rate=1e-3)
    assert row["end_step"] == row["planned_steps"]
    history = json.loads((tree.output / f"checkpoint-{row['end_step']}" / "trainer_state.json").read_text())
    lr = {e["step"]: e["learning_rate"] for e in history["log_history"] if "learning_rate" in e}
    assert lr[1] == lr[2] == lr[3] == 0.0  # steps 1-2 skipped: the warmup has not moved
    assert lr[4] == pytest.approx(1e-4)
    status = json.loads((tree.status / "training_status.json").read_text())
    assert status["gradient_guard"] == {**status["gradient_guard"], "workers": 2, "skipped_steps": 2}


@pytest.mark.parametrize(("bf16", "rel"), [(False, 1e-4), (True, 2e-2)])
def test_one_to_eight_workers_follow_the_same_loss_trajectory(tmp_path, bf16, rel):
    # 21 documents -> a last partial batch; batch 5 -> shards of uneven size for 2, 4 and 8 workers.
    # bf16 autocast (each worker thread enters it in the model's forward) rounds differently
    # for different shard shapes, hence the looser tolerance.
    docs = stdlib_documents(limit=21)
    losses = {}
    for workers in (0, 1, 2, 4, 8):
        tree = Tree(tmp_path / f"w{workers}")
        tree.root.mkdir()
        data = write_jsonl(tree.root / "a.jsonl", [{"text": d} for d in docs])
        train(tree, data, grad_workers=workers, per_device_train_batch_size=5, gradient_accumulation_steps=2, bf16=bf16)
        state = json.loads(next(tree.output.glob("checkpoint-*/trainer_state.json")).read_text())
        losses[workers] = [e["loss"] for e in state["log_history"] if "loss" in e]
    for workers in (1, 2, 4, 8):
        assert losses[workers] == pytest.approx(losses[0], rel=rel), workers


def test_inference_never_runs_while_worker_threads_are_alive(tree, monkeypatch):
    seen: list[list[str]] = []
    original = ThreadedAccumulationTrainer.__init__

    def watch_inference(self, *args, **kwargs):
        original(self, *args, **kwargs)

        def pre_hook(module, args):
            if not module.training:  # evaluation or generation
                seen.append(worker_threads_alive())

        self.model.register_forward_pre_hook(pre_hook)

    monkeypatch.setattr(ThreadedAccumulationTrainer, "__init__", watch_inference)
    data = write_jsonl(tree.root / "a.jsonl", [{"text": d} for d in stdlib_documents(limit=30)])
    row = train(tree, data, grad_workers=4)
    assert row["eval_loss"] is not None  # evaluation ran ...
    assert len(seen) > 5  # ... and so did generation, one forward per new token
    assert all(alive == [] for alive in seen)


def test_the_samples_run_without_the_training_autocast(tree, monkeypatch):
    # accelerate wraps model.forward in the training's bf16 autocast and leaves it there after
    # training; the samples (and anything after fit) must run the model's own forward.
    import daemon.training.outputs

    autocast_in_samples: list[bool] = []
    original = daemon.training.outputs.generate_samples

    def watched(model, *args, **kwargs):
        hook = model.lm_head.register_forward_pre_hook(
            lambda module, inputs: autocast_in_samples.append(torch.is_autocast_enabled("cpu"))
        )
        try:
            return original(model, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(daemon.training.outputs, "generate_samples", watched)
    data = write_jsonl(tree.root / "a.jsonl", [{"text": d} for d in stdlib_documents(limit=10)])
    train(tree, data, bf16=True)
    assert autocast_in_samples and not any(autocast_in_samples)
