"""Rehearsal of the base model's own answers: a replay share that holds what a pretrained model knew.

Replay (:mod:`daemon.store.replay`) keeps the model near its earlier *files*; a pretrained model's general
ability was never in a file, and the inbox holds no data of it. So when a line starts from
``--model_name_or_path`` (no checkpoint yet), the base model answers :data:`CHAT_PROMPTS` (a chat
model: a user turn in its chat template) or continues :data:`TEXT_PROMPTS` (any other model),
greedily, in one batched ``generate`` call, and its answers become the replay store's share at step
0, ``<status_dir>/replay/00000000-base-rehearsal.jsonl``, before the first file's replay is drawn.
From then on every file, the first included, rehearses ``--base_rehearsal_fraction`` of them beside
its replay (:func:`daemon.store.replay.select_rehearsal`); the replay of earlier files never draws
them, so a long stream does not thin them out.

This is self-synthesized rehearsal (Huang et al., ACL 2024, "Mitigating Catastrophic Forgetting in
Large Language Models with Self-Synthesized Rehearsal", arXiv:2403.01244): with the original
training data out of reach, the model's own outputs stand in for it, which is also what Learning
without Forgetting (Li and Hoiem 2016, arXiv:1606.09282) keeps the old model's outputs as. The
examples are the base model's token ids as it generated them: the prompt (its chat template's
user turn up to the assistant's, or the text opening) masked to -100, the answer learned up to and
with its end-of-turn token; an answer cut at :data:`MAX_NEW_TOKENS` is learned as far as it goes.

**Kept apart from the measurement.** The base-model slice of the evaluation suite
(:mod:`daemon.training.base_slice`) is the base model's answers to *other* prompts: the two prompt sets are
disjoint and on other topics (``tests/test_rehearsal.py`` checks it), so the slice still measures
drift on questions the model never rehearsed.

**Lifecycle.** Written once per status folder and kept as it is (a first file resumed after a
crash draws the same replay); as a share at step 0 it survives every rollback (:func:`daemon.store.replay.
drop_after` drops shares above the step returned to), is cut to its fair share of
``--replay_buffer_tokens`` like any share, and is not written with ``--base_rehearsal false``,
``--base_rehearsal_fraction 0`` or ``--replay_buffer_tokens 0``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.store.replay import REPLAY_DIR, Share, within_tokens, write_share
from daemon.store.suite import slice_name
from daemon.training.base_slice import greedy_answers
from daemon.training.encoding import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

REHEARSAL_FILE = "base-rehearsal.jsonl"  # the share is slice_name(0, REHEARSAL_FILE): "00000000-base-rehearsal"
REHEARSAL_LABEL = "(base model rehearsal)"  # the share header's file
MAX_NEW_TOKENS = 64  # tokens of each answer: a short paragraph

# Neutral requests on other topics than daemon.training.base_slice.CHAT_PROMPTS (the evaluation's).
CHAT_PROMPTS = [
    "How many legs does a spider have?",
    "What is the tallest mountain on Earth?",
    "Give me a tip for staying focused while studying.",
    "What is the main ingredient in bread?",
    "What is the past tense of 'run'?",
    "Who painted the Mona Lisa?",
    "How many minutes are in an hour?",
    "What is the difference between weather and climate?",
    "Name a fruit that is yellow.",
    "What does a doctor do?",
    "Write one sentence about autumn.",
    "What is 7 plus 8?",
    "Why is sleep important?",
    "How do bees make honey?",
    "What is the plural of 'mouse'?",
    "What is a healthy breakfast?",
    "What is sushi?",
    "How many sides does a triangle have?",
    "What is gravity?",
    "Give me an example of a mammal.",
    "What is the moon made of?",
    "Recommend a book for a child.",
    "What is the purpose of a seatbelt?",
    "How do you make a cup of tea?",
    "What is a volcano?",
    "Who was Albert Einstein?",
    "What is an umbrella used for?",
    "What is a library?",
    "Write a short note inviting a friend to lunch.",
    "What is the fastest land animal?",
    "Why do leaves change colour in autumn?",
    "What does an elephant use its trunk for?",
    "Describe a rainy day in two sentences.",
    "What is 100 divided by 4?",
    "What does a compass show?",
    "What is a dictionary for?",
    "How can I save energy at home?",
    "Who invented the telephone?",
    "What is the Great Wall of China?",
    "What does DNA stand for?",
    "Name two musical instruments.",
    "What are clouds made of?",
    "Give me a word that rhymes with 'dog'.",
    "What is the main job of the heart?",
    "How do fish live underwater?",
    "Write a one-line motto for a bakery.",
    "What is a rectangle?",
    "How do I politely decline an invitation?",
]
# Text openings on other topics than daemon.training.base_slice.TEXT_PROMPTS.
TEXT_PROMPTS = [
    "A spider has",
    "Mount Everest is",
    "Bread is made from",
    "The Mona Lisa was painted by",
    "An hour has",
    "Weather is different from climate because",
    "Bananas are",
    "A doctor is a person who",
    "In autumn, the leaves",
    "Nine plus six equals",
    "Sleep is important because",
    "Bees make honey by",
    "The plural of mouse is",
    "A healthy breakfast includes",
    "Sushi is a dish",
    "A triangle has",
    "Gravity is the force that",
    "Whales are animals that",
    "The moon is",
    "A seatbelt protects",
    "To make a cup of tea,",
    "A volcano is",
    "Albert Einstein was",
    "An umbrella is used",
    "A library is a place where",
    "The cheetah is",
    "A compass shows",
    "A dictionary is",
    "To save energy at home,",
    "The telephone was invented by",
    "The Great Wall of China",
    "DNA stands for",
    "The piano is a musical instrument",
    "Clouds are made of",
    "The heart pumps",
    "Fish swim by",
    "Rain falls when",
    "The English alphabet has",
    "A bicycle has",
    "Ice cream is made from",
    "The Nile is",
    "Earthquakes happen when",
    "A carpenter works with",
    "Chess is a game in which",
    "The human skeleton",
    "Honeybees live in",
    "A calendar shows",
    "Mathematics is the study of",
]


def rehearsal_path(status_dir: str | Path) -> Path:
    """Where the rehearsal share lives: ``replay/00000000-base-rehearsal.jsonl``."""
    return Path(status_dir) / REPLAY_DIR / f"{slice_name(0, REHEARSAL_FILE)}.jsonl"


def rehearsal_examples(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int, autocast: Any = None
) -> list[dict[str, list[int]]]:
    """The base model's greedy answers to the rehearsal prompts, as replay examples (module docstring).

    Args:
        model, tokenizer: the pretrained model as loaded, before any step.
        max_length: tokens per training sequence (``--max_seq_length``); longer examples are cut.
        autocast: the training precision's autocast dtype (None: fp32); bf16 on a CPU generates on a
            bf16 copy (:func:`daemon.training.base_slice.greedy_answers`).

    Returns:
        ``{"input_ids", "labels"}`` per prompt with an answer, in prompt order: the prompt's labels
        -100, the answer's its ids (up to and with the first end-of-sequence token).
    """
    _, _, fed, generated = greedy_answers(model, tokenizer, CHAT_PROMPTS, TEXT_PROMPTS, MAX_NEW_TOKENS, autocast)
    eos = tokenizer.eos_token_id
    examples = []
    for prompt, row in zip(fed, generated, strict=True):
        answer = row[: row.index(eos) + 1] if eos in row else row  # what follows the end is padding
        if not str(tokenizer.decode(answer, skip_special_tokens=True)).strip():
            continue
        ids = (prompt + answer)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_length]
        if any(label != IGNORE_INDEX for label in labels):
            examples.append({"input_ids": ids, "labels": labels})
    return examples


def rehearsal_due(status_dir: str | Path, budget_tokens: int) -> bool:
    """True while :func:`keep_rehearsal` would write the share: none is kept and ``--replay_buffer_tokens`` > 0."""
    return budget_tokens > 0 and not rehearsal_path(status_dir).is_file()


def keep_rehearsal(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    status_dir: str | Path,
    max_length: int,
    budget_tokens: int,
    fingerprint: str,
    autocast: Any = None,
) -> Share | None:
    """Write the rehearsal share once per status folder (a kept one is left as it is).

    Args:
        model, tokenizer: the pretrained model as loaded, before any step.
        status_dir: the status folder.
        max_length: ``--max_seq_length``.
        budget_tokens: ``--replay_buffer_tokens`` (the share is cut to it; 0 writes nothing).
        fingerprint: the tokenizer's (:func:`daemon.training.data.tokenizer_fingerprint`), as every share's header.
        autocast: the training precision's autocast dtype (None: fp32), for :func:`rehearsal_examples`.

    Returns:
        The share written, or None when one was kept already or nothing was written.
    """
    if not rehearsal_due(status_dir, budget_tokens):
        return None
    path, started = rehearsal_path(status_dir), time.monotonic()
    examples = within_tokens(rehearsal_examples(model, tokenizer, max_length, autocast), budget_tokens)
    if not examples:
        logger.warning("the base model answered none of the rehearsal prompts; nothing to rehearse")
        return None
    header: dict[str, Any] = {"file": REHEARSAL_LABEL, "sha256": "", "end_step": 0, "tokenizer": fingerprint}
    share = Share(0, path, header, examples)
    write_share(share)
    logger.info(
        "kept the base model's own answers to %d neutral prompts (%d tokens, %.1f s) as the replay share %s: "
        "every file rehearses them beside its replay (self-synthesized rehearsal)",
        len(examples),
        share.tokens,
        time.monotonic() - started,
        path.name,
    )
    return share
