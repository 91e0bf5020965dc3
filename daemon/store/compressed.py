"""Compressed drops: gzip and zstd files, recognised by their first bytes, read as their content.

People export data compressed (``x.jsonl.gz``, ``x.jsonl.zst``). A drop whose first bytes are
gzip's (``1f 8b``, RFC 1952 section 2.3.1) or a zstd frame's (``28 b5 2f fd``, RFC 8878
section 3.1.1) trains like the JSON lines it holds, whatever its name; any other file is read
as it is. The sha256 and exactly-once are of the file as dropped: :func:`open_content` hands
every byte read from the disk to the caller's hash, then the rest of the file once the content
has been read, so the daemon's hash at its claim and the training process's agree.

gzip through the standard library; zstd through the ``zstandard`` package (imported only
when a zstd file is read). Either decompresses as a stream: nothing is held whole in memory.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from daemon.exceptions import DatasetError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BUFFER_BYTES = 1 << 20
ZSTD_READ_BYTES = 4096


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def compression_of(head: bytes) -> str | None:
    """``"gzip"``, ``"zstd"`` or None (not compressed), from a file's first bytes (at least 4 of them)."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return None


class _Tap(io.RawIOBase):
    """A binary file read through, every chunk passed to ``on_read`` (a hash, a progress count)."""

    def __init__(self, f: BinaryIO, on_read: Callable[[bytes], None]) -> None:
        self._f, self._on_read = f, on_read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._f.read(len(buffer))
        buffer[: len(data)] = data
        if data:
            self._on_read(data)
        return len(data)


class _Decompressing(io.RawIOBase):
    """A decompressing stream whose errors on damaged data become one :class:`DatasetError` naming the file."""

    def __init__(self, stream: _Readable, name: str, kind: str, errors: tuple[type[BaseException], ...]) -> None:
        self._stream, self._name, self._kind, self._errors = stream, name, kind, errors

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        try:
            data = self._stream.read(len(buffer))
        except self._errors as e:
            raise DatasetError(
                f"{self._name}: damaged or truncated {self._kind} data ({e or type(e).__name__}); "
                "compress it again and drop the new file"
            ) from e
        buffer[: len(data)] = data
        return len(data)


class _ZstdFrames(io.RawIOBase):
    """The content of the zstd frames of ``raw``, one after another; a last frame cut short raises ``EOFError``.

    ``zstandard``'s ``stream_reader`` and ``read_to_iter`` end quietly at a truncated frame
    (a half-copied file would train on half its lines), so this feeds a ``decompressobj`` and
    checks that every frame reached its end. Input goes in :data:`ZSTD_READ_BYTES` at a time:
    the output of one call is at most that times zstd's largest expansion (a 4-byte RLE block
    gives 128 KiB, RFC 8878 section 3.1.1.2), which bounds the memory a hostile file can take.
    """

    def __init__(self, raw: _Readable) -> None:
        import zstandard

        self._raw, self._new = raw, zstandard.ZstdDecompressor().decompressobj
        self._frame: Any = None  # the decompressobj of the frame under way, None between frames
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            chunk = self._raw.read(ZSTD_READ_BYTES)
            if not chunk:
                if self._frame is not None:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self._pending = self._feed(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n], self._pending = self._pending[:n], self._pending[n:]
        return n

    def _feed(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            self._frame = self._frame or self._new()
            out.append(self._frame.decompress(chunk))
            chunk = b""
            if self._frame.eof:  # the frame is complete; what follows it starts the next one
                chunk, self._frame = self._frame.unused_data, None
        return b"".join(out)


def _decompressor(raw: io.BufferedIOBase, name: str, kind: str) -> io.RawIOBase:
    if kind == "gzip":
        stream = gzip.GzipFile(fileobj=raw, mode="rb")
        return _Decompressing(stream, name, kind, (gzip.BadGzipFile, EOFError, zlib.error))
    import zstandard

    return _Decompressing(_ZstdFrames(raw), name, kind, (zstandard.ZstdError, EOFError))


@contextmanager
def open_content(path: Path, on_read: Callable[[bytes], None] | None = None) -> Iterator[io.BufferedIOBase]:
    """A file's content, decompressed when it is gzip or zstd (by its first bytes), as a buffered binary stream.

    Args:
        path: the file.
        on_read: called with every chunk of the file's bytes as stored (compressed ones for a
            compressed file). When the block ends without an error, the bytes after the
            compressed content (if any) are read and passed too, so ``on_read`` has seen the
            whole file, in order.

    Yields:
        The content: iterate it for lines, or ``read`` it.

    Raises:
        OSError: the file cannot be opened or read.
        DatasetError: (while reading) the compressed data is damaged or truncated.
    """
    with open(path, "rb") as f:
        head = f.peek(4)[:4]
        tap: io.BufferedIOBase = io.BufferedReader(_Tap(f, on_read or (lambda _: None)), BUFFER_BYTES)
        kind = compression_of(head)
        content = tap if kind is None else io.BufferedReader(_decompressor(tap, path.name, kind), BUFFER_BYTES)
        yield content
        if on_read is not None:  # what the decompressor left unread: the hash is of the file as dropped
            for _ in iter(lambda: tap.read(BUFFER_BYTES), b""):
                pass
