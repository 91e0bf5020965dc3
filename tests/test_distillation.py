"""--replay_distillation: replayed rows keep the next-token distributions of the file's starting model
(daemon.training.distillation)."""

from __future__ import annotations

import copy
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import export_tiny, new_tree, text_file, tiny_model, train
from test_accumulation import _accumulate, _assert_grads_close, _micro_batch, _trainer

from daemon.exceptions import ConfigError
from daemon.training.data import PaddingCollator, PreparedData, mix_replay
from daemon.training.distillation import distilled_causal_lm_loss, linears_in, teacher_for
from daemon.training.loss_weights import DISTILLATION, LOSS_WEIGHT, weighted_causal_lm_loss, weighted_items
from daemon.training.technique_flags import TechniqueArguments

VOCAB = 64


def _kl_sum(logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_t a_t * KL(p_teacher,t || p_model,t)`` at the learned tokens, token by token with torch's ``kl_div``."""
    total = torch.zeros(())
    for r in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):  # logits at t predict the label at t + 1
            if labels[r, t + 1] != -100:
                kl = torch.nn.functional.kl_div(
                    torch.log_softmax(logits[r, t].float(), -1), torch.log_softmax(teacher[r, t].float(), -1),
                    log_target=True, reduction="sum",
                )  # fmt: skip
                total = total + weights[r] * kl
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_distilled_loss_is_the_weighted_nll_plus_the_kl_from_the_teacher_and_so_is_its_gradient(dtype):
    """distilled_causal_lm_loss against the two terms taken apart by autograd: the same value and gradient, with
    weighted rows, rows that are not distilled and labels that learn nothing."""
    batch = _micro_batch(4, 10, seed=4)
    labels = batch["labels"]
    assert bool(labels.eq(-100).any())
    generator = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(4, 10, VOCAB, generator=generator)).to(dtype).requires_grad_()
    teacher = (3 * torch.randn(2, 10, VOCAB, generator=generator)).to(dtype)
    weights, rows = torch.tensor([1.0, 2.0, 1.0, 0.5]), torch.tensor([False, True, False, True])
    distillation, items = torch.tensor([3.0, 0.7]), torch.tensor(17.0)
    exact = logits.detach().float().requires_grad_()  # the reference in fp32 throughout, its gradient rounded once
    expected = (
        weighted_causal_lm_loss(exact, labels, weights, items)
        + _kl_sum(exact[rows], teacher, labels[rows], distillation) / items
    )
    (expected_grad,) = torch.autograd.grad(expected, exact)
    got = distilled_causal_lm_loss(logits, labels, weights, rows, distillation, teacher, items)
    (grad,) = torch.autograd.grad(got, logits)
    assert got.dtype == torch.float32 and float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert grad.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8  # bf16: the fp32 gradient rounded once, within 2^-9
    torch.testing.assert_close(grad.float(), expected_grad, rtol=tolerance, atol=1e-8)
    plain = float(weighted_causal_lm_loss(exact.detach(), labels, weights, items))
    assert float(got.detach()) > plain + 0.1  # the KL term is there: the checks above can fail
    same = distilled_causal_lm_loss(logits, labels, weights, rows, distillation, logits[rows].detach(), items)
    assert float(same.detach()) == pytest.approx(plain, rel=1e-5)  # a teacher that is the model adds nothing


def test_the_distilled_loss_ignores_what_is_not_learned_and_what_the_teacher_rules_out():
    """Non-finite logits where no token is learned (padding) leave the loss and gradient finite, as the stock loss
    does; a teacher's -inf logit (a token it gives probability 0) adds nothing, and the teacher's logits are not
    changed by the loss."""
    batch = _micro_batch(3, 8, seed=9)
    labels, weights, rows = batch["labels"], torch.ones(3), torch.tensor([True, False, True])
    generator = torch.Generator().manual_seed(3)
    clean = torch.randn(3, 8, VOCAB, generator=generator)
    teacher = torch.randn(2, 8, VOCAB, generator=generator)
    teacher[..., 5] = float("-inf")
    given = teacher.clone()
    masked = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].eq(-100)  # the shifted labels' -100
    assert bool(masked.any())
    dirty = clean.masked_fill(masked.unsqueeze(-1), float("nan"))
    ruled_out = teacher.clone()
    ruled_out[..., 5] = -1e4  # the same distribution in finite numbers
    results = []
    for logits, target in ((clean, ruled_out), (dirty, teacher)):
        leaf = logits.clone().requires_grad_()
        loss = distilled_causal_lm_loss(leaf, labels, weights, rows, torch.tensor([1.0, 2.0]), target, 10.0)
        (grad,) = torch.autograd.grad(loss, leaf)
        results.append((loss.detach(), grad))
    (want, want_grad), (got, got_grad) = results
    assert torch.isfinite(got) and float(got) == pytest.approx(float(want), rel=1e-6)
    assert bool(torch.isfinite(got_grad).all()) and bool(got_grad[masked].eq(0).all())
    torch.testing.assert_close(got_grad, want_grad)
    assert torch.equal(teacher, given)


def test_a_teacher_holding_its_linear_layers_in_bf16_computes_the_autocast_logits_bit_for_bit():
    """linears_in: the cast autocast did at every forward, done once; the training model keeps its fp32 tied weights."""
    model = tiny_model(VOCAB, 0)
    teacher = copy.deepcopy(model).eval()
    linears_in(teacher, torch.bfloat16)
    assert teacher.lm_head.weight.dtype == torch.bfloat16 and teacher.model.embed_tokens.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float32 and model.lm_head.weight is model.model.embed_tokens.weight
    batch = _micro_batch(3, 10, seed=2)
    forward = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = model(**forward).logits, teacher(**forward).logits
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_the_step_loss_adds_the_weighted_kl_of_the_distilled_rows_over_the_steps_token_count(tmp_path):
    """compute_loss: ``(sum w nll + sum a KL) / sum w`` with the teacher's logits."""
    model = tiny_model(VOCAB, 0)
    trainer = _trainer(model, 0, tmp_path)
    teacher = tiny_model(VOCAB, 1).eval()  # other weights: a KL above 0
    trainer.teacher = teacher
    batch = {**_micro_batch(4, 12, seed=6), LOSS_WEIGHT: torch.tensor([1.0, 2.0, 1.0, 2.0])}
    batch[DISTILLATION] = torch.tensor([0.0, 3.0, 0.0, 3.0])
    items = weighted_items(batch)
    got = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
    trainer.shutdown_workers()
    forward = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits, teacher_logits = model(**forward).logits, teacher(**forward).logits
    rows = torch.tensor([1, 3])
    kl = _kl_sum(logits[rows], teacher_logits[rows], batch["labels"][rows], batch[DISTILLATION][rows])
    nll = weighted_causal_lm_loss(logits, batch["labels"], batch[LOSS_WEIGHT], items)
    assert float(got.detach()) == pytest.approx(float(nll + kl / items), rel=1e-5)
    assert float(kl) > 0
    trainer.teacher = None  # without a teacher (the cooldown branch's Trainer): the weighted loss alone
    assert float(trainer.compute_loss(model, dict(batch), num_items_in_batch=items).detach()) == pytest.approx(
        float(nll)
    )


def test_gradient_workers_split_the_distilled_rows_and_share_the_teacher_to_the_stock_steps_gradient(tmp_path):
    """Two micro-batches of a step on 2 worker threads (the rows, their columns and the teacher's forward passes
    split across shards) give the stock step's gradient; without the teacher the gradient differs."""
    teacher = tiny_model(VOCAB, 1).eval()
    step = []
    for seed, rows in ((6, 5), (7, 3)):
        batch = _micro_batch(rows, 12, seed)
        batch[LOSS_WEIGHT] = torch.tensor([1.0, 2.0] * rows)[:rows]
        batch[DISTILLATION] = torch.tensor([0.0, 4.0] * rows)[:rows]
        step.append(batch)
    models = {}
    for name, workers, distils in (("stock", 0, True), ("workers", 2, True), ("plain", 0, False)):
        models[name] = model = tiny_model(VOCAB, 0)
        trainer = _trainer(model, workers, tmp_path)
        trainer.teacher = teacher if distils else None
        _accumulate(trainer, model, step, trainer._get_num_items_in_batch(step, torch.device("cpu")))
    _assert_grads_close(models["workers"], models["stock"])
    with pytest.raises(AssertionError):  # the KL term moves the gradient: the comparison above can fail
        _assert_grads_close(models["plain"], models["stock"])


def test_the_collator_carries_the_distillation_weights_and_gives_padding_rows_none():
    features = [{"input_ids": [1, 2, 3], DISTILLATION: 0.0}, {"input_ids": [4, 5], DISTILLATION: 1.5}]
    batch = PaddingCollator(pad_token_id=0, rows=3)(features)
    assert batch[DISTILLATION].tolist() == [0.0, 1.5, 0.0]
    assert LOSS_WEIGHT not in batch


@pytest.mark.parametrize("weight", ["-1", "inf", "nan"])
@pytest.mark.parametrize("name", ["replay_distillation", "file_distillation"])
def test_a_distillation_weight_that_is_not_a_number_at_least_zero_is_refused(name, weight):
    with pytest.raises(ConfigError, match=f"--{name} must be a number >= 0"):
        TechniqueArguments(**{name: float(weight)})


@pytest.mark.parametrize("name", ["replay_distillation", "file_distillation"])
def test_a_distillation_weight_with_a_lora_adapter_is_refused_in_one_line(tmp_path, name):
    from daemon.training.arguments import parse_args

    tree, dataset = new_tree(tmp_path / "t"), ["--dataset", str(tmp_path / "none.jsonl")]
    lora = {"model_name_or_path": export_tiny(tmp_path / "base"), "use_peft": "true"}
    refused = f"--{name} keeps a copy of the whole model: it cannot be used with --use_peft"
    with pytest.raises(ConfigError, match=refused):
        parse_args([*dataset, *tree.flags(**lora, **{name: "0.5"})])
    assert getattr(parse_args([*dataset, *tree.flags(**lora)]).techniques, name) == 0  # its default there


def _prepared(rows: int) -> PreparedData:
    import datasets

    train = datasets.Dataset.from_dict(
        {"input_ids": [[r, r + 1] for r in range(rows)], "labels": [None] * rows, "length": [2] * rows}
    )
    return PreparedData(train, None, 2 * rows, 0)


def test_the_rows_weights_are_the_replayed_ones_and_the_files_own_and_no_column_without_either():
    data, replayed = _prepared(6), [{"input_ids": [50, 51, 52]}, {"input_ids": [60, 61]}]
    mixed = mix_replay(data, replayed, 0, distillation=1.5, file_distillation=0.25)
    weights = {row["input_ids"][0]: row[DISTILLATION] for row in mixed.train}
    assert weights == {**{r: 0.25 for r in range(6)}, 50: 1.5, 60: 1.5}
    assert DISTILLATION not in mixed.own_train.column_names  # the store samples the file's rows as they came
    only_replayed = mix_replay(data, replayed, 0, distillation=1.5)
    assert sorted(row[DISTILLATION] for row in only_replayed.train) == [0.0] * 6 + [1.5] * 2
    assert DISTILLATION not in mix_replay(data, replayed, 0).train.column_names
    # Nothing replayed: the file's own rows, in their order, distilled at --file_distillation; or the data as it was.
    alone = mix_replay(data, [], 0, distillation=1.5, file_distillation=0.25)
    assert alone.train["input_ids"] == data.train["input_ids"] and alone.train[DISTILLATION] == [0.25] * 6
    assert alone.replayed == 0 and alone.own_train is data.train
    assert mix_replay(data, [], 0, distillation=1.5) is data


def test_a_file_distils_its_own_examples_toward_its_starting_model_but_never_the_first_from_scratch(tmp_path, caplog):
    """--file_distillation with replay off: the first file (a random initialisation) has no teacher, the next one
    distils its own rows toward the first one's end and still trains its planned steps."""
    tree = new_tree(tmp_path / "t")
    flags = {"replay_fraction": "0", "replay_distillation": "0", "file_distillation": "0.5"}
    with caplog.at_level(logging.INFO, logger="daemon.training.distillation"):
        first = train(tree, text_file(tmp_path / "a.jsonl", 0, 20), **flags)
        assert "distilling" not in caplog.text
        second = train(tree, text_file(tmp_path / "b.jsonl", 20, 20), **flags)
    assert f"distilling the file's own (--file_distillation 0.5) toward the model of step {first['end_step']}" in (
        caplog.text
    )
    assert second["end_step"] - first["end_step"] == second["planned_steps"] > 0
    assert math.isfinite(second["train_loss"])


def test_a_resumed_file_distils_toward_the_weights_of_its_first_step_not_its_latest_checkpoint(tmp_path):
    from daemon.training.arguments import parse_args
    from daemon.training.model import load_pretrained

    tree = new_tree(tmp_path / "t")
    first = train(tree, text_file(tmp_path / "a.jsonl", 0, 20), save_steps=2)
    second = train(tree, text_file(tmp_path / "b.jsonl", 20, 20), save_steps=2)
    start, latest = first["end_step"], second["end_step"]
    flags = parse_args(tree.flags(replay_distillation="1"))
    model, _ = load_pretrained(tree.output / f"checkpoint-{latest}")
    plan = SimpleNamespace(start_step=start)
    distilled = SimpleNamespace(replayed=3, train=SimpleNamespace(column_names=["input_ids", DISTILLATION]))
    resumed = SimpleNamespace(datasets=distilled, steps_done=latest - start, plan=plan)
    at_start, _ = load_pretrained(tree.output / f"checkpoint-{start}")
    teacher = teacher_for(resumed, flags, model)  # type: ignore[arg-type]
    got, want = teacher.state_dict(), at_start.state_dict()  # the linear layers in the training's autocast dtype
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in got)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    assert not torch.equal(next(teacher.parameters()), next(model.parameters()))  # the latest weights differ
    fresh = SimpleNamespace(datasets=distilled, steps_done=0, plan=plan)
    copied = teacher_for(fresh, flags, model)  # type: ignore[arg-type]
    weights = model.state_dict()
    assert all(torch.equal(v, weights[k].to(v.dtype)) for k, v in copied.state_dict().items())
    assert copied is not model and next(copied.parameters()) is not next(model.parameters())
    undistilled = SimpleNamespace(replayed=3, train=SimpleNamespace(column_names=["input_ids"]))
    nothing = SimpleNamespace(datasets=undistilled, steps_done=0, plan=plan)
    assert teacher_for(nothing, flags, model) is None  # type: ignore[arg-type]  # no row distilled


def test_a_resumed_first_file_distils_toward_the_lines_base_when_the_run_names_no_model(tmp_path):
    """A line's first file, resumed from a checkpoint by a run without --model_name_or_path: its teacher is the base
    the line started from (origin.json), not the checkpoint's weights nor nothing."""
    from daemon.training.arguments import parse_args
    from daemon.training.distillation import start_weights
    from daemon.training.model import load_pretrained

    base = export_tiny(tmp_path / "base")
    tree = new_tree(tmp_path / "t")
    train(tree, text_file(tmp_path / "a.jsonl", 0, 20), model_name_or_path=base, save_steps=2)
    plan = SimpleNamespace(start_step=0)
    resumed = SimpleNamespace(steps_done=2, plan=plan)
    start = start_weights(resumed, parse_args(tree.flags(replay_distillation="1")))  # type: ignore[arg-type]
    want = load_pretrained(str(base))[0].state_dict()
    assert start is not None and start.keys() == want.keys() and all(torch.equal(start[k], want[k]) for k in want)
