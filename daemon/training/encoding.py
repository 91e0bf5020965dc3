"""One record's tokens and labels, by the file's shape: packing, prompt masks, chat spans (docs/data.md).

:func:`tokenize` maps a file's records to training rows (:mod:`daemon.training.data` splits and
batches them); :func:`encode_example` and :func:`windows` tokenize one record the same way, without
truncation, for the evaluation suite.

- ``text``: documents are joined with EOS and packed into ``max_seq_length`` blocks
  (the last partial block of each map batch is kept, so even a one-line file yields
  an example); every token is learned, so ``labels`` is null (the ids are not stored twice).
  A long document is encoded in pieces with the same tokens (:mod:`daemon.store.documents`).
- ``prompt_completion``: prompt labels are -100, the completion and a closing EOS
  are learned.
- ``messages``: rendered with the tokenizer's chat template
  (:data:`~daemon.store.jsonl.DEFAULT_CHAT_TEMPLATE` when it has none); only assistant turns are learned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from daemon.exceptions import DatasetError
from daemon.store import documents
from daemon.store.jsonl import DEFAULT_CHAT_TEMPLATE
from daemon.store.status import PhaseProgress

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa
    from transformers import PreTrainedTokenizerBase

    from daemon.config import DataArguments

logger = logging.getLogger(__name__)


IGNORE_INDEX = -100  # labels with this value are left out of the loss (torch CrossEntropyLoss ignore_index)


# Characters per tokenizer call when packing: bounds the tokenizer's per-token objects
# (Encodings: ids, strings, offsets) to a few tens of MB whatever the map batch holds.
ENCODE_CHUNK_CHARS = 1 << 21


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added.

    A fast tokenizer encodes through ``tokenizers``' ``encode_batch_fast`` (parallel
    over the cores, no offsets computed); the result equals ``tokenizer(texts,
    add_special_tokens=False)["input_ids"]`` without building a ``BatchEncoding``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _pieces(texts: list[str], max_chars: int) -> Iterator[tuple[str, bool]]:
    """``(piece, last)`` for the pieces of each text in order (:func:`daemon.store.documents.split_document`).

    ``last`` marks a document's last piece, after which the packed stream takes an EOS.
    """
    for text in texts:
        done = 0
        for piece in documents.split_document(text, max_chars):
            done += len(piece)
            yield piece, done == len(text)


def _chunks(pieces: Iterable[tuple[str, bool]], max_chars: int) -> Iterator[list[tuple[str, bool]]]:
    """Consecutive runs of ``pieces`` of about ``max_chars`` characters (one piece at least)."""
    chunk: list[tuple[str, bool]] = []
    size = 0
    for piece in pieces:
        if chunk and size + len(piece[0]) > max_chars:
            yield chunk
            chunk, size = [], 0
        chunk.append(piece)
        size += len(piece[0])
    if chunk:
        yield chunk


def _pack_text(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, block: int, progress: PhaseProgress
) -> pa.Table:
    """Concatenate a batch's documents, EOS after each, and cut the stream into ``block``-token rows.

    A document longer than :data:`daemon.store.documents.PIECE_CHARS` is encoded in pieces (:func:`_pieces`),
    so the tokenizer's memory stays bounded (about :data:`ENCODE_CHUNK_CHARS` characters a call)
    whatever one document's length; the embedded tokenizer gives the whole document's ids.

    Returns:
        An Arrow table with ``input_ids`` (``list<int32>``), ``labels`` (null in every row:
        every token is learned, and :class:`PaddingCollator` learns the ids where a row's
        labels are null) and ``length``; the last row may be shorter than ``block``. The
        stream is one int32 array, written to the cache once: 4 bytes a token, not 8, and
        not Python lists (the whole cache of a big file, records and tokens, is larger than the
        file: BENCHMARKS.md, pipeline).
    """
    import numpy as np
    import pyarrow as pa

    eos = np.array([tokenizer.eos_token_id], dtype=np.int32)
    parts = []
    for chunk in _chunks(_pieces(batch["text"], documents.PIECE_CHARS), ENCODE_CHUNK_CHARS):
        for ids, (_, last) in zip(_token_ids(tokenizer, [piece for piece, _ in chunk]), chunk, strict=True):
            parts.append(np.array(ids, dtype=np.int32))
            if last:
                parts.append(eos)
        progress.advance(sum(last for _, last in chunk))  # also a heartbeat within one long document
    stream = np.concatenate(parts)
    offsets = np.append(np.arange(0, len(stream), block, dtype=np.int32), np.int32(len(stream)))
    rows = pa.ListArray.from_arrays(pa.array(offsets), pa.array(stream))
    labels = pa.nulls(len(rows), type=rows.type)
    return pa.table({"input_ids": rows, "labels": labels, "length": pa.array(np.diff(offsets))})


def _tokenize_prompt_completion(
    batch: dict[str, list],
    indices: list[int],
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    progress: PhaseProgress,
) -> dict[str, list]:
    prompts = tokenizer(batch["prompt"], add_special_tokens=True)["input_ids"]
    completions = tokenizer(batch["completion"], add_special_tokens=False)["input_ids"]
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "record": []}
    for p, c, record in zip(prompts, completions, indices, strict=True):
        ids = (p + c + [tokenizer.eos_token_id])[:max_len]
        labels = ([IGNORE_INDEX] * len(p) + c + [tokenizer.eos_token_id])[:max_len]
        _append_if_learnable(out, ids, labels, record)
    progress.advance(len(indices))
    return out


def render_with_assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], template: str
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and the character spans of its assistant turns.

    A turn's span runs from the end of the prefix rendered with a generation
    prompt to the end of the conversation rendered up to that turn, so it covers
    the reply and its end-of-turn marker, not the role header.

    Raises:
        _BadLine: the template does not render prefixes as prefixes of the whole.
    """

    def render(msgs: list[dict[str, str]], generation_prompt: bool = False) -> str:
        if not msgs and not generation_prompt:
            return ""
        rendered = tokenizer.apply_chat_template(
            msgs, chat_template=template, add_generation_prompt=generation_prompt, tokenize=False
        )
        assert isinstance(rendered, str)
        return rendered

    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = render(messages[:i], generation_prompt=True), render(messages[: i + 1])
        if not (full.startswith(end) and end.startswith(start)):
            raise DatasetError("the chat template does not render turn by turn; cannot find the assistant tokens")
        spans.append((len(start), len(end)))
    return full, spans


def _tokenize_messages(
    batch: dict[str, list],
    indices: list[int],
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    template: str,
    progress: PhaseProgress,
) -> dict[str, list]:
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "record": []}
    for messages, record in zip(batch["messages"], indices, strict=True):
        text, spans = render_with_assistant_spans(tokenizer, messages, template)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"][:max_len]
        labels = [
            tid if any(s <= start < e for s, e in spans) else IGNORE_INDEX
            for tid, (start, _) in zip(ids, enc["offset_mapping"], strict=False)
        ]
        _append_if_learnable(out, ids, labels, record)
    progress.advance(len(indices))
    return out


def _append_if_learnable(out: dict[str, list], ids: list[int], labels: list[int], record: int) -> None:
    # An example truncated before its first learned token would add a zero-token
    # micro-batch to the loss normalisation; it is dropped (and counted by the caller).
    # `record` (the row's index in the file's records) finds the raw held-out records.
    if any(label != IGNORE_INDEX for label in labels):
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["record"].append(record)


def chat_template_of(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's own chat template, or :data:`DEFAULT_CHAT_TEMPLATE` when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template else DEFAULT_CHAT_TEMPLATE


def tokenize(
    records: datasets.Dataset, shape: str, tokenizer: PreTrainedTokenizerBase, data_args: DataArguments
) -> datasets.Dataset:
    """Tokenize records of ``shape`` into ``input_ids``/``labels``/``length`` rows (batched ``map``).

    A big file's tokenization logs its progress (records done, records a second) every
    10 seconds (:class:`PhaseProgress`); a cached one is loaded without a line.

    Returns:
        Rows of at most ``data_args.max_seq_length`` tokens each; labels are -100 where not learned
        (null for packed text: every token learned).
    """
    if tokenizer.eos_token_id is None:
        raise DatasetError("the tokenizer has no EOS token; documents cannot be separated")
    fn: Callable[..., Any]
    kwargs: dict[str, Any]
    if shape == "text":
        fn, kwargs = _pack_text, {"block": data_args.max_seq_length}
    elif shape == "prompt_completion":
        fn, kwargs = _tokenize_prompt_completion, {"max_len": data_args.max_seq_length}
    else:
        if not getattr(tokenizer, "is_fast", False):
            raise DatasetError("conversational files need a fast tokenizer (offset mapping)")
        fn, kwargs = _tokenize_messages, {"max_len": data_args.max_seq_length, "template": chat_template_of(tokenizer)}
    progress = PhaseProgress(f"tokenizing ({shape})", records.num_rows, "records")
    return records.map(
        fn,
        fn_kwargs={"tokenizer": tokenizer, **kwargs, "progress": progress},  # the cache key: new_fingerprint
        with_indices=shape != "text",  # a packed block has no one record; other rows keep theirs
        batched=True,
        batch_size=data_args.preprocessing_batch_size,
        remove_columns=records.column_names,
        desc=f"tokenizing ({shape})",
        new_fingerprint=tokenization_fingerprint(records, tokenizer, fn, kwargs, data_args.preprocessing_batch_size),
    )


def tokenization_fingerprint(
    records: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, fn: Callable, kwargs: dict[str, Any], batch: int
) -> str:
    """The cache key of a file's tokenization: what the tokens depend on, and nothing else.

    ``datasets`` would hash the tokenizer object itself, which holds the directory it
    was loaded from (``name_or_path``): every new checkpoint would miss the cache
    although its tokenizer is the same. Here the key is the records' fingerprint
    (the file's content), the tokenizer's serialized vocabulary and rules
    (``tokenizers``' JSON for a fast tokenizer), its special tokens, the function
    and its arguments, and the map batch size (packing restarts at each batch).
    """
    from datasets.fingerprint import Hasher

    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else Hasher.hash(tokenizer)
    special = sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())
    return Hasher.hash([records._fingerprint, rules, special, tokenizer.eos_token_id, fn, kwargs, batch])


def encode_example(
    record: dict[str, Any], shape: str, tokenizer: PreTrainedTokenizerBase, template: str
) -> tuple[list[int], list[int], int]:
    """One raw record as ``(input_ids, labels, bytes)``; labels are -100 where not learned.

    Tokenized as in training (:mod:`daemon.training.data`), without truncation. The first
    position is never learned (nothing predicts it): a text starts after an EOS, as a
    packed document does in training. ``bytes`` are the UTF-8 bytes the learned tokens cover.
    """
    eos = tokenizer.eos_token_id
    if shape == "text":
        ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        input_ids, labels, covered = [*ids, eos], [*ids, eos], len(record["text"].encode("utf-8"))
    elif shape == "prompt_completion":
        prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
        ids = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        input_ids, labels = [*prompt, *ids, eos], [IGNORE_INDEX] * len(prompt) + [*ids, eos]
        covered = len(record["completion"].encode("utf-8"))
    else:
        text, spans = render_with_assistant_spans(tokenizer, record["messages"], template)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = enc["input_ids"]
        learned = [any(s <= start < e for s, e in spans) for start, _ in enc["offset_mapping"]]
        labels = [t if keep else IGNORE_INDEX for t, keep in zip(input_ids, learned, strict=True)]
        covered = sum(len(text[s:e].encode("utf-8")) for s, e in spans)
    if not labels or labels[0] != IGNORE_INDEX:
        input_ids, labels = [eos, *input_ids], [IGNORE_INDEX, *labels]
    return input_ids, labels, covered


def windows(input_ids: list[int], labels: list[int], length: int) -> Iterator[tuple[list[int], list[int]]]:
    """Windows of at most ``length`` tokens overlapping by one, so each position but the first is predicted once.

    A window's first label is left out (nothing in the window predicts it; the previous
    window's last position did). Windows without a learned label are skipped.
    """
    start = 0
    while start < len(input_ids) - 1:
        stop = min(start + length, len(input_ids))
        window_labels = [IGNORE_INDEX, *labels[start + 1 : stop]]
        if any(label != IGNORE_INDEX for label in window_labels):
            yield input_ids[start:stop], window_labels
        start = stop - 1
