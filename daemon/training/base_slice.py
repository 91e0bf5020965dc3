"""The base model's own slice of the evaluation suite: what a pretrained model knew before any file.

Forgetting of general ability is what hurts a user of a pretrained model, and the inbox holds
no data of it. When a run starts from ``--model_name_or_path`` (no checkpoint yet), the base
model answers :data:`CHAT_PROMPTS` (a chat model: a user turn in its chat template) or
continues :data:`TEXT_PROMPTS` (any other model), greedily, in one batched ``generate`` call;
the answers become ``<status_dir>/eval_suite/00000000-base-model.jsonl``, a held-out slice
"done" at step 0 (chat records, or prompt-completion records: only the answer is scored), and
the base model's score on it is written as the step-0 row of ``evaluations.jsonl``.

From then on the slice is in every file's suite, the forgetting matrix and the quality gate
read its rise as drift from the base model, and no rollback removes it (rollbacks drop what
ended after the step they return to, and this slice ended at 0). The slice measures how far
the model moved from the base model's own outputs (the targets that Learning without Forgetting,
Li and Hoiem 2016, arXiv 1606.09282, keeps the old model's outputs as), not whether the answers
are right.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.store.suite import BASE_FILE, SUITE_DIR, slice_name, write_slice

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BASE_ROW_FILE = "(base model)"  # evaluations.jsonl's after_file of the step-0 row
MAX_NEW_TOKENS = 32  # tokens of each answer: a sentence

CHAT_PROMPTS = [
    "What is the capital of France?",
    "How many days are there in a leap year?",
    "What do plants need to grow?",
    "Explain what a noun is in one sentence.",
    "What is the boiling point of water at sea level?",
    "Name three primary colours.",
    "Why is the sky blue?",
    "What is 12 times 12?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in our solar system?",
    "Give me a synonym for 'happy'.",
    "What does a thermometer measure?",
    "How do you say 'thank you' in Spanish?",
    "What is photosynthesis?",
    "Write a short greeting for a birthday card.",
    "What is the opposite of 'ancient'?",
    "What language is spoken in Brazil?",
    "How many continents are there?",
    "What is the chemical symbol for gold?",
    "Suggest a name for a pet cat.",
    "What is the freezing point of water in Fahrenheit?",
    "What is a haiku?",
    "Which ocean is the largest?",
    "What gas do humans breathe out?",
]
TEXT_PROMPTS = [
    "The capital of France is",
    "A leap year has",
    "Plants need sunlight and water because",
    "The boiling point of water at sea level is",
    "The sky is blue because",
    "Romeo and Juliet was written by",
    "The largest planet in our solar system is",
    "A thermometer is used to",
    "Photosynthesis is the process by which",
    "The water cycle describes how",
    "There are seven continents:",
    "The chemical symbol for gold is",
    "The Pacific Ocean is",
    "Humans breathe in oxygen and breathe out",
    "A haiku is a short poem that",
    "Bats are the only mammals that",
    "A hexagon is a shape with",
    "Democracy is a system of government in which",
    "The speed of light is about",
    "In Brazil, most people speak",
    "Guacamole is made from",
    "An adjective is a word that",
    "The square root of 81 is",
    "Water freezes at",
]


def base_slice_path(status_dir: str | Path) -> Path:
    """Where the base model's slice lives: ``eval_suite/00000000-base-model.jsonl``."""
    return Path(status_dir) / SUITE_DIR / f"{slice_name(0, BASE_FILE)}.jsonl"


def greedy_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    chat_prompts: list[str],
    text_prompts: list[str],
    max_new_tokens: int,
    autocast: Any = None,
) -> tuple[bool, list[str], list[list[int]], list[list[int]]]:
    """The model's greedy continuation of each neutral prompt, in one left-padded batch with the KV cache.

    A chat model (:func:`~daemon.training.snapshots.is_chat_model`) answers ``chat_prompts`` as user
    turns of its template; another continues ``text_prompts``. With ``autocast`` ``torch.bfloat16``
    (the training precision) on a CPU the answers come from a bf16 copy of the model
    (:func:`bf16_copy`): generation there reads every weight at each new token, which autocast also
    casts again each time, so the copy generates faster than either (BENCHMARKS.md, "real-model
    speed"); the model itself is not touched.

    Returns:
        ``(chat, prompts, prompt ids, generated ids)``: per prompt, in order, the tokens fed and the
        at most ``max_new_tokens`` generated after them (padding after an end-of-sequence included).
    """
    import torch
    from transformers import GenerationConfig

    from daemon.training.data import pad_token_id
    from daemon.training.snapshots import chat_prompt_ids, contiguous_head, is_chat_model, left_padded

    chat = is_chat_model(tokenizer)
    prompts = chat_prompts if chat else text_prompts
    fed = [
        chat_prompt_ids(tokenizer, p) if chat else tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts
    ]
    pad = pad_token_id(tokenizer)
    input_ids, mask = left_padded(fed, pad, model.device)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id
    )
    if autocast == torch.bfloat16 and model.device.type == "cpu":
        model = bf16_copy(model)
    model.eval()
    with torch.inference_mode(), contiguous_head(model):
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)  # type: ignore[operator]
    return chat, prompts, fed, out[:, input_ids.shape[1] :].tolist()


def bf16_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A copy of ``model`` for inference whose floating-point parameters are bf16 (its buffers as they are).

    Each parameter is cast on its own, so the copy costs half the fp32 model's bytes at its peak
    (``deepcopy`` then ``.to`` would hold a whole fp32 copy first); tied weights stay tied. Buffers
    keep their dtype as ``from_pretrained(dtype=torch.bfloat16)`` keeps them: a Llama's rotary
    ``inv_freq`` stays fp32 (cast to bf16, positions lose precision and SmolLM2's greedy answers
    changed). The copy needs no gradient and is freed with its last reference.
    """
    import copy

    import torch

    memo: dict[int, Any] = {
        id(p): torch.nn.Parameter(p.detach().to(torch.bfloat16) if p.is_floating_point() else p.detach().clone(),
                                  requires_grad=False)
        for p in model.parameters()
    }  # fmt: skip
    return copy.deepcopy(model, memo)


def base_records(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, autocast: Any = None
) -> list[dict[str, Any]]:
    """The base model's greedy answers to the neutral prompts, as suite records (module docstring).

    ``autocast``: the training precision's autocast dtype (None: fp32), as :func:`greedy_answers` takes it.

    Returns:
        ``{"messages": [user, assistant]}`` records for a chat model, else ``{"prompt", "completion"}``
        records; one per prompt, in prompt order, answers of at most :data:`MAX_NEW_TOKENS` tokens.
    """
    chat, prompts, _, generated = greedy_answers(model, tokenizer, CHAT_PROMPTS, TEXT_PROMPTS, MAX_NEW_TOKENS, autocast)
    answers = [str(tokenizer.decode(row, skip_special_tokens=True)) for row in generated]
    if chat:
        return [
            {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a.strip()}]}
            for p, a in zip(prompts, answers, strict=True)
            if a.strip()
        ]
    return [{"prompt": p, "completion": a} for p, a in zip(prompts, answers, strict=True) if a.strip()]


def base_slice_kept(status_dir: str | Path) -> bool:
    """True when the status folder holds the base model's slice and its step-0 row (a slice alone is scored again)."""
    from daemon.quality.forgetting import read_rows

    name = slice_name(0, BASE_FILE)
    rows = read_rows(status_dir) if base_slice_path(status_dir).is_file() else []
    return any(row["step"] == 0 and row["slice"] == name for row in rows)


def keep_base_slice(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, status_dir: str | Path, max_length: int, autocast: Any
) -> None:
    """Write the base model's slice and its step-0 row, once per status folder (kept slices are left as they are).

    Args:
        model, tokenizer: the pretrained model as loaded, before any step.
        status_dir: the status folder.
        max_length: tokens per scored window (``--max_seq_length``).
        autocast: the training precision's autocast dtype (None: fp32), as the suite scores.
    """
    from daemon.quality.forgetting import write_rows
    from daemon.store.suite import HELD_OUT, load_slice
    from daemon.training.evaluation import Scorer, SliceScore

    if base_slice_kept(status_dir):
        return
    path, name = base_slice_path(status_dir), slice_name(0, BASE_FILE)
    started = time.monotonic()
    records = base_records(model, tokenizer, autocast)
    if not records:
        logger.warning("the base model answered none of the neutral prompts; no base-model slice")
        return
    write_slice(status_dir, name, records)
    piece = load_slice(path, HELD_OUT)  # as every later file reads it: in the suite's subset order
    score = SliceScore(piece.name, piece.kind)
    Scorer(model, tokenizer, max_length, 8, autocast).score(piece, 0, len(piece.records), score)
    write_rows(status_dir, 0, [score.as_row(0, BASE_ROW_FILE, "")])
    logger.info(
        "kept the base model's own answers to %d neutral prompts as slice %s (loss %.4f nats, %.1f s): "
        "the suite measures drift from what the base model knew",
        len(records),
        name,
        score.prefix_loss(score.examples) or float("nan"),
        time.monotonic() - started,
    )
