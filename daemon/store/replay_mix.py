"""Per-file draws from the replay store: forgetting-weighted replay and the cooldown's balanced mix (docs/data.md).

:func:`daemon.store.replay.select_replay` draws a file's replay from the pool of every share, so
each earlier file is replayed in proportion to its share's size. The two options here draw a
fixed number of examples *per share* instead:

- ``--replay_weighting forgetting`` (:func:`select_weighted_replay`): the ``count`` replayed
  examples are split over the shares in proportion to :func:`forgetting_weights`, each file's
  current forgetting read from ``evaluations.jsonl``, so the files the model is losing are
  rehearsed most. This is the idea of maximally interfered retrieval (Aljundi et al. 2019,
  "Online Continual Learning with Maximally Interfered Retrieval", arXiv:1908.04742), which
  replays the memories whose loss the coming update raises most; here the measured rise so far
  stands in for the predicted one, per file rather than per example, at no extra forward pass.
- ``--cooldown_mix balanced`` (:mod:`daemon.training.cooldown_mix`): the cooldown branch's
  examples split evenly over the shares and the file's own examples (:func:`split_count` with
  equal weights, :func:`~daemon.store.replay.draw`).

Both are deterministic: a share's examples are taken in a seeded order (:func:`~daemon.store.replay.draw`), seeded by
``--seed``, the file's sha256, its ``start_step`` and the share's step; the weights read only
evaluation rows at or below the file's ``start_step`` (the rows of the model the file starts
from and earlier ones), which a crash inside the file cannot change. A file resumed after a
crash therefore replays the same examples, and ``replayed_examples`` (what the ledger's plan
checks) is the same ``count`` as with even replay.

Standard library only, like :mod:`daemon.store.replay`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from daemon.quality.forgetting import matched_losses
from daemon.store.replay import draw, store_shares
from daemon.store.suite import HELD_OUT

logger = logging.getLogger(__name__)

MIN_FORGETTING = 1e-3  # nats: the weight of a file that forgot nothing while no file forgot anything
FLOOR_SHARE = 0.1  # a file's weight is at least this share of the largest forgetting: none is left out


def split_count(count: int, weights: Sequence[float]) -> list[int]:
    """``count`` split over ``weights`` in proportion, as whole numbers summing to ``count`` (largest remainder).

    Ties in the remainder go to the earlier entry, so the split is deterministic.

    Raises:
        ValueError: no weight, or a weight that is negative or not finite, or all zero.
    """
    total = sum(weights)
    if not weights or any(not w >= 0 or w == float("inf") for w in weights) or total <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0: {list(weights)}")
    exact = [count * w / total for w in weights]
    out = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in by_remainder[: count - sum(out)]:
        out[i] += 1
    return out


def share_forgetting(rows: list[dict[str, Any]], step: int, up_to_step: int) -> float | None:
    """The current forgetting of the file that ended at ``step``: its held-out slice's latest loss minus its first.

    The slice is the held-out slice named ``<step:08d>-...`` (the file's own), its first row the
    model right after the file, its latest
    row the newest at or below ``up_to_step``; both over the same examples
    (:func:`~daemon.quality.forgetting.matched_losses`). In nats; negative when the model improved on it.

    Returns:
        None when the file has no slice or no two comparable rows.
    """
    prefix = f"{step:08d}-"
    mine = [r for r in rows if r["step"] <= up_to_step and r["kind"] == HELD_OUT and r["slice"].startswith(prefix)]
    if not mine:
        return None
    mine.sort(key=lambda r: r["step"])
    losses = matched_losses(mine[0], mine[-1])
    return None if losses is None else losses[1] - losses[0]


def forgetting_weights(rows: list[dict[str, Any]], steps: Sequence[int], up_to_step: int) -> list[float]:
    """The replay weight of each share (by its file's end ``step``): its current forgetting, floored.

    ``w_j = max(f_j, FLOOR_SHARE x max_k f_k, MIN_FORGETTING)`` with ``f_j`` from :func:`share_forgetting`,
    so no file gets nothing (a file that forgot nothing keeps a tenth of the most-forgotten one's
    weight). A file with no slice or no rows gets the mean of the others' weights (1 when no file has one).
    """
    found = [share_forgetting(rows, step, up_to_step) for step in steps]
    known = [f for f in found if f is not None and f == f]  # NaN (a broken model) counts as unknown
    floor = max([MIN_FORGETTING] + [FLOOR_SHARE * f for f in known])
    weights: list[float | None] = [None if f is None or f != f else max(f, floor) for f in found]
    present = [w for w in weights if w is not None]
    mean = sum(present) / len(present) if present else 1.0
    return [mean if w is None else w for w in weights]


def select_weighted_replay(
    status_dir: Any, up_to_step: int, count: int, seed: str, tokenizer: str, rows: list[dict[str, Any]]
) -> tuple[list[dict[str, list[int]]], list[dict[str, Any]]]:
    """The ``count`` examples a file replays under ``--replay_weighting forgetting`` (module docstring).

    Args:
        status_dir: the status folder.
        up_to_step: the file's ``start_step``: shares of files done up to it, evaluation rows up to it.
        count: :func:`~daemon.store.replay.replay_count` of the file (as with even replay).
        seed: ``f"{--seed}:{sha256}:{start_step}"``, as for even replay.
        tokenizer: the running tokenizer's fingerprint.
        rows: ``evaluations.jsonl`` rows (:func:`~daemon.quality.forgetting.read_rows`).

    Returns:
        ``(examples in a seeded order, one {"share", "forgetting", "weight", "examples"} per share)``;
        ``([], [])`` when the store is empty.
    """
    shares = store_shares(status_dir, up_to_step, tokenizer)
    if count <= 0 or not shares:
        return [], []
    steps = [share.step for share in shares]
    weights = forgetting_weights(rows, steps, up_to_step)
    counts = split_count(count, weights)
    chosen: list[dict[str, list[int]]] = []
    record = []
    for share, weight, n in zip(shares, weights, counts, strict=True):
        chosen += draw(share.examples, n, f"{seed}:{share.step}")
        f = share_forgetting(rows, share.step, up_to_step)
        record.append({"share": share.path.stem, "forgetting": f, "weight": round(weight, 6), "examples": n})
    chosen = draw(chosen, len(chosen), f"{seed}:order")
    logger.info(
        "replay weighted by forgetting: %s",
        ", ".join(f"{r['share']} {r['examples']} (weight {r['weight']:.4g})" for r in record),
    )
    return chosen, record
