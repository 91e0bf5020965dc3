"""The replay store: a bounded, seeded sample of every earlier file's training examples (docs/data.md "Replay and ...").

**What is kept.** When a file is done, a sample of its *training* examples (after packing and
after the held-out split, so never a held-out example) is written to
``<status_dir>/replay/<end_step:08d>-<file stem>.jsonl``, the name of its evaluation slice
and snapshot. The first line is a header (``file``, ``sha256``, ``end_step``, ``tokenizer``,
``tokens``, ``examples``); every other line is one example, ``{"input_ids": [...]}`` plus
``"labels"`` where they differ from the ids (prompt-completion and chat files). Token ids,
not text: re-tokenizing the store for every file would cost more than the file's own
tokenization, and the product's tokenizer is fixed once the model is bootstrapped. A share
written with another tokenizer (its ``tokenizer`` fingerprint differs) is left out of replay
with a warning. About 5 bytes a token on disk.

**The policy: fair share, seeded prefix.** With ``n`` files in the store and a budget of
``B = --replay_buffer_tokens`` tokens, each file's share is ``floor(B / n)`` tokens. A file's
sample is a prefix of a seeded random permutation of its training examples (seed: ``--seed``
and the file's sha256), cut where the next example would overflow the share; when a new file
arrives, every earlier share is cut to the new ``floor(B / n)`` by dropping examples from its
end. A prefix of a random permutation is itself a uniform random sample, so every share stays
a uniform sample of its file (the "reservoir" of Vitter 1985 reduced to the fixed-order case),
and the store never holds more than ``B`` tokens. The equal split over files follows the
per-task replay memories of continual-learning practice (e.g. Chaudhry et al. 2019, "On Tiny
Episodic Memories in Continual Learning", arXiv:1902.10486, class/task-balanced reservoir), so
an early file is not crowded out by later ones.

**What a file replays** (:func:`select_replay`): ``replay_count(examples, F) = round(examples
x F / (1 - F))`` examples, so that ``F`` of the examples trained for the file are replayed,
drawn from the shares of the files done up to the file's ``start_step`` (never from a file that
ended later, so a file resumed after a crash sees the same pool). The pool is shuffled with a
seed made of ``--seed``, the file's sha256 and its ``start_step`` (its ledger plan) and taken
in that order; a pool smaller than the count is used again in a fresh seeded order, as many
passes as needed. Same store, same plan: the same examples in the same order. The share at step 0,
the base model's own answers (:mod:`daemon.training.rehearsal`), is not in that pool: a file
rehearses it at its own fraction (:func:`select_rehearsal`).

**Lifecycle.** A file's share is added only once it is done (:func:`add_file`, called by the
run's ``save``, which first drops any share above the file's start). A failed file, a file the
quality gate rolls back and a ``python -m daemon rollback`` drop the shares of every file that
ended above the step the model returns to (:func:`drop_after`); the shares of earlier files
stay as they were cut, so after a rollback the store may hold less than ``B``.

Standard library only: the rollback command uses it without torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from daemon.names import printable
from daemon.store.files import atomic_write_text
from daemon.store.suite import delete_after, slice_name, step_files

logger = logging.getLogger(__name__)

T = TypeVar("T")

REPLAY_DIR = "replay"
# The base model's own answers (daemon.training.rehearsal) are the share at step 0, where no file ends.
REHEARSAL_STEP = 0
_SHARE_RE = re.compile(r"^(\d+)-.*\.jsonl$")


@dataclass
class Share:
    """One done file's share of the store.

    Attributes:
        step: the file's ``end_step`` (the share's key).
        path: its JSONL file.
        header: the first line (``file``, ``sha256``, ``end_step``, ``tokenizer``, ``tokens``, ``examples``).
        examples: ``{"input_ids": [...], "labels"?: [...]}`` in the share's seeded order.
    """

    step: int
    path: Path
    header: dict[str, Any]
    examples: list[dict[str, list[int]]]

    @property
    def tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)


def replay_count(examples: int, fraction: float) -> int:
    """Replayed examples for a file of ``examples`` new ones: ``round(examples * F / (1 - F))``.

    Then ``replayed / (examples + replayed)`` is ``F`` up to rounding. ``F = 0`` gives 0.
    """
    if fraction <= 0 or examples <= 0:
        return 0
    return round(examples * fraction / (1.0 - fraction))


def fair_share(budget_tokens: int, files: int) -> int:
    """Tokens each of ``files`` shares may hold: ``floor(budget_tokens / files)`` (the budget if none)."""
    return budget_tokens // max(1, files)


def store_files(status_dir: str | Path) -> list[tuple[int, Path]]:
    """``(end step, path)`` of every share on disk, oldest first."""
    return step_files(Path(status_dir) / REPLAY_DIR, _SHARE_RE)


def read_share(step: int, path: Path) -> Share:
    """Read one share (header and examples).

    Raises:
        OSError, ValueError: the file is unreadable or not a share (it is written atomically,
            so only by hand).
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0]) if lines else {}
    return Share(step, path, header, [json.loads(line) for line in lines[1:] if line])


def write_share(share: Share) -> None:
    """Write a share atomically, its header's ``tokens`` and ``examples`` updated."""
    share.header.update(tokens=share.tokens, examples=len(share.examples))
    lines = [json.dumps(share.header, ensure_ascii=False)] + [
        json.dumps(e, separators=(",", ":")) for e in share.examples
    ]
    atomic_write_text(share.path, "\n".join(lines) + "\n")


def seeded_prefix(lengths: Sequence[int], share_tokens: int, seed: str) -> list[int]:
    """Indices of a uniform sample of examples within ``share_tokens``: a prefix of a seeded permutation.

    Args:
        lengths: tokens of each example (``length`` column).
        share_tokens: the share's bound.
        seed: any string; the permutation is ``random.Random(seed).shuffle`` of ``range(len(lengths))``.

    Returns:
        Indices in permutation order, stopping before the first example that would overflow.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for i in order:
        if total + lengths[i] > share_tokens:
            break
        chosen.append(i)
        total += lengths[i]
    return chosen


def within_tokens(examples: list[dict[str, list[int]]], share_tokens: int) -> list[dict[str, list[int]]]:
    """The longest prefix of ``examples`` within ``share_tokens`` tokens."""
    total = 0
    for n, example in enumerate(examples):
        total += len(example["input_ids"])
        if total > share_tokens:
            return examples[:n]
    return examples


def add_file(
    status_dir: str | Path,
    end_step: int,
    file_name: str,
    sha256: str,
    tokenizer: str,
    lengths: Sequence[int],
    fetch: Callable[[list[int]], list[dict[str, list[int]]]],
    budget_tokens: int,
    seed: int,
) -> Share | None:
    """Add a done file's share and cut every earlier share to the new fair share; idempotent.

    Args:
        status_dir: the status folder.
        end_step: the file's ``end_step`` (its key; shares above it must have been dropped).
        file_name, sha256: the file.
        tokenizer: the tokenizer's fingerprint (:func:`daemon.training.data.tokenizer_fingerprint`).
        lengths: tokens of each of the file's training examples (new examples only, held-out excluded).
        fetch: indices -> examples ``{"input_ids", "labels"?}`` in that order (reads only the sample).
        budget_tokens: ``--replay_buffer_tokens``; 0 keeps nothing (and empties the store).
        seed: ``--seed``.

    Returns:
        The file's share, or None when the budget is 0.
    """
    earlier = [s for s in store_files(status_dir) if s[0] < end_step]
    if budget_tokens <= 0:
        for _, path in store_files(status_dir):
            path.unlink(missing_ok=True)
        return None
    share_tokens = fair_share(budget_tokens, len(earlier) + 1)
    for step, path in earlier:
        share = read_share(step, path)
        kept = within_tokens(share.examples, share_tokens)
        if len(kept) < len(share.examples):
            share.examples = kept
            write_share(share)
    chosen = seeded_prefix(lengths, share_tokens, f"{seed}:{sha256}")
    path = Path(status_dir) / REPLAY_DIR / f"{slice_name(end_step, file_name)}.jsonl"
    header = {"file": printable(file_name), "sha256": sha256, "end_step": end_step, "tokenizer": tokenizer}
    share = Share(end_step, path, header, fetch(chosen))
    write_share(share)
    rehearsal = any(step == REHEARSAL_STEP for step, _ in earlier)  # the base model's answers: a share, not a file
    logger.info(
        "replay store: %s keeps %d examples (%d tokens, share %d of %d tokens over %d files%s)",
        printable(file_name),
        len(share.examples),
        share.tokens,
        share_tokens,
        budget_tokens,
        len(earlier) + 1 - rehearsal,
        " and the base model's answers" if rehearsal else "",
    )
    return share


def drop_after(status_dir: str | Path, step: int) -> list[str]:
    """Delete the shares of files that ended after ``step`` (failed, rolled back); their names."""
    return delete_after(store_files(status_dir), step)


def store_shares(status_dir: str | Path, up_to_step: int, tokenizer: str, with_rehearsal: bool = False) -> list[Share]:
    """The shares of files done up to ``up_to_step`` written with ``tokenizer``, oldest first.

    A share of another tokenizer is left out with a warning; empty shares are left out, and so is the
    base model's rehearsal share (step :data:`REHEARSAL_STEP`) unless ``with_rehearsal``: replay does
    not draw it, a file rehearses it at a fraction of its own (:func:`select_rehearsal`).
    """
    lowest = REHEARSAL_STEP if with_rehearsal else REHEARSAL_STEP + 1
    shares = []
    for step, path in store_files(status_dir):
        if not lowest <= step <= up_to_step:
            continue
        share = read_share(step, path)
        if share.header.get("tokenizer") != tokenizer:
            logger.warning("replay: %s was stored with another tokenizer; not replayed", path.name)
            continue
        if share.examples:
            shares.append(share)
    return shares


def draw(items: Sequence[T], count: int, seed: str) -> list[T]:
    """``count`` items in a seeded order: a seeded permutation, again in a fresh order while more are needed."""
    if not items or count <= 0:
        return []
    rng = random.Random(seed)
    out: list[T] = []
    while len(out) < count:
        order = list(range(len(items)))
        rng.shuffle(order)
        out.extend(items[i] for i in order[: count - len(out)])
    return out


def select_replay(
    status_dir: str | Path, up_to_step: int, count: int, seed: str, tokenizer: str
) -> list[dict[str, list[int]]]:
    """The ``count`` examples a file replays, in training order (module docstring).

    Args:
        status_dir: the status folder.
        up_to_step: the file's ``start_step``: only shares of files that ended there or before.
        count: :func:`replay_count` of the file.
        seed: ``f"{--seed}:{sha256}:{start_step}"``: what the ledger's plan fixes.
        tokenizer: the running tokenizer's fingerprint; shares of another are left out.

    Returns:
        Up to ``count`` examples (fewer only when the store is empty: then none).
    """
    if count <= 0:
        return []
    pool = [example for share in store_shares(status_dir, up_to_step, tokenizer) for example in share.examples]
    out = draw(pool, count, seed)
    if pool and count > len(pool):
        logger.info("replay: %d examples drawn from a store of %d (%.1f passes)", count, len(pool), count / len(pool))
    return out


def select_rehearsal(status_dir: str | Path, count: int, seed: str, tokenizer: str) -> list[dict[str, list[int]]]:
    """The ``count`` base-model answers a file rehearses (:mod:`daemon.training.rehearsal`), in a seeded order.

    Args:
        status_dir: the status folder.
        count: :func:`replay_count` of the file's examples at ``--base_rehearsal_fraction``.
        seed: fixed by the ledger's plan, as :func:`select_replay`'s.
        tokenizer: the running tokenizer's fingerprint; a share of another is left out.

    Returns:
        ``count`` examples of the rehearsal share (again in a fresh order while more are needed), or none
        when there is no such share.
    """
    if count <= 0:
        return []
    shares = store_shares(status_dir, REHEARSAL_STEP, tokenizer, with_rehearsal=True)  # the step-0 share alone
    pool = [example for share in shares for example in share.examples]
    return draw(pool, count, seed)


def tokenizer_digest(rules: str) -> str:
    """A short fingerprint of a tokenizer's serialized rules (sha256, 16 hex digits)."""
    return hashlib.sha256(rules.encode("utf-8")).hexdigest()[:16]
