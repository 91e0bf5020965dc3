"""--replay_distillation: replayed rows keep the next-token distributions of the file's starting model
(daemon.training.distillation)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import new_tree, text_file, tiny_model, train
from test_accumulation import _accumulate, _assert_grads_close, _micro_batch, _trainer

from daemon.exceptions import ConfigError
from daemon.training.data import PaddingCollator
from daemon.training.distillation import distillation_loss, teacher_for
from daemon.training.loss_weights import DISTILLATION, LOSS_WEIGHT, weighted_causal_lm_loss, weighted_items
from daemon.training.technique_flags import TechniqueArguments

VOCAB = 64


def test_the_distillation_term_is_the_kl_from_the_teacher_over_the_learned_tokens():
    batch = _micro_batch(3, 10, seed=4)
    logits = torch.randn(3, 10, VOCAB, generator=torch.Generator().manual_seed(5))
    teacher = torch.randn(3, 10, VOCAB, generator=torch.Generator().manual_seed(6))
    weights = torch.tensor([0.0, 2.0, 0.5])
    expected = 0.0
    for r in range(3):
        for t in range(9):  # logits at t predict the label at t + 1
            if batch["labels"][r, t + 1] != -100:
                kl = torch.nn.functional.kl_div(
                    torch.log_softmax(logits[r, t], -1), torch.log_softmax(teacher[r, t], -1), log_target=True,
                    reduction="sum",
                )  # fmt: skip
                expected += float(weights[r]) * float(kl)
    got = distillation_loss(logits, teacher, batch["labels"], weights)
    assert float(got) == pytest.approx(expected, rel=1e-5) and expected > 0
    assert float(distillation_loss(logits, logits.clone(), batch["labels"], weights)) == pytest.approx(0, abs=1e-5)


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
    kl = distillation_loss(logits[rows], teacher_logits[rows], batch["labels"][rows], batch[DISTILLATION][rows])
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
def test_a_distillation_weight_that_is_not_a_number_at_least_zero_is_refused(weight):
    with pytest.raises(ConfigError, match="--replay_distillation must be a number >= 0"):
        TechniqueArguments(replay_distillation=float(weight))


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
    resumed = SimpleNamespace(datasets=SimpleNamespace(replayed=3), steps_done=latest - start, plan=plan)
    at_start, _ = load_pretrained(tree.output / f"checkpoint-{start}")
    teacher = teacher_for(resumed, flags, model)  # type: ignore[arg-type]
    for (name, got), want in zip(teacher.named_parameters(), at_start.parameters(), strict=True):
        assert torch.equal(got, want), name
        assert not got.requires_grad
    assert not teacher.training
    assert not torch.equal(next(teacher.parameters()), next(model.parameters()))  # the latest weights differ
    fresh = SimpleNamespace(datasets=SimpleNamespace(replayed=3), steps_done=0, plan=plan)
    copied = teacher_for(fresh, flags, model)  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(copied.parameters(), model.parameters(), strict=True))
    assert copied is not model and next(copied.parameters()) is not next(model.parameters())
    nothing = SimpleNamespace(datasets=SimpleNamespace(replayed=0), steps_done=0, plan=plan)
    assert teacher_for(nothing, flags, model) is None  # type: ignore[arg-type]
    assert teacher_for(fresh, parse_args(tree.flags(replay_distillation="0")), model) is None  # type: ignore[arg-type]
