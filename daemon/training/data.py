"""From a file's records to tokenized training and held-out examples (docs/data.md).

:func:`prepare_datasets` tokenizes the records read by :mod:`daemon.store.jsonl` with a
batched ``map`` (cached by content; what each shape learns is :mod:`daemon.training.encoding`)
and splits off the held-out slice; :func:`mix_replay` adds replayed examples, and
:class:`PaddingCollator` pads a micro-batch. For the evaluation suite, :func:`heldout_records`
turns the held-out slice back into raw records.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from daemon.exceptions import DatasetError
from daemon.training.encoding import IGNORE_INDEX, tokenize
from daemon.training.loss_weights import DISTILLATION, LOSS_WEIGHT, ROW_COLUMNS

if TYPE_CHECKING:
    import datasets
    import numpy as np
    from transformers import PreTrainedTokenizerBase, TrainingArguments

    from daemon.config import DataArguments

logger = logging.getLogger(__name__)


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
        replay_weights: with ``--replay_weighting forgetting``, each earlier file's share of the
            replay (:func:`daemon.store.replay_mix.select_weighted_replay`); None with even replay.
        replayed_tokens: tokens in the ``replayed`` examples (sum of their ``length``): ``tokens +
            replayed_tokens`` is every token one epoch of ``train`` trains.
    """

    train: datasets.Dataset
    eval: datasets.Dataset | None
    tokens: int
    dropped: int
    heldout_records: list[dict[str, Any]] = field(default_factory=list)
    replayed: int = 0
    own_train: datasets.Dataset | None = None
    replay_weights: list[dict[str, Any]] | None = None
    replayed_tokens: int = 0

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
        ``input_ids`` ``[rows, longest]`` (int64) and ``labels`` ``[rows, longest]`` (-100 on padding);
        where the examples carry a ``loss_weight`` (``--replay_loss_weight``) or a ``distillation``
        (``--replay_distillation``, ``--file_distillation``), also that key, ``[rows]`` (float32; 0 on rows
        of padding).
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
        batch = {
            "input_ids": pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id),
            "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
        }
        for column in ROW_COLUMNS:
            if column in features[0]:
                values = [float(f[column]) for f in features] + [0.0] * missing
                batch[column] = torch.tensor(values, dtype=torch.float32)
        return batch


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


def length_grouped(rows: datasets.Dataset, batch: int, seed: int) -> list[int]:
    """A seeded order of ``rows`` in which every ``batch`` consecutive rows have similar lengths.

    A micro-batch is padded to its longest example (:class:`PaddingCollator`), so a chat turn, a
    prompt-completion pair, or a replayed or rehearsed example drawn beside 256-token blocks of text
    costs a whole block. This is transformers' own grouping (``get_length_grouped_indices``, what its
    ``train_sampling_strategy="group_by_length"`` samples with): a seeded permutation cut into
    mega-batches of ``min(rows // (4 x batch), 50)`` batches, each sorted longest first, the batch
    holding the longest row first. Seeded by ``seed`` through a ``torch.Generator``, so a restarted
    file sees the same order.

    Args:
        rows: a dataset with a ``length`` column (tokens per row).
        batch: rows per optimizer step (the plan's effective batch).
        seed: the epoch's seed.

    Returns:
        A permutation of ``range(rows.num_rows)``.
    """
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = example_lengths(rows).tolist()
    return list(get_length_grouped_indices(lengths, batch, generator=torch.Generator().manual_seed(seed)))


def mix_replay(
    data: PreparedData,
    replayed: list[dict[str, list[int]]],
    seed: int,
    loss_weight: float = 1.0,
    distillation: float = 0.0,
    file_distillation: float = 0.0,
) -> PreparedData:
    """Mix replayed examples into a file's training examples, in one seeded order.

    Args:
        data: the file's prepared examples (from :func:`prepare_datasets`).
        replayed: ``{"input_ids", "labels"?}`` examples from :func:`daemon.store.replay.select_replay`;
            a missing ``labels`` means every token is learned.
        seed: fixes the mixed order (the file's ``--seed``), so a resumed file sees the same order.
        loss_weight: ``--replay_loss_weight``; other than 1, ``train`` gets a float column
            ``loss_weight``: 1 on the file's own rows, this on the replayed ones
            (:mod:`daemon.training.loss_weights`).
        distillation: ``--replay_distillation``; with it or ``file_distillation`` above 0, ``train`` gets a
            float column ``distillation``: this on the replayed rows (:mod:`daemon.training.distillation`)...
        file_distillation: ... and this on the file's own (``--file_distillation``, where the file has a
            trained starting model to distil toward).

    Returns:
        ``data`` with ``train`` = own + replayed examples shuffled together, ``replayed``,
        ``replayed_tokens`` and ``own_train`` set; ``tokens`` stays the file's own. With nothing replayed,
        ``data`` itself, or with ``file_distillation`` its ``train`` in the same order with the column.
    """
    import datasets as ds

    real, own, distilled = ds.Value("float32"), data.train, distillation > 0 or file_distillation > 0
    if not replayed:
        if file_distillation <= 0:
            return data
        own = own.add_column(DISTILLATION, [file_distillation] * own.num_rows, feature=real)
        return replace(data, train=own, own_train=data.train)

    lengths = [len(e["input_ids"]) for e in replayed]
    rows = {
        "input_ids": [e["input_ids"] for e in replayed],
        "labels": [e.get("labels") for e in replayed],  # null: every token learned, as in packed text
        "length": lengths,
    }
    extra = ds.Dataset.from_dict(rows, features=data.train.features)
    if loss_weight != 1.0:
        own = own.add_column(LOSS_WEIGHT, [1.0] * own.num_rows, feature=real)
        extra = extra.add_column(LOSS_WEIGHT, [loss_weight] * extra.num_rows, feature=real)
    if distilled:
        own = own.add_column(DISTILLATION, [file_distillation] * own.num_rows, feature=real)
        extra = extra.add_column(DISTILLATION, [distillation] * extra.num_rows, feature=real)
    train = ds.concatenate_datasets([own, extra]).shuffle(seed=seed, keep_in_memory=True)
    return PreparedData(
        train,
        data.eval,
        data.tokens,
        data.dropped,
        data.heldout_records,
        len(replayed),
        data.train,
        replayed_tokens=sum(lengths),
    )


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
