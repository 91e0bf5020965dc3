"""From one JSONL file to tokenized training and held-out examples (README "Data").

Pipeline: :func:`scan_jsonl` reads the file once as bytes (sha256, shape,
malformed lines with their numbers, no example kept in memory); then
:func:`prepare_datasets` streams the usable rows into a ``datasets`` Arrow
table (``Dataset.from_generator``), tokenizes with a batched ``map`` and splits
off the held-out slice. Large files never sit whole in memory.

Shapes (TRL conventions), decided by a file's first usable line:

- ``text``: ``{"text": str}``; documents are joined with EOS and packed into
  ``max_seq_length`` blocks (the last partial block of each map batch is kept,
  so even a one-line file yields an example); every token is learned.
- ``prompt_completion``: ``{"prompt": str, "completion": str}``; prompt labels
  are -100, the completion and a closing EOS are learned.
- ``messages``: ``{"messages": [{"role", "content"}, ...]}``; rendered with the
  tokenizer's chat template (:data:`DEFAULT_CHAT_TEMPLATE` when it has none);
  only assistant turns are learned.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.exceptions import DatasetError
from daemon.status import mark_progress

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa
    from transformers import PreTrainedTokenizerBase

    from daemon.config import DataArguments

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # labels with this value are left out of the loss (torch CrossEntropyLoss ignore_index)
SHAPES = ("text", "prompt_completion", "messages")
MAX_REPORTED_BAD_LINES = 5
# Nesting levels of arrays/objects allowed in one line (serde_json's default). `json.loads`
# recurses once per level against the interpreter's recursion limit, shared with the caller's
# stack: near that limit a line could parse in the scan and fail in the record generator (called
# from deeper inside `datasets`). A fixed limit far below it gives every caller the same verdict.
MAX_JSON_DEPTH = 128
BINARY_SNIFF_BYTES = 8192
CHANGED_WHILE_READ = (
    "changed while it was being read: a writer still had it open. Write the file under a name the "
    "inbox ignores (.name, name.tmp or name.part) and rename it into the inbox when it is complete"
)
# Part of the records' cache key: bump it whenever parse_line accepts or rejects other lines,
# so a file cached under the old rules is parsed again (2: depth limit and lone surrogates).
PARSE_RULES_VERSION = 2

# ChatML, the template of many open chat models. `{% generation %}` is not used:
# assistant spans are found by rendering prefixes (see `_render_with_assistant_spans`).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _BadLine(ValueError):
    """One line is malformed; the message is the reason shown to the user."""


@dataclass
class ScanReport:
    """What :func:`scan_jsonl` found in a file.

    Attributes:
        path: the file.
        sha256: hex digest of the file's bytes.
        size_bytes: file size.
        shape: one of :data:`SHAPES`.
        usable: lines that will become examples.
        bad_lines: count of malformed lines skipped.
        first_bad: up to :data:`MAX_REPORTED_BAD_LINES` ``(line_number, reason)`` pairs, 1-based.
    """

    path: Path
    sha256: str
    size_bytes: int
    shape: str
    usable: int
    bad_lines: int = 0
    first_bad: list[tuple[int, str]] = field(default_factory=list)

    def bad_summary(self) -> str:
        """One line naming the first malformed lines, e.g. ``line 2 (bad JSON: ...); line 7 (...)``."""
        shown = "; ".join(f"line {n} ({reason})" for n, reason in self.first_bad)
        more = self.bad_lines - len(self.first_bad)
        return shown + (f"; and {more} more" if more > 0 else "")


def parse_line(raw: bytes, text_field: str) -> tuple[str, dict[str, Any]]:
    """Validate one JSONL line and normalize it to its shape's columns.

    The scan and the record generator both call this, so they skip the same lines;
    a line it accepts holds only strings that Arrow and the tokenizer can take.

    Args:
        raw: the line's bytes, without the newline.
        text_field: the key holding a language-modeling document.

    Returns:
        ``(shape, record)`` where record holds only that shape's columns.

    Raises:
        _BadLine: with the reason, for invalid UTF-8, bad JSON, JSON nested deeper
            than :data:`MAX_JSON_DEPTH` (anywhere in the line, even in unused keys),
            a non-object, a missing, empty or non-string field, or a kept string with
            a lone surrogate (an unpaired ``\\ud800``-``\\udfff`` escape: valid JSON,
            but no UTF-8 encodes it).
    """
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadLine(f"invalid UTF-8 at byte {e.start}") from e
    try:
        obj = json.loads(line)
    except RecursionError as e:
        raise _BadLine(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from e
    except ValueError as e:
        raise _BadLine(f"bad JSON: {e}") from e
    if _json_depth(obj) > MAX_JSON_DEPTH:
        raise _BadLine(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(obj, dict):
        raise _BadLine(f"not a JSON object but {type(obj).__name__}")
    if "messages" in obj:
        return "messages", {"messages": _check_messages(obj["messages"])}
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if not isinstance(obj.get(key), str):
                raise _BadLine(f"'{key}' is missing or not a string")
        if not obj["completion"]:
            raise _BadLine("'completion' is empty")
        return "prompt_completion", {key: _encodable(obj[key], key) for key in ("prompt", "completion")}
    if text_field in obj:
        if not isinstance(obj[text_field], str):
            raise _BadLine(f"'{text_field}' is not a string")
        if not obj[text_field].strip():
            raise _BadLine(f"'{text_field}' is empty")
        return "text", {"text": _encodable(obj[text_field], text_field)}
    raise _BadLine(f"no '{text_field}', 'prompt'/'completion' or 'messages' field")


def _json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value: 0 for a scalar, 1 for ``{"text": "..."}`` (iterative)."""
    depth, level = 0, [value]
    while level := [v for v in level if isinstance(v, dict | list)]:
        depth += 1
        level = [child for v in level for child in (v.values() if isinstance(v, dict) else v)]
    return depth


def _encodable(value: str, name: str) -> str:
    """``value``, checked to encode as UTF-8 (Arrow and the tokenizer fail on a lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        char = f"\\u{ord(value[e.start]):04x}"
        raise _BadLine(f"'{name}' has a lone surrogate {char} at character {e.start}, not encodable as UTF-8") from e
    return value


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise _BadLine("'messages' is not a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _BadLine(f"messages[{i}] needs string 'role' and 'content'")
        out.append({key: _encodable(m[key], f"messages[{i}].{key}") for key in ("role", "content")})
    if not any(m["role"] == "assistant" for m in out):
        raise _BadLine("no assistant message to learn from")
    return out


def _iter_lines(path: Path, digest: Any = None) -> Iterator[tuple[int, bytes]]:
    """``(1-based line number, bytes)`` of each non-blank line, read in binary, streaming.

    Args:
        path: the file.
        digest: a ``hashlib`` object fed every byte of the file on the way (blank lines too).
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            mark_progress()  # reading a big file is a long phase: the daemon must not see a stall
            if digest is not None:
                digest.update(raw)
            raw = raw.rstrip(b"\r\n")
            if raw.strip():
                yield number, raw


def scan_jsonl(path: str | Path, text_field: str = "text", strict: bool = False) -> ScanReport:
    """Read a JSONL file once: hash it, find its shape, count and name malformed lines.

    Args:
        path: the file.
        text_field: key of language-modeling documents.
        strict: fail on the first malformed line instead of skipping it.

    Returns:
        The report; malformed lines are logged as one warning naming their numbers.

    Raises:
        DatasetError: the file is missing, not a regular file, binary, empty,
            has no usable line, or (with ``strict``) has a malformed line.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(BINARY_SNIFF_BYTES)
    if b"\x00" in head:
        raise DatasetError(f"{path.name}: looks like a binary file (NUL bytes); expected UTF-8 JSON lines")
    digest = hashlib.sha256()
    shape: str | None = None
    usable = bad = 0
    first_bad: list[tuple[int, str]] = []
    for number, raw in _iter_lines(path, digest):
        try:
            line_shape, _ = parse_line(raw, text_field)
            if shape is not None and line_shape != shape:
                raise _BadLine(f"shape '{line_shape}' differs from the file's shape '{shape}'")
        except _BadLine as e:
            if strict:
                raise DatasetError(f"{path.name}: line {number}: {e} (--strict)") from e
            bad += 1
            if len(first_bad) < MAX_REPORTED_BAD_LINES:
                first_bad.append((number, str(e)))
            continue
        shape = line_shape
        usable += 1
    report = ScanReport(path, digest.hexdigest(), path.stat().st_size, shape or "text", usable, bad, first_bad)
    if usable == 0:
        if bad == 0:
            raise DatasetError(f"{path.name}: the file is empty (no non-blank lines)")
        raise DatasetError(f"{path.name}: no usable examples, all {bad} lines malformed: {report.bad_summary()}")
    if bad:
        logger.warning("%s: skipped %d malformed of %d lines: %s", path.name, bad, bad + usable, report.bad_summary())
    return report


def _generate_records(path: str, text_field: str, shape: str, sha256: str) -> Iterator[dict[str, Any]]:
    """Yield the normalized records of the usable lines of ``shape`` (for ``Dataset.from_generator``).

    Raises:
        DatasetError: the bytes read are not the scanned ones (``sha256``): the file changed.
    """
    digest = hashlib.sha256()
    for _, raw in _iter_lines(Path(path), digest):
        try:
            line_shape, record = parse_line(raw, text_field)
        except _BadLine:
            continue
        if line_shape == shape:
            yield record
    if digest.hexdigest() != sha256:
        raise DatasetError(f"{Path(path).name} {CHANGED_WHILE_READ}")


def load_records(report: ScanReport, data_args: DataArguments) -> datasets.Dataset:
    """The usable rows of a scanned file as an Arrow-backed ``datasets.Dataset``.

    The table is written to the datasets cache in batches, never held whole in
    memory. The bytes read are checked against the scan's sha256, so a file that
    changes between the scan and this read fails instead of training other content.
    The cache key is the file's content (sha256), shape and text field, not its
    path: a file seen before under any name (a retry, a re-drop, ``train.py`` on a
    copy) loads from the cache, and so does its tokenization (``map`` keys its cache
    on this fingerprint plus the tokenizer and packing arguments).

    Raises:
        DatasetError: the file changed while it was read.
    """
    import datasets

    gen_kwargs = {
        "path": str(report.path),
        "text_field": data_args.text_field,
        "shape": report.shape,
        "sha256": report.sha256,
    }
    try:
        return datasets.Dataset.from_generator(
            _generate_records,
            gen_kwargs=gen_kwargs,
            cache_dir=data_args.dataset_cache_dir,
            fingerprint=f"{report.shape}-{data_args.text_field}-{report.sha256}-rules{PARSE_RULES_VERSION}",
        )
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, DatasetError):
            cause = cause.__cause__
        if isinstance(cause, DatasetError):
            raise cause from e
        raise


def iter_text(records: datasets.Dataset, shape: str, max_bytes: int, batch_size: int = 1000) -> Iterator[str]:
    """Plain text of the records, up to about ``max_bytes`` (for training the bootstrap tokenizer)."""
    seen = 0
    for batch in records.iter(batch_size=batch_size):
        if shape == "text":
            texts = batch["text"]
        elif shape == "prompt_completion":
            texts = [p + c for p, c in zip(batch["prompt"], batch["completion"], strict=True)]
        else:
            texts = ["\n".join(m["content"] for m in conv) for conv in batch["messages"]]
        for text in texts:
            yield text
            seen += len(text.encode("utf-8"))
            if seen >= max_bytes:
                return


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


def _chunks(texts: list[str], max_chars: int) -> Iterator[list[str]]:
    """Consecutive runs of ``texts`` of about ``max_chars`` characters (one text at least)."""
    chunk: list[str] = []
    size = 0
    for text in texts:
        if chunk and size + len(text) > max_chars:
            yield chunk
            chunk, size = [], 0
        chunk.append(text)
        size += len(text)
    if chunk:
        yield chunk


def _pack_text(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, block: int) -> pa.Table:
    """Concatenate a batch's documents, EOS after each, and cut the stream into ``block``-token rows.

    Returns:
        An Arrow table with ``input_ids`` and ``labels`` (the same ids: every token is
        learned) as ``list<int32>`` and ``length``; the last row may be shorter than
        ``block``. The stream is one int32 array (4 bytes a token), not Python lists.
    """
    mark_progress()  # one map batch
    import numpy as np
    import pyarrow as pa

    eos = np.array([tokenizer.eos_token_id], dtype=np.int32)
    parts = []
    for chunk in _chunks(batch["text"], ENCODE_CHUNK_CHARS):
        for ids in _token_ids(tokenizer, chunk):
            parts += [np.array(ids, dtype=np.int32), eos]
    stream = np.concatenate(parts)
    offsets = np.append(np.arange(0, len(stream), block, dtype=np.int32), np.int32(len(stream)))
    rows = pa.ListArray.from_arrays(pa.array(offsets), pa.array(stream))
    return pa.table({"input_ids": rows, "labels": rows, "length": pa.array(np.diff(offsets))})


def _tokenize_prompt_completion(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, max_len: int
) -> dict[str, list]:
    mark_progress()  # one map batch
    prompts = tokenizer(batch["prompt"], add_special_tokens=True)["input_ids"]
    completions = tokenizer(batch["completion"], add_special_tokens=False)["input_ids"]
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    for p, c in zip(prompts, completions, strict=True):
        ids = (p + c + [tokenizer.eos_token_id])[:max_len]
        labels = ([IGNORE_INDEX] * len(p) + c + [tokenizer.eos_token_id])[:max_len]
        _append_if_learnable(out, ids, labels)
    return out


def _render_with_assistant_spans(
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
            raise _BadLine("the chat template does not render turn by turn; cannot find the assistant tokens")
        spans.append((len(start), len(end)))
    return full, spans


def _tokenize_messages(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, max_len: int, template: str
) -> dict[str, list]:
    mark_progress()  # one map batch
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    for messages in batch["messages"]:
        try:
            text, spans = _render_with_assistant_spans(tokenizer, messages, template)
        except _BadLine as e:
            raise DatasetError(str(e)) from e
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"][:max_len]
        labels = [
            tid if any(s <= start < e for s, e in spans) else IGNORE_INDEX
            for tid, (start, _) in zip(ids, enc["offset_mapping"], strict=False)
        ]
        _append_if_learnable(out, ids, labels)
    return out


def _append_if_learnable(out: dict[str, list], ids: list[int], labels: list[int]) -> None:
    # An example truncated before its first learned token would add a zero-token
    # micro-batch to the loss normalisation; it is dropped (and counted by the caller).
    if any(label != IGNORE_INDEX for label in labels):
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))


@dataclass
class PreparedData:
    """Tokenized examples of one file, after packing/truncation and the held-out split.

    Attributes:
        train: columns ``input_ids``, ``labels``, ``length``; shuffled once with the seed,
            trained in this order.
        eval: the held-out slice, or ``None`` when the file is too small to spare one.
        tokens: tokens in ``train`` (sum of ``length``).
        dropped: examples with no learnable token left after truncation.
    """

    train: datasets.Dataset
    eval: datasets.Dataset | None
    tokens: int
    dropped: int

    @property
    def examples(self) -> int:
        return self.train.num_rows

    @property
    def eval_examples(self) -> int:
        return 0 if self.eval is None else self.eval.num_rows


def chat_template_of(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's own chat template, or :data:`DEFAULT_CHAT_TEMPLATE` when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template else DEFAULT_CHAT_TEMPLATE


def tokenize(
    records: datasets.Dataset, shape: str, tokenizer: PreTrainedTokenizerBase, data_args: DataArguments
) -> datasets.Dataset:
    """Tokenize records of ``shape`` into ``input_ids``/``labels``/``length`` rows (batched ``map``).

    Returns:
        Rows of at most ``data_args.max_seq_length`` tokens each; labels are -100 where not learned.
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
    return records.map(
        fn,
        fn_kwargs={"tokenizer": tokenizer, **kwargs},
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
    tokens = sum(train["length"])
    if dropped:
        logger.warning("dropped %d examples with no learnable token left after truncation", dropped)
    return PreparedData(train=train, eval=heldout, tokens=int(tokens), dropped=dropped)
