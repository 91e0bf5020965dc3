"""Reading one JSONL drop: its hash, shape and malformed lines, then its usable rows (docs/data.md).

A gzip or zstd file is read as its content (:mod:`daemon.store.compressed`); its sha256 is of the
file as dropped. Line numbers are the content's.

:func:`scan_jsonl` reads the file once as bytes (sha256, shape, malformed lines with
their numbers, no example kept in memory); :func:`load_records` streams the usable
rows into a ``datasets`` Arrow table (``Dataset.from_generator``), checking that the
bytes read are the ones scanned. Both go through :func:`parse_line`, so they agree on
every line by construction. Large files never sit whole in memory.

Shapes (TRL conventions), decided by a file's first usable line: ``text``
(``{"text": str}``), ``prompt_completion`` (``{"prompt": str, "completion": str}``)
and ``messages`` (``{"messages": [{"role", "content"}, ...]}``); what each learns is
in :mod:`daemon.training.data`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.exceptions import DatasetError
from daemon.store import documents
from daemon.store.compressed import open_content
from daemon.store.status import PhaseProgress, mark_progress

if TYPE_CHECKING:
    import datasets

    from daemon.config import DataArguments

logger = logging.getLogger(__name__)

# ChatML, the template of many open chat models. `{% generation %}` is not used:
# assistant spans are found by rendering prefixes (see `daemon.training.encoding.render_with_assistant_spans`).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

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
_SURROGATE = re.compile("[\ud800-\udfff]")  # the code points UTF-8 cannot encode


class _BadLine(ValueError):
    """One line is malformed; the message is the reason shown to the user."""


@dataclass
class FileScan:
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
        del line  # one long document: its text is in `obj` now, free this copy before the checks
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
        if not obj[text_field] or obj[text_field].isspace():  # what `not strip()` says, without a copy
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
    """``value``, checked to encode as UTF-8 (Arrow and the tokenizer fail on a lone surrogate).

    Searched, not encoded: CPython's encoder sizes its buffer for the worst case, 4 bytes a
    character in a text holding one beyond U+FFFF (400 MB for a moment for a 100 MB document).
    """
    found = _SURROGATE.search(value)
    if found is not None:
        char = f"\\u{ord(found.group()):04x}"
        raise _BadLine(f"'{name}' has a lone surrogate {char} at character {found.start()}, not encodable as UTF-8")
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


def _iter_lines(path: Path, digest: Any = None, phase: str = "reading") -> Iterator[tuple[int, bytes]]:
    """``(1-based line number, bytes)`` of each non-blank line, read in binary, streaming.

    Args:
        path: the file.
        digest: a ``hashlib`` object fed every byte of the file on the way (blank lines too).
        phase: names the reading in the progress lines of a big file (:class:`PhaseProgress`).
    """
    # reading a big file is a long phase: the daemon must not see a stall, and the log shows it move
    progress = PhaseProgress(f"{phase} {path.name}", path.stat().st_size, "MB")

    def on_read(chunk: bytes) -> None:  # the bytes as stored: a compressed file's hash is of the file as dropped
        progress.advance(len(chunk))
        if digest is not None:
            digest.update(chunk)

    with open_content(path, on_read) as content:
        for number, raw in enumerate(content, start=1):
            mark_progress()  # per line, not per chunk read: a slow parse of a chunk's lines is work going on
            raw = raw.rstrip(b"\r\n")
            if raw.strip():
                yield number, raw


def scan_jsonl(path: str | Path, text_field: str = "text", strict: bool = False) -> FileScan:
    """Read a JSONL file once: hash it, find its shape, count and name malformed lines.

    Args:
        path: the file.
        text_field: key of language-modeling documents.
        strict: fail on the first malformed line instead of skipping it.

    Returns:
        The report; malformed lines are logged as one warning naming their numbers.

    Raises:
        DatasetError: the file is missing, not a regular file, binary, empty, damaged
            compressed data, has no usable line, or (with ``strict``) has a malformed line.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    with open_content(path) as content:  # a gzip or zstd file is sniffed in its content
        head = content.read(BINARY_SNIFF_BYTES)
    if b"\x00" in head:
        expected = "expected UTF-8 JSON lines, plain or compressed with gzip or zstd"
        raise DatasetError(f"{path.name}: looks like a binary file (NUL bytes); {expected}")
    digest = hashlib.sha256()
    shape: str | None = None
    usable = bad = 0
    first_bad: list[tuple[int, str]] = []
    for number, raw in _iter_lines(path, digest, "scanning"):
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
    report = FileScan(path, digest.hexdigest(), path.stat().st_size, shape or "text", usable, bad, first_bad)
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
    for _, raw in _iter_lines(Path(path), digest, "parsing"):
        try:
            line_shape, record = parse_line(raw, text_field)
        except _BadLine:
            continue
        if line_shape == shape:
            yield record
    if digest.hexdigest() != sha256:
        raise DatasetError(f"{Path(path).name} {CHANGED_WHILE_READ}")


def iter_records(scan: FileScan, text_field: str = "text") -> Iterator[dict[str, Any]]:
    """The normalized records of a scanned file, streamed without a cache (small files, e.g. evaluation sets).

    Raises:
        DatasetError: the file changed since the scan (checked once the last line is read).
    """
    return _generate_records(str(scan.path), text_field, scan.shape, scan.sha256)


def load_records(scan: FileScan, data_args: DataArguments) -> datasets.Dataset:
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
        "path": str(scan.path),
        "text_field": data_args.text_field,
        "shape": scan.shape,
        "sha256": scan.sha256,
    }
    try:
        return datasets.Dataset.from_generator(
            _generate_records,
            gen_kwargs=gen_kwargs,
            cache_dir=data_args.dataset_cache_dir,
            fingerprint=f"{scan.shape}-{data_args.text_field}-{scan.sha256}-rules{PARSE_RULES_VERSION}",
        )
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, DatasetError):
            cause = cause.__cause__
        if isinstance(cause, DatasetError):
            raise cause from e
        raise


def iter_text(records: datasets.Dataset, shape: str, max_bytes: int, batch_size: int = 1000) -> Iterator[str]:
    """Plain text of the records, up to about ``max_bytes`` (for training the bootstrap tokenizer).

    A long text comes in pieces (:func:`daemon.store.documents.split_document`): the tokenizer trainer's
    memory grows with the longest text it is given, to many times its size (BENCHMARKS.md). For its byte-level
    pre-tokenizer the pieces hold the same words as the whole text, so they train the same tokenizer.
    """
    seen = 0
    for batch in records.iter(batch_size=batch_size):
        if shape == "text":
            texts = batch["text"]
        elif shape == "prompt_completion":
            texts = [p + c for p, c in zip(batch["prompt"], batch["completion"], strict=True)]
        else:
            texts = ["\n".join(m["content"] for m in conv) for conv in batch["messages"]]
        for text in texts:
            for piece in documents.split_document(text, documents.PIECE_CHARS):
                yield piece
                seen += len(piece.encode("utf-8"))
                if seen >= max_bytes:
                    return
