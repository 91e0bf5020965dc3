"""One long document in pieces (daemon.store.documents): cut where the embedded tokenizer starts a word."""

from __future__ import annotations

import random

from helpers import stdlib_documents, write_jsonl

from daemon.config import DataArguments
from daemon.store.documents import split_document
from daemon.store.jsonl import iter_text, load_records, scan_jsonl
from daemon.training.model import train_tokenizer


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


def _tricky_text(words: int, seed: int = 0) -> str:
    """Words of letters (any script), digits, punctuation and contractions between whitespace of many kinds.

    Every other separator ends in a space or a newline, so a valid cut lies within every 24 characters.
    """
    rng = random.Random(seed)
    vocabulary = ["def", "x1", "42", "It's", "we'll", "(a)", "==", "café", "Ωμέγα", "日本語", "😀", "-3.5", "_", "'s"]
    others = ["\t", "\u00a0", "\u3000", "\x1c", "\r\n\t", " \t", "\u2028"]  # whitespace, not a cut
    cuts = [" ", "  ", "\n", "\n\n", "\r\n", "\t ", " \n", "\n    ", "\u00a0 ", "\x1c\n"]
    return "".join(rng.choice(vocabulary) + rng.choice(cuts if i % 2 else others) for i in range(words))


def test_a_long_document_is_cut_only_where_the_embedded_tokenizer_starts_a_word(tokenizer):
    text = _tricky_text(3000)
    pieces = list(split_document(text, 24))
    assert "".join(pieces) == text
    assert len(pieces) > 300 and all(len(piece) <= 24 for piece in pieces)
    assert all(piece[0] in " \n" and not piece[1].isspace() for piece in pieces[1:])  # no forced cut here
    assert [token for piece in pieces for token in _ids(tokenizer, piece)] == _ids(tokenizer, text)


def test_a_document_that_fits_is_one_piece_and_a_stretch_without_whitespace_is_cut_at_the_size():
    text = "word " * 10
    assert list(split_document(text, len(text))) == [text]
    assert list(split_document("y" * 70, 30)) == ["y" * 30, "y" * 30, "y" * 10]
    assert list(split_document("ab cd" + "y" * 40, 30)) == ["ab", " cd" + "y" * 27, "y" * 13]


def test_the_bootstrap_tokenizer_trains_on_pieces_of_a_long_document_and_learns_the_same_vocabulary(
    tmp_path, monkeypatch
):
    import daemon.store.documents

    monkeypatch.setattr(daemon.store.documents, "PIECE_CHARS", 4096)
    text = "\n".join(f"# copy {n}\n" + "".join(stdlib_documents(limit=1000)) for n in range(4))
    path = write_jsonl(tmp_path / "one-line.jsonl", [{"text": text}])
    records = load_records(scan_jsonl(path), DataArguments(dataset_cache_dir=str(tmp_path / "cache")))
    pieces = list(iter_text(records, "text", max_bytes=10**9))
    assert "".join(pieces) == text and len(pieces) >= len(text) // 4096
    assert max(len(piece) for piece in pieces) <= 4096  # the trainer never holds the whole document
    whole, cut = train_tokenizer([text], vocab_size=500), train_tokenizer(pieces, vocab_size=500)
    assert cut.backend_tokenizer.to_str() == whole.backend_tokenizer.to_str()
    first = list(iter_text(records, "text", max_bytes=10_000))
    assert 10_000 <= sum(len(piece.encode("utf-8")) for piece in first) < 10_000 + 4096 * 4  # UTF-8: <= 4 bytes
