"""--replay_loss_weight: replayed examples weigh more in the loss, the steps the same (daemon.training.loss_weights)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from helpers import new_tree, text_file, tiny_model, train
from test_accumulation import _assert_grads_close, _micro_batch, _trainer

from daemon.exceptions import ConfigError
from daemon.training.data import PaddingCollator
from daemon.training.loss_weights import LOSS_WEIGHT, weighted_causal_lm_loss, weighted_items
from daemon.training.technique_flags import TechniqueArguments

VOCAB = 64


def test_the_weighted_loss_is_the_weighted_mean_of_the_token_losses_and_transformers_loss_at_weight_one():
    from transformers.loss.loss_utils import ForCausalLMLoss

    batch = _micro_batch(3, 10, seed=4)
    logits = torch.randn(3, 10, VOCAB, generator=torch.Generator().manual_seed(5))
    ones = torch.ones(3)
    items = weighted_items({"labels": batch["labels"]})
    stock = ForCausalLMLoss(logits, batch["labels"], VOCAB, num_items_in_batch=items)
    torch.testing.assert_close(weighted_causal_lm_loss(logits, batch["labels"], ones, items), stock)
    torch.testing.assert_close(weighted_causal_lm_loss(logits, batch["labels"], ones, None), stock)

    weights = torch.tensor([1.0, 3.0, 0.5])
    nll = [  # each row's summed token losses: its mean times its learned tokens
        ForCausalLMLoss(logits[r : r + 1], batch["labels"][r : r + 1], VOCAB) * batch["labels"][r, 1:].ne(-100).sum()
        for r in range(3)
    ]
    learned = [int(batch["labels"][r, 1:].ne(-100).sum()) for r in range(3)]
    expected = sum(w * n for w, n in zip(weights, nll, strict=True)) / sum(
        w * n for w, n in zip(weights, learned, strict=True)
    )
    torch.testing.assert_close(weighted_causal_lm_loss(logits, batch["labels"], weights, None), expected)
    assert float(weighted_items({"labels": batch["labels"], LOSS_WEIGHT: weights})) == pytest.approx(
        sum(w * n for w, n in zip(weights.tolist(), learned, strict=True))
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_a_row_of_weight_two_trains_the_step_as_that_row_twice(tmp_path, workers):
    """The gradient of a step whose row r weighs 2 is the stock gradient of the step with row r repeated."""
    batches = [_micro_batch(4, 12, seed=6), _micro_batch(3, 12, seed=7)]  # gradient accumulation of 2
    repeated = [{k: torch.cat([v, v[1:2]]) for k, v in batches[0].items()}, batches[1]]
    weighted = [
        {**batches[0], LOSS_WEIGHT: torch.tensor([1.0, 2.0, 1.0, 1.0])},
        {**batches[1], LOSS_WEIGHT: torch.ones(3)},
    ]
    stock_model = tiny_model(VOCAB, 0)
    weighted_model = copy.deepcopy(stock_model)
    stock = _trainer(stock_model, 0, tmp_path)
    theirs = _trainer(weighted_model, workers, tmp_path)
    for trainer, model, step in ((stock, stock_model, repeated), (theirs, weighted_model, weighted)):
        items = trainer._get_num_items_in_batch(step, torch.device("cpu"))
        trainer.current_gradient_accumulation_steps = len(step)
        for batch in step:
            trainer.training_step(model, {k: v.clone() for k, v in batch.items()}, items)
        trainer.shutdown_workers()
    assert float(theirs._get_num_items_in_batch(weighted, torch.device("cpu"))) == float(
        stock._get_num_items_in_batch(repeated, torch.device("cpu"))
    )
    _assert_grads_close(weighted_model, stock_model)


def test_the_collator_carries_the_weights_and_gives_padding_rows_none():
    features = [{"input_ids": [5, 6, 7], LOSS_WEIGHT: 1.0}, {"input_ids": [5], "labels": [5], LOSS_WEIGHT: 3.0}]
    batch = PaddingCollator(0, rows=3)(features)
    assert batch[LOSS_WEIGHT].tolist() == [1.0, 3.0, 0.0] and batch["input_ids"].shape == (3, 3)
    assert LOSS_WEIGHT not in PaddingCollator(0)([{"input_ids": [5, 6]}])


@pytest.mark.parametrize("weight", [0.0, -1.0, float("inf"), float("nan")])
def test_a_weight_that_is_not_a_positive_number_is_refused(weight):
    with pytest.raises(ConfigError, match="--replay_loss_weight must be a number > 0"):
        TechniqueArguments(replay_loss_weight=weight)


def test_a_weighted_replay_trains_the_same_steps_and_examples_to_other_weights(tmp_path, monkeypatch, caplog):
    """Weight 3 trains the steps and replayed examples of weight 1; only the loss differs, and weight 1 is today's."""
    from safetensors.torch import load_file

    import daemon.training.data as data

    seen: list[dict] = []
    collate = data.PaddingCollator.__call__
    monkeypatch.setattr(data.PaddingCollator, "__call__", lambda self, f: seen.append(collate(self, f)) or seen[-1])
    flags = {"bf16": False, "replay_fraction": 0.3}
    rows, weights = {}, {}
    for weight in (1.0, 3.0):
        tree = new_tree(tmp_path / f"w{weight}")
        for n in range(2):
            seen.clear()
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="daemon.training.prepare"):
                rows[weight] = train(
                    tree, text_file(tree.root / f"f{n}.jsonl", 12 * n), replay_loss_weight=weight, **flags
                )
        said = "replayed (each weighing 3 in the loss)" in caplog.text  # the second file's line
        assert said == (weight == 3.0)
        weights[weight] = load_file(tree.output / f"checkpoint-{rows[weight]['end_step']}" / "model.safetensors")
        carried = [float(w) for batch in seen if LOSS_WEIGHT in batch for w in batch[LOSS_WEIGHT]]
        if weight == 1.0:
            assert carried == []  # no column: the stock loss, as before the flag
        else:
            assert sorted(set(carried)) == [1.0, 3.0] and carried.count(3.0) >= rows[weight]["replayed_examples"]
    for key in ("start_step", "end_step", "replayed_examples", "examples"):
        assert rows[1.0][key] == rows[3.0][key], key
    assert rows[3.0]["replayed_examples"] > 0
    assert any(not torch.equal(weights[1.0][k], weights[3.0][k]) for k in weights[1.0])
