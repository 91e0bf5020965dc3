"""What the cooldown branch trains on (``--cooldown_mix``, docs/data.md "Replay and cooldown exports").

``file`` (default): a seeded sample of the file's training examples, its own and the replayed
ones, in the proportion replay mixed them (``--replay_fraction``). ``balanced``: the branch's
``n`` examples (``cooldown_steps x effective_batch``) split evenly over the shares of the replay
store done up to the file's start (the base model's rehearsal share at step 0 included, when there
is one) and the file's own examples as one more share::

    n_j = n / (shares + 1)     (whole numbers by largest remainder, :func:`daemon.store.replay_mix.split_count`)

each share's taken in a seeded order (used again in a fresh order when smaller than its part).
The last 10-20 % of training sets what a model keeps (Blakeney et al. 2024, "Does your data spark
joy? Performance gains from domain upsampling at the end of training", arXiv:2406.03476): a branch
that decays on a mix of every file so far exports a model tuned to all of them rather than to the
newest. The branch's step count is unchanged (``--cooldown_fraction`` of the file's steps).
With an empty store (the line's first file, or replay off) the branch trains on the file's own
examples, and says so in the log.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from daemon.store.replay import draw, store_shares
from daemon.store.replay_mix import split_count
from daemon.training.data import replay_examples, tokenizer_fingerprint

if TYPE_CHECKING:
    import datasets

    from daemon.training.arguments import Flags
    from daemon.training.prepared import PreparedFile

logger = logging.getLogger(__name__)


def cooldown_examples(prepared: PreparedFile, flags: Flags, count: int) -> datasets.Dataset:
    """The branch's ``count`` training examples (columns ``input_ids``, ``labels``, ``length``), in training order.

    ``--cooldown_mix file``: the first ``count`` of the file's training examples shuffled with
    ``--seed + 1`` (fewer when the file has fewer). ``balanced``: module docstring; what it drew
    from each share is kept in ``prepared.recorded["cooldown_mix"]`` for the status's ``evaluation``.
    """
    seed = flags.training.seed
    train = prepared.datasets.train
    if flags.techniques.cooldown_mix == "file":
        return _first_shuffled(train, count, seed + 1)
    plan, own = prepared.plan, prepared.datasets.own
    fingerprint = tokenizer_fingerprint(prepared.tokenizer)
    shares = store_shares(flags.status.status_dir, plan.start_step, fingerprint, with_rehearsal=True)
    if not shares:
        logger.info("cooldown mix: the replay store is empty; the branch trains on the file's own examples")
        prepared.recorded["cooldown_mix"] = {"own": min(own.num_rows, count)}
        return _first_shuffled(own, count, seed + 1)
    counts = split_count(count, [1.0] * (len(shares) + 1))
    base = f"{seed}:{prepared.scan.sha256}:{plan.start_step}:cooldown"
    examples: list[dict[str, Any]] = []
    for share, n in zip(shares, counts[:-1], strict=True):  # the last part is the file's own
        examples += draw(share.examples, n, f"{base}:{share.step}")
    examples += replay_examples(own, draw(range(own.num_rows), counts[-1], f"{base}:own"))
    drawn = {share.path.stem: n for share, n in zip(shares, counts[:-1], strict=True)} | {"own": counts[-1]}
    prepared.recorded["cooldown_mix"] = drawn
    logger.info("cooldown mix balanced over %d shares and the file: %s", len(shares), drawn)
    return _as_dataset(examples, own).shuffle(seed=seed + 1, keep_in_memory=True)


def _first_shuffled(rows: datasets.Dataset, count: int, seed: int) -> datasets.Dataset:
    """The first ``count`` of ``rows`` shuffled with ``seed`` (all of them when fewer)."""
    rows = rows.shuffle(seed=seed, keep_in_memory=True)
    return rows.select(range(min(rows.num_rows, count)))


def _as_dataset(examples: list[dict[str, Any]], like: datasets.Dataset) -> datasets.Dataset:
    """Examples ``{"input_ids", "labels"?}`` as a dataset with ``like``'s columns (a missing ``labels``: null)."""
    import datasets as ds

    rows = {
        "input_ids": [e["input_ids"] for e in examples],
        "labels": [e.get("labels") for e in examples],
        "length": [len(e["input_ids"]) for e in examples],
    }
    return ds.Dataset.from_dict(rows, features=like.features)
