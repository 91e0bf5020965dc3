"""From a file's records to tokenized training and held-out examples (docs/data.md).

:func:`prepare_datasets` tokenizes the records read by :mod:`daemon.store.jsonl` with a
batched ``map`` (cached by content) and splits off the held-out slice:

- ``text``: documents are joined with EOS and packed into ``max_seq_length`` blocks
  (the last partial block of each map batch is kept, so even a one-line file yields
  an example); every token is learned, so ``labels`` is null (the ids are not stored twice).
  A long document is encoded in pieces with the same tokens (:mod:`daemon.store.documents`).
- ``prompt_completion``: prompt labels are -100, the completion and a closing EOS
  are learned.
- ``messages``: rendered with the tokenizer's chat template
  (:data:`DEFAULT_CHAT_TEMPLATE` when it has none); only assistant turns are learned.

For the evaluation suite, :func:`heldout_records` turns the held-out slice back into raw
records, and :func:`encode_example` / :func:`windows` tokenize one record the same way,
without truncation, into windows in which every learned token is predicted once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from daemon.exceptions import DatasetError
from daemon.store import documents
from daemon.store.jsonl import DEFAULT_CHAT_TEMPLATE
from daemon.store.status import PhaseProgress

if TYPE_CHECKING:
    import datasets
    import numpy as np
    import pyarrow as pa
    from transformers import PreTrainedTokenizerBase, TrainingArguments

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


@dataclass
class PreparedData:
    """Tokenized examples of one file, after packing/truncation and the held-out split.

    Attributes:
        train: columns ``input_ids``, ``labels``, ``length``; shuffled once with the seed,
            trained in this order.
        eval: the held-out slice, or ``None`` when the file is too small to spare one.
        tokens: tokens in ``train`` (sum of ``length``).
        dropped: examples with no learnable token left after truncation.
        heldout_records: the held-out slice as raw records of the file's shape, for the
            evaluation suite (:func:`heldout_records`); empty without a held-out slice.
        replayed: examples of ``train`` replayed from earlier files (:func:`mix_replay`).
        own_train: the file's own training examples before replay was mixed in (``train``
            when nothing is replayed): what the replay store samples once the file is done.
    """

    train: datasets.Dataset
    eval: datasets.Dataset | None
    tokens: int
    dropped: int
    heldout_records: list[dict[str, Any]] = field(default_factory=list)
    replayed: int = 0
    own_train: datasets.Dataset | None = None

    @property
    def examples(self) -> int:
        """The file's own training examples (replayed ones excluded)."""
        return self.train.num_rows - self.replayed

    @property
    def own(self) -> datasets.Dataset:
        """The file's own training examples, without replay."""
        return self.own_train if self.own_train is not None else self.train

    @property
    def eval_examples(self) -> int:
        return 0 if self.eval is None else self.eval.num_rows


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id padding is written with: the tokenizer's pad token, or its EOS token when it has none."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


@dataclass(frozen=True)
class PaddingCollator:
    """The Trainer's collator: examples stacked into one micro-batch, right-padded to the longest.

    Takes the product's examples (``input_ids`` and ``labels`` of any length, as 1-D tensors
    from a dataset in torch format, or as lists; ``labels`` null or missing means every token
    is learned, as in packed text); other columns are left out. It replaces
    ``DataCollatorForSeq2Seq``, whose ``tokenizer.pad`` turns every token id into a Python int
    and back, several times this collator's time for the same micro-batch (BENCHMARKS.md,
    "Measurements behind the code"), time in which a GPU waits, since the Trainer synchronises
    with it at every step.

    **No attention mask.** The padding is on the right and the model is causal: a token attends
    only to itself and the tokens before it, all real, so a mask changes nothing a label is
    computed from (the padding's own outputs are never learned: their labels are ``-100``).
    Without it every micro-batch takes attention's causal kernel, and under ``torch.compile``
    the model is called with the same arguments at every step: a mask present in some
    micro-batches only (those holding a packed file's short last block of a batch of records)
    recompiled the training graph in the middle of a file (BENCHMARKS.md, "Measurements behind the code").

    Args:
        pad_token_id: the id written after each example's end (never learned).
        rows: pad every micro-batch to this many rows with rows of padding (nothing learned:
            the loss and gradients are those of the real rows), so that a file's last,
            smaller micro-batch has the shape of the others; a compiled model otherwise compiles
            that shape again at the end of every file. None: a micro-batch has its own rows.

    Returns:
        ``input_ids`` ``[rows, longest]`` (int64) and ``labels`` ``[rows, longest]`` (-100 on padding).
    """

    pad_token_id: int
    rows: int | None = None

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, rows: int | None = None) -> PaddingCollator:
        """Padding with :func:`pad_token_id`; ``rows`` as in the class."""
        return cls(pad_token_id(tokenizer), rows)

    @classmethod
    def for_training(
        cls, tokenizer: PreTrainedTokenizerBase, args: TrainingArguments, grad_workers: int
    ) -> PaddingCollator:
        """The training collator: ``rows`` is the batch size where a compiled model takes the stock step.

        Eager, or on gradient workers, a micro-batch keeps its own rows.
        """
        compiled_stock_step = args.torch_compile and grad_workers == 0
        return cls.for_tokenizer(tokenizer, args.per_device_train_batch_size if compiled_stock_step else None)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch
        from torch.nn.utils.rnn import pad_sequence

        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        labels = [torch.as_tensor(_labels(f), dtype=torch.long) for f in features]
        missing = max(0, (self.rows or 0) - len(ids))
        ids += [torch.zeros(0, dtype=torch.long)] * missing
        labels += [torch.zeros(0, dtype=torch.long)] * missing
        return {
            "input_ids": pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id),
            "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
        }


def torch_rows(rows: datasets.Dataset) -> datasets.Dataset:
    """``rows`` as the Trainer reads them: ``input_ids`` and ``length`` as tensors, ``labels`` as stored.

    ``labels`` stays out of the torch format (a list of ids, or null where every token is
    learned): replay mixes examples of packed text (null) with prompt-completion and chat
    examples (-100 masks) in one micro-batch, and datasets' torch formatter stacks a column's
    values and fails on the null (``AttributeError: 'NoneType' object has no attribute
    'shape'``). :class:`PaddingCollator` reads either.
    """
    return rows.with_format("torch", columns=["input_ids", "length"], output_all_columns=True)


def _labels(example: dict[str, Any]) -> Any:
    """An example's labels: its ``labels``, or its ``input_ids`` where those are null or missing (all learned)."""
    labels = example.get("labels")
    return example["input_ids"] if labels is None else labels


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


def heldout_size(examples: int, data_args: DataArguments) -> int:
    """How many of ``examples`` to hold out: ``min(max_eval_examples, floor(examples * eval_fraction))``.

    Zero when the file has fewer than ``min_train_examples_for_eval`` examples.
    """
    if examples < data_args.min_train_examples_for_eval:
        return 0
    return min(data_args.max_eval_examples, int(examples * data_args.eval_fraction))


def prepare_datasets(
    records: datasets.Dataset, shape: str, tokenizer: PreTrainedTokenizerBase, data_args: DataArguments, seed: int
) -> PreparedData:
    """Tokenize a file's records and split off its held-out slice.

    Args:
        records: from :func:`load_records`.
        shape: the file's shape.
        tokenizer: the running model's tokenizer.
        data_args: packing length, held-out sizing.
        seed: fixes the shuffle and the split, so a file's order is reproducible.

    Raises:
        DatasetError: no example has a learnable token (e.g. every prompt fills ``max_seq_length``).
    """
    tokenized = tokenize(records, shape, tokenizer, data_args)
    dropped = records.num_rows - tokenized.num_rows if shape != "text" else 0
    if tokenized.num_rows == 0:
        raise DatasetError(
            f"no example keeps a learnable token within --max_seq_length {data_args.max_seq_length} ({dropped} dropped)"
        )
    k = heldout_size(tokenized.num_rows, data_args)
    if k:
        split = tokenized.train_test_split(test_size=k, shuffle=True, seed=seed)
        train, heldout = split["train"], split["test"]
    else:
        train, heldout = tokenized.shuffle(seed=seed), None
    raw = heldout_records(heldout, records, shape, tokenizer) if heldout is not None else []
    if "record" in tokenized.column_names:
        train = train.remove_columns("record")
        heldout = heldout.remove_columns("record") if heldout is not None else None
    tokens = int(example_lengths(train).sum())  # numpy sums int32 lengths in int64
    if dropped:
        logger.warning("dropped %d examples with no learnable token left after truncation", dropped)
    return PreparedData(train=train, eval=heldout, tokens=tokens, dropped=dropped, heldout_records=raw)


def example_lengths(rows: datasets.Dataset) -> np.ndarray:
    """The ``length`` column of ``rows`` in their order, shape ``[num_rows]`` (integer tokens), read by Arrow.

    A shuffle or a split leaves an indices mapping over the map's table; through it
    ``rows["length"][:]`` takes whole rows, about 430 bytes of memory each (gigabytes for the
    blocks of a big file, BENCHMARKS.md, "Measurements behind the code"). This takes the one column by the
    mapping (``Dataset._indices``, the mapping ``datasets`` itself applies): 8 bytes a row.
    """
    column = rows.data.column("length")
    mapping = rows._indices  # None when the rows are the table's own, in order
    if mapping is not None:
        column = column.take(mapping.column(0))
    return column.to_numpy()


def mix_replay(data: PreparedData, replayed: list[dict[str, list[int]]], seed: int) -> PreparedData:
    """Mix replayed examples into a file's training examples, in one seeded order.

    Args:
        data: the file's prepared examples (from :func:`prepare_datasets`).
        replayed: ``{"input_ids", "labels"?}`` examples from :func:`daemon.store.replay.select_replay`;
            a missing ``labels`` means every token is learned.
        seed: fixes the mixed order (the file's ``--seed``), so a resumed file sees the same order.

    Returns:
        ``data`` with ``train`` = own + replayed examples shuffled together, ``replayed`` and
        ``own_train`` set; ``tokens`` stays the file's own.
    """
    if not replayed:
        return data
    import datasets as ds

    rows = {
        "input_ids": [e["input_ids"] for e in replayed],
        "labels": [e.get("labels") for e in replayed],  # null: every token learned, as in packed text
        "length": [len(e["input_ids"]) for e in replayed],
    }
    own = data.train
    extra = ds.Dataset.from_dict(rows, features=own.features)
    train = ds.concatenate_datasets([own, extra]).shuffle(seed=seed, keep_in_memory=True)
    return PreparedData(train, data.eval, data.tokens, data.dropped, data.heldout_records, len(replayed), own)


def replay_examples(train: datasets.Dataset, indices: list[int]) -> list[dict[str, list[int]]]:
    """Rows ``indices`` of a training dataset as replay-store examples (``labels`` only where they differ)."""
    rows = train.select(indices).with_format(None)[:]  # one read into lists of ints, not row by row
    return [
        {"input_ids": ids} if labels is None or ids == labels else {"input_ids": ids, "labels": labels}
        for ids, labels in zip(rows["input_ids"], rows["labels"], strict=True)
    ]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A fingerprint of the tokenizer's vocabulary and rules (16 hex digits), to tell two tokenizers apart."""
    from daemon.store.replay import tokenizer_digest

    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return tokenizer_digest(rules + str(tokenizer.eos_token_id))


def heldout_records(
    heldout: datasets.Dataset, records: datasets.Dataset, shape: str, tokenizer: PreTrainedTokenizerBase
) -> list[dict[str, Any]]:
    """The held-out examples as raw records of ``shape``, so a tokenizer change cannot invalidate them.

    A ``prompt_completion`` or ``messages`` row is one record, found by its ``record``
    index. A ``text`` row is a packed block: its tokens are cut at each EOS and every
    piece decoded back to text, one ``{"text": piece}`` per piece (a piece that is only
    whitespace is left out). For byte-level BPE tokenizers (the embedded one, GPT-2's)
    decoding gives back the exact characters, except a multi-byte character cut by a
    block boundary, which decodes to U+FFFD.

    Returns:
        Records in held-out order, as :func:`daemon.store.jsonl.parse_line` normalises them.
    """
    if shape != "text":
        return list(records.select(heldout["record"]))
    pieces: list[dict[str, Any]] = []
    eos = tokenizer.eos_token_id
    for ids in heldout["input_ids"]:
        start = 0
        for end in [i for i, token in enumerate(ids) if token == eos] + [len(ids)]:
            text = str(tokenizer.decode(ids[start:end], clean_up_tokenization_spaces=False)) if end > start else ""
            if text.strip():
                pieces.append({"text": text})
            start = end + 1
    return pieces


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
