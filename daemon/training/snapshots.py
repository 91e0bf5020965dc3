"""Evolution snapshots: how the model writes after each file (docs/guarantees.md "Folders and files").

``<status_dir>/evolution/<global_step:08d>-<file stem>/`` (a long stem cut, with a
hash: :func:`~daemon.names.fit_name`) holds ``snapshot.json``
(step, file, held-out eval loss and perplexity, the sampling settings and seed
rule, the samples with their seeds, the evaluation suite's rows, forgetting and quality gate) and
``samples.md``. The folder is written under a temporary name
and renamed into place, so a snapshot is either whole or absent.

Callers must have stopped every training thread first: generation here is
inference on the same model object.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.names import NAME_MAX, fit_name, printable
from daemon.store.records import utc_now
from daemon.store.status import mark_progress, perplexity

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


# How each prompt's seed follows from GenerationSettings.seed, as recorded in every snapshot.
SEED_RULE = "seed + prompt index (0-based)"


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings recorded with every snapshot (``model.generate`` arguments).

    Attributes:
        max_new_tokens: tokens sampled per prompt.
        temperature: softmax temperature (> 0).
        top_k: tokens kept at each step before sampling.
        seed: the base seed; prompt ``i`` (0-based) samples from ``seed + i`` (:data:`SEED_RULE`).
    """

    max_new_tokens: int
    temperature: float
    top_k: int
    seed: int

    def prompt_seed(self, index: int) -> int:
        """The seed of the ``index``-th prompt (0-based): distinct per prompt, reproducible from the settings."""
        return self.seed + index

    def as_dict(self) -> dict[str, Any]:
        return {
            "do_sample": True,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "seed": self.seed,
            "seed_rule": SEED_RULE,
        }


def generate_samples(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], settings: GenerationSettings
) -> list[dict[str, Any]]:
    """Sample one continuation per prompt, all prompts at once; prompt ``i`` draws from its own seed ``seed + i``.

    The prompts go through one ``generate`` call, left-padded: one forward pass per new token
    for all of them, not one per prompt and token (the product's per-file work is mostly this
    forward pass's launch and Python overhead, on a GPU as on a CPU). Each prompt still has its
    own ``torch.Generator`` (:meth:`GenerationSettings.prompt_seed`), so two prompts never share
    their random draws, a snapshot is reproducible from its settings and prompt list, and a
    prompt's sample does not depend on the other prompts (up to float rounding of the padded
    batch). The seed depends on the prompt's position, not its text.

    A prompt ending in whitespace (``"import "``) is fed without that whitespace, and the
    first sampled token must start with it (token healing, for trailing whitespace only):
    a byte-level BPE glues a space to the word after it (``"Ġjson"``), so a trailing space
    tokenized alone (``"Ġ"``) is a context the model has barely seen, after which it
    continues with another space-led token and the sample reads ``"import  json"``.

    Args:
        model: a causal LM, in any mode (set to eval here).
        tokenizer: its tokenizer.
        prompts: the prompts; an empty one starts from EOS, like a new document.
        settings: sampling settings.

    A chat model (:func:`is_chat_model`) is asked each prompt as a user turn in its chat
    template, and its completion is the assistant's answer.

    Returns:
        ``[{"prompt": str, "completion": str, "seed": int}, ...]`` in prompt order (plus
        ``"chat": True`` for a chat model's answers). The completion is the text after the
        prompt in the decoding of the whole sequence (special tokens skipped), so ``prompt +
        completion`` is what the tokens read; a chat answer is the new tokens alone.
    """
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    from daemon.training.data import pad_token_id

    if not prompts:
        return []
    model.eval()
    chat = is_chat_model(tokenizer)
    healed = not chat and any(prompt.strip() and prompt != prompt.rstrip() for prompt in prompts)
    continuations = _continuation_texts(tokenizer) if healed else []
    fed = [_chat_ids(tokenizer, p) if chat else _prompt_ids(tokenizer, p, continuations) for p in prompts]
    pad = pad_token_id(tokenizer)
    input_ids, mask = left_padded([ids for ids, _, _ in fed], pad, model.device)
    longest = input_ids.shape[1]
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    config = GenerationConfig(  # greedy over the scores _SeededSampling leaves: exactly its draw
        do_sample=False,
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=pad,
        eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
    )
    sampling = _SeededSampling(settings, [first for _, _, first in fed], longest, model.device)
    with torch.inference_mode(), contiguous_head(model):
        out = model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([sampling]),
        )
    samples = []
    for index, (prompt, (ids, held_back, _)) in enumerate(zip(prompts, fed, strict=True)):
        if chat:  # the assistant's answer: the new tokens alone
            completion = str(tokenizer.decode(out[index, longest:], skip_special_tokens=True))
        else:
            prefix = str(tokenizer.decode(ids, skip_special_tokens=True)) + held_back
            text = str(tokenizer.decode(out[index, longest - len(ids) :], skip_special_tokens=True))
            completion = text[len(prefix) :] if text.startswith(prefix) else text[len(prefix) - len(held_back) :]
        sample = {"prompt": prompt, "completion": completion, "seed": settings.prompt_seed(index)}
        samples.append({**sample, "chat": True} if chat else sample)
    return samples


@contextmanager
def contiguous_head(model: PreTrainedModel) -> Iterator[None]:
    """Within the block, the output embeddings (``lm_head``) get their input contiguous.

    ``generate``'s first forward pass keeps the last position's hidden state only
    (``hidden_states[:, -1:, :]``, shape ``(batch, 1, hidden)``, a strided view). ``F.linear`` sends a
    non-contiguous 3-D input to ``bmm``, which on a CPU copies the ``(vocabulary, hidden)`` weight
    once per row of the batch (pytorch/pytorch#151934, open): for SmolLM2's 49,152 x 576 head and 48
    prompts, 2.7 GB written in bf16, where the contiguous ``(48, 1, 576)`` input takes one ``mm``
    (BENCHMARKS.md, "real-model speed", has the seconds). The result is the same.
    """
    heads = getattr(model, "get_output_embeddings", None)  # every PreTrainedModel has it; a bare module may not
    head = heads() if heads else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]) if args else None)
    try:
        yield
    finally:
        handle.remove()


def left_padded(rows: list[list[int]], pad: int, device: Any) -> tuple[Any, Any]:
    """Prompts as one ``generate`` batch: ``(input_ids, attention_mask)``, each ``[rows, longest]``, padded on the left.

    Left, so that every row's new tokens start at column ``longest``.
    """
    import torch

    longest = max(len(ids) for ids in rows)
    input_ids = torch.tensor([[pad] * (longest - len(ids)) + ids for ids in rows], device=device)
    mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in rows], device=device)
    return input_ids, mask


def is_chat_model(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether samples are chat turns: the tokenizer has a chat template of its own.

    The embedded model's tokenizer carries :data:`daemon.store.jsonl.DEFAULT_CHAT_TEMPLATE` only so
    that chat files can be rendered; it was never taught to answer, and its samples stay
    continuations of the prompt.
    """
    from daemon.store.jsonl import DEFAULT_CHAT_TEMPLATE

    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and bool(template) and template != DEFAULT_CHAT_TEMPLATE


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as one user turn in the tokenizer's chat template, up to the assistant's turn."""
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])


def _chat_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> tuple[list[int], str, list[int]]:
    """:func:`chat_prompt_ids` as :func:`_prompt_ids` returns a prompt: nothing held back, any token first."""
    return chat_prompt_ids(tokenizer, prompt), "", []


class _SeededSampling:
    """A logits processor that samples each row from its own generator and leaves only its draw.

    Per row, as ``generate(do_sample=True)`` would: the first new token restricted to the
    row's allowed tokens (token healing), then temperature, then top-k, then a draw from the
    softmax, from ``torch.Generator`` seeded with the row's prompt seed. The scores returned are
    -inf except 0 at the drawn token, so greedy decoding takes it. Each call marks progress.

    Args:
        settings: temperature, top-k and the seeds.
        first: per row, the tokens allowed first (empty: any).
        prompt_length: the padded prompts' length (the first new token is predicted there).
        device: where the scores are.
    """

    def __init__(self, settings: GenerationSettings, first: list[list[int]], prompt_length: int, device: Any) -> None:
        import torch

        self.settings = settings
        self.first = first
        self.prompt_length = prompt_length
        self.generators = [
            torch.Generator(device=device).manual_seed(settings.prompt_seed(i)) for i in range(len(first))
        ]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        mark_progress()
        chosen = torch.full_like(scores, -torch.inf)
        for row, generator in enumerate(self.generators):
            logits = scores[row]
            if input_ids.shape[-1] == self.prompt_length and self.first[row]:
                allowed = torch.full_like(logits, -torch.inf)
                allowed[self.first[row]] = 0
                logits = logits + allowed
            top = torch.topk(logits / self.settings.temperature, min(self.settings.top_k, logits.shape[-1]))
            pick = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)
            chosen[row, top.indices[pick]] = 0
        return chosen


def _continuation_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Each token's text where it follows a word: decoded after the token of ``"a"``, which is then cut off.

    Decoded in context, since some tokenizers (SentencePiece) drop the leading space of a
    sequence's first token. One decode of the vocabulary serves every prompt.
    """
    context = tokenizer("a", add_special_tokens=False)["input_ids"][-1:]
    prefix = str(tokenizer.decode(context))
    texts = [str(text) for text in tokenizer.batch_decode([[*context, t] for t in range(len(tokenizer))])]
    return [text[len(prefix) :] if text.startswith(prefix) else "" for text in texts]


def _heals(text: str, held_back: str) -> bool:
    """Whether a token reading ``text`` may come first after a prompt whose ``held_back`` whitespace was cut.

    It must give back exactly that whitespace and then something else: a token of whitespace
    alone (``"Ġ"``, ``"ĠĠ"``), which every byte-level BPE has for indentation, would be
    followed by a space-led word and the sample would read ``"def  name"``.
    """
    rest = text[len(held_back) :]
    return text.startswith(held_back) and bool(rest) and not rest[0].isspace()


def _prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str, continuations: list[str]
) -> tuple[list[int], str, list[int]]:
    """``(token ids to feed, trailing whitespace held back, the tokens allowed first)`` for one prompt.

    Nothing is held back (and any token may come first) when the prompt does not end in
    whitespace, is only whitespace, or no token continues the whitespace (``continuations``:
    :func:`_continuation_texts`, or empty when no prompt ends in whitespace).
    """
    stem = prompt.rstrip()
    held_back = prompt[len(stem) :]
    ids: list[int] = tokenizer(stem, add_special_tokens=False)["input_ids"]
    first: list[int] = []
    if stem and held_back and ids:
        first = [t for t, text in enumerate(continuations) if _heals(text, held_back)]
    if not first:
        held_back = ""
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:  # an empty prompt starts from EOS, like a new document
        ids = [tokenizer.eos_token_id]
    return ids, held_back, first


def write_snapshot(
    status_dir: str | Path,
    step: int,
    file_name: str,
    eval_loss: float | None,
    eval_examples: int,
    settings: GenerationSettings,
    samples: list[dict[str, Any]],
    evaluation: dict[str, Any] | None = None,
) -> Path:
    """Write ``snapshot.json`` and ``samples.md`` for one finished file.

    Args:
        status_dir: the status folder.
        step: ``global_step`` after the file.
        file_name: the trained file's name.
        eval_loss: mean held-out loss, or None when the file was too small to spare a held-out slice.
        eval_examples: held-out examples evaluated.
        settings: generation settings used for ``samples``.
        samples: from :func:`generate_samples`.
        evaluation: ``evaluations`` (the model's rows on every slice), ``forgetting``,
            ``quality_gate`` and ``evaluation`` (:meth:`daemon.training.evaluation.FileEvaluation.snapshot_fields`).

    Returns:
        The snapshot folder.
    """
    root = Path(status_dir) / "evolution"
    final = root / fit_name(f"{step:08d}-{Path(file_name).stem}", limit=NAME_MAX - len("..tmp"))  # room for tmp
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    doc = {
        "step": step,
        "file": printable(file_name),  # encodable, and one line in samples.md, whatever the name holds
        "created_at": utc_now(),
        "eval_loss": eval_loss,
        "perplexity": perplexity(eval_loss),
        "eval_examples": eval_examples,
        "eval_note": None if eval_loss is not None else "file too small to spare a held-out slice; no evaluation",
        "generation": settings.as_dict(),
        "samples": samples,
        **(evaluation or {}),
    }
    (tmp / "snapshot.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp / "samples.md").write_text(_markdown(doc), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def _markdown(doc: dict[str, Any]) -> str:
    ppl = doc["perplexity"]
    lines = [
        f"# Step {doc['step']}: after `{doc['file']}`",
        "",
        f"- held-out eval loss: {doc['eval_loss']:.4f}, perplexity: {ppl:.2f} (the file's own slice, below)"
        if doc["eval_loss"] is not None
        else f"- {doc['eval_note']}",
        _sampling_line(doc["generation"]),
        "",
    ]
    if doc.get("evaluations"):
        lines += ["| slice | examples | loss (nats) | perplexity | bits per byte |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['slice']} | {r['examples']} | {r['loss']:.4f} | {r['perplexity']:.2f} | {r['bits_per_byte']:.4f} |"
            for r in doc["evaluations"]
        ]
        lines.append("")
    for i, s in enumerate(doc["samples"], start=1):
        seed = f" (seed {s['seed']})" if "seed" in s else ""
        text = s["completion"] if s.get("chat") else s["prompt"] + s["completion"]  # a chat answer stands alone
        lines += [f"## Sample {i}{seed}: prompt `{s['prompt']!r}`", "", "```", text, "```", ""]
    return "\n".join(lines)


def _sampling_line(generation: dict[str, Any]) -> str:
    """The settings of ``snapshot.json``'s ``generation`` as one readable line of samples.md."""
    rule = generation.get("seed_rule", "the same seed for every prompt")
    return (
        f"- sampling: temperature {generation['temperature']}, top_k {generation['top_k']}, "
        f"max_new_tokens {generation['max_new_tokens']}, seed {generation['seed']} (each prompt: {rule})"
    )
