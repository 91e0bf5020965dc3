"""One long document in pieces that tokenize as the whole (docs/speed.md "Big files stream").

A tokenizer's memory grows with the text it is given at once, to many times the text's size
for encoding it and for training the bootstrap tokenizer on it (BENCHMARKS.md, "Measurements
behind the code"). :func:`split_document`
cuts a document longer than :data:`PIECE_CHARS` where the embedded tokenizer starts a
word anyway, so :mod:`daemon.training.data` encodes it piece by piece (several pieces a call, on
every core) and :func:`daemon.store.jsonl.iter_text` gives the trainer the same words.
"""

from __future__ import annotations

from collections.abc import Iterator

# Characters of a piece: the tokenizer's objects for one (ids, strings, offsets) are a few MB,
# and :data:`daemon.training.encoding.ENCODE_CHUNK_CHARS` (2M characters a call) holds 8 of them.
PIECE_CHARS = 1 << 18


def split_document(text: str, max_chars: int) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``max_chars`` characters (``text`` itself when it fits).

    A piece ends before a space, else before a newline, that is followed by a non-whitespace
    character: there a GPT-2-style byte-level pre-tokenizer (the embedded tokenizer's,
    ``pre_tokenizers.ByteLevel``) always starts a new word, since none of its patterns
    (``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``)
    takes a whitespace character except as its first one or in a run that ``(?!\\S)`` ends
    before it, and none looks back. Its BPE merges within words, so the pieces' token ids,
    concatenated, are the whole text's. Other tokenizers may differ at a cut (e.g. a SentencePiece
    ``▁`` prepended to each piece). A stretch of ``max_chars`` without such a boundary is cut
    where it ends, and there the tokens may differ with any tokenizer.
    """
    assert max_chars >= 1, max_chars
    start = 0
    while len(text) - start > max_chars:
        end = _cut(text, start, start + max_chars)
        yield text[start:end]
        start = end
    yield text[start:] if start else text


def _cut(text: str, start: int, stop: int) -> int:
    """The last index in ``(start, stop)`` of a space (else a newline) followed by non-whitespace, else ``stop``.

    ``stop`` < ``len(text)``, so the character after any index found exists.
    """
    for boundary in (" ", "\n"):
        at = text.rfind(boundary, start + 1, stop)
        while at > start and text[at + 1].isspace():  # str.isspace covers the tokenizers' Unicode \s
            at = text.rfind(boundary, start + 1, at)
        if at > start:
            return at
    return stop
