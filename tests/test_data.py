"""Reading JSONL drops (daemon.store.jsonl) and turning them into examples (daemon.training.data): docs/data.md."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from helpers import stdlib_documents, write_jsonl

from daemon.config import DataArguments
from daemon.exceptions import DatasetError
from daemon.store.jsonl import DEFAULT_CHAT_TEMPLATE, MAX_JSON_DEPTH, load_records, parse_line, scan_jsonl
from daemon.training.data import PaddingCollator, heldout_size, prepare_datasets
from daemon.training.encoding import IGNORE_INDEX, tokenize


def _data_args(tmp_path, **kw) -> DataArguments:
    return DataArguments(dataset_cache_dir=str(tmp_path / "cache"), **kw)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"{not json", "bad JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"other": 1}', "no 'text'"),
        (b'{"text": 3}', "'text' is not a string"),
        (b'{"text": "  "}', "'text' is empty"),
        (b'{"prompt": "q"}', "'completion' is missing"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        (b'{"messages": [{"role": "user"}]}', "needs string 'role' and 'content'"),
        (b'{"text": "caf\xe9"}', "invalid UTF-8"),
    ],
)
def test_malformed_lines_are_rejected_with_their_reason(line, reason):
    with pytest.raises(ValueError, match=reason):
        parse_line(line, "text")


def test_the_text_field_is_configurable():
    assert parse_line(b'{"body": "hello"}', "body") == ("text", {"text": "hello"})


def test_scan_skips_and_names_malformed_lines(tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "mixed.jsonl", [{"text": "a"}, "{bad", "", {"text": "b"}, "[]", {"prompt": "p", "completion": "c"}]
    )
    report = scan_jsonl(path)
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()  # the daemon hashes the same way
    assert report.shape == "text"
    assert report.usable == 2
    assert report.bad_lines == 3
    assert [n for n, _ in report.first_bad] == [2, 5, 6]  # the blank line 3 is ignored, not counted
    assert "line 2 (bad JSON" in report.bad_summary()
    assert "line 6 (shape 'prompt_completion' differs" in report.bad_summary()
    assert "line 2" in caplog.text and "line 5" in caplog.text


def test_strict_fails_the_file_on_the_first_bad_line(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a"}, "{bad"])
    with pytest.raises(DatasetError, match=r"line 2: bad JSON.*--strict"):
        scan_jsonl(path, strict=True)


# Lines that get through `json.loads` (or crash it) but must not reach Arrow or the tokenizer:
# (good rows of the shape, the hostile line written verbatim, the reason in the report).
_DEEP = 100_000
_CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
_HOSTILE = {
    "deep-array": (
        [{"text": "first document"}, {"text": "second document"}],
        "[" * _DEEP + "]" * _DEEP,
        f"JSON nested deeper than {MAX_JSON_DEPTH} levels",
    ),
    "deep-text": (
        [{"text": "first document"}, {"text": "second document"}],
        '{"text": ' * _DEEP + '"x"' + "}" * _DEEP,
        f"JSON nested deeper than {MAX_JSON_DEPTH} levels",
    ),
    "surrogate-text": (
        [{"text": "first document"}, {"text": "second document"}],
        r'{"text": "\ud800"}',
        r"'text' has a lone surrogate \\ud800 at character 0, not encodable as UTF-8",
    ),
    "surrogate-prompt": (
        [{"prompt": "Q: 1+1?", "completion": " 2"}, {"prompt": "Q: 2+2?", "completion": " 4"}],
        r'{"prompt": "Q: \udfff?", "completion": " 3"}',
        r"'prompt' has a lone surrogate \\udfff at character 3, not encodable as UTF-8",
    ),
    "surrogate-completion": (
        [{"prompt": "Q: 1+1?", "completion": " 2"}, {"prompt": "Q: 2+2?", "completion": " 4"}],
        r'{"prompt": "Q: 3+3?", "completion": " 6 \ud83d"}',
        r"'completion' has a lone surrogate \\ud83d at character 3, not encodable as UTF-8",
    ),
    "surrogate-content": (
        [{"messages": _CHAT}, {"messages": [*_CHAT, {"role": "assistant", "content": "bye"}]}],
        r'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a\udc00b"}]}',
        r"'messages\[1\]\.content' has a lone surrogate \\udc00 at character 1, not encodable as UTF-8",
    ),
}


@pytest.mark.parametrize(("good", "hostile", "reason"), _HOSTILE.values(), ids=_HOSTILE.keys())
def test_a_hostile_line_is_skipped_and_its_neighbours_still_train(tmp_path, tokenizer, good, hostile, reason):
    path = write_jsonl(tmp_path / "hostile.jsonl", [good[0], hostile, good[1]])
    report = scan_jsonl(path)
    assert report.usable == 2
    assert report.bad_lines == 1
    [(number, why)] = report.first_bad
    assert number == 2
    assert re.fullmatch(reason, why)
    args = _data_args(tmp_path, max_seq_length=64)
    records = load_records(report, args)
    assert records.to_list() == good  # the generator drops exactly what the scan skipped
    data = prepare_datasets(records, report.shape, tokenizer, args, seed=0)
    assert data.examples == (1 if report.shape == "text" else 2)  # two short documents pack into one block
    assert data.tokens > 0


@pytest.mark.parametrize(("good", "hostile", "reason"), _HOSTILE.values(), ids=_HOSTILE.keys())
def test_strict_fails_the_file_on_a_hostile_line_in_one_line(tmp_path, good, hostile, reason):
    path = write_jsonl(tmp_path / "hostile.jsonl", [good[0], hostile, good[1]])
    with pytest.raises(DatasetError) as failure:
        scan_jsonl(path, strict=True)
    message = str(failure.value)
    assert re.fullmatch(rf"hostile\.jsonl: line 2: {reason} \(--strict\)", message)
    assert "\n" not in message


def test_nesting_up_to_the_limit_is_kept_and_one_level_more_is_not():
    def line(levels: int) -> bytes:  # the object itself is the first level
        return ('{"text": "a", "meta": ' + "[" * (levels - 1) + "]" * (levels - 1) + "}").encode()

    assert parse_line(line(MAX_JSON_DEPTH), "text") == ("text", {"text": "a"})
    with pytest.raises(ValueError, match=f"nested deeper than {MAX_JSON_DEPTH} levels"):
        parse_line(line(MAX_JSON_DEPTH + 1), "text")


def test_the_nesting_verdict_does_not_depend_on_the_callers_stack():
    # json.loads recurses against the interpreter's recursion limit, shared with the caller's
    # frames: without a fixed limit this line parses at the top and fails 200 frames down.
    line = ('{"text": "a", "meta": ' + "[" * 900 + "]" * 900 + "}").encode()

    def verdict(frames_below: int) -> str:
        if frames_below:
            return verdict(frames_below - 1)
        try:
            return parse_line(line, "text")[0]
        except ValueError as e:
            return str(e)

    assert verdict(0) == verdict(200) == f"JSON nested deeper than {MAX_JSON_DEPTH} levels"


def test_an_escaped_surrogate_pair_is_one_valid_character():
    # json.dumps writes the emoji as the pair \ud83d\ude00, which json.loads joins back into one code point
    assert parse_line(json.dumps({"text": "smile \U0001f600"}).encode(), "text") == (
        "text",
        {"text": "smile \U0001f600"},
    )


@pytest.mark.parametrize("first", ["", "\U0001f600"], ids=["ascii", "emoji: 4 bytes a character"])
def test_parsing_one_long_line_holds_the_line_and_its_document_and_no_other_copy(first):
    import sys
    import tracemalloc

    text = first + "\n".join(stdlib_documents(limit=10_000)) * 40  # about 2 MB
    raw = json.dumps({"text": text}).encode()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        _, record = parse_line(raw, "text")
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert record["text"] == text
    assert peak < 1.25 * (len(raw) + sys.getsizeof(text))  # the decoded line and the document; no copy of either


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"\n  \n", "empty"),
        (b"{bad\n[1]\n", "no usable examples, all 2 lines malformed: line 1"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00IHDR", "binary"),
        ('{"text": "caf\u00e9"}\n'.encode("latin-1"), "line 1 \\(invalid UTF-8"),
    ],
    ids=["empty", "blank", "all-bad", "binary", "latin-1"],
)
def test_files_without_usable_examples_fail_with_a_reason(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        scan_jsonl(path)


def test_a_long_scan_parse_and_tokenization_log_their_progress(tmp_path, tokenizer, monkeypatch, caplog):
    import logging

    import daemon.store.status

    monkeypatch.setattr(daemon.store.status, "PROGRESS_EVERY_SECONDS", 0.0)  # a line at every step, as a big file's
    docs = [{"text": f"x = {i}\n" * 50} for i in range(30)]
    path = write_jsonl(tmp_path / "big.jsonl", docs)
    args = _data_args(tmp_path, max_seq_length=16, preprocessing_batch_size=10)
    with caplog.at_level(logging.INFO, logger="daemon.store.status"):
        report = scan_jsonl(path)
        tokenize(load_records(report, args), report.shape, tokenizer, args)
    lines = [r.getMessage() for r in caplog.records if r.name == "daemon.store.status"]
    size = path.stat().st_size / 2**20
    assert any(line.startswith(f"scanning big.jsonl: {size:.1f} of {size:.1f} MB (100%)") for line in lines)
    assert any(line.startswith(f"parsing big.jsonl: {size:.1f} of {size:.1f} MB (100%)") for line in lines)
    tokenizing = [line.split(",")[0] for line in lines if line.startswith("tokenizing (text)")]
    assert tokenizing == [f"tokenizing (text): {n} of 30 records ({p}%)" for n, p in ((10, 33), (20, 67), (30, 100))]


def test_a_short_phase_logs_no_progress(tmp_path, caplog):
    import logging

    path = write_jsonl(tmp_path / "small.jsonl", [{"text": "x = 1\n"}])
    with caplog.at_level(logging.INFO, logger="daemon.store.status"):
        scan_jsonl(path)
    assert not [r for r in caplog.records if r.name == "daemon.store.status"]  # under 10 s: silent


def test_example_lengths_follow_a_shuffle_and_a_split_and_count_the_trained_tokens(tmp_path, tokenizer):
    from daemon.training.data import example_lengths

    docs = [{"text": f"x = {i}\n" * (i % 7 + 1)} for i in range(60)]
    path = write_jsonl(tmp_path / "t.jsonl", docs)
    args = _data_args(tmp_path, max_seq_length=8, eval_fraction=0.2, min_train_examples_for_eval=2)
    report = scan_jsonl(path)
    data = prepare_datasets(load_records(report, args), report.shape, tokenizer, args, seed=3)
    assert data.eval is not None  # a split: both sides read through an indices mapping
    for rows in (data.train, data.eval, data.train.shuffle(seed=1), data.train.select([5, 2, 2])):
        assert example_lengths(rows).tolist() == [len(r["input_ids"]) for r in rows.with_format(None)]
    assert data.tokens == sum(len(r["input_ids"]) for r in data.train.with_format(None))


def test_text_is_packed_into_blocks_with_eos_between_documents(tmp_path, tokenizer):
    docs = ["def a():\n    return 1\n", "import os\n", "x = [1, 2, 3]\n" * 5]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in docs])
    args = _data_args(tmp_path, max_seq_length=16)
    report = scan_jsonl(path)
    rows = tokenize(load_records(report, args), report.shape, tokenizer, args)
    stream = [t for r in rows for t in r["input_ids"]]
    expected = []
    for d in docs:
        expected += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert stream == expected
    assert all(len(r["input_ids"]) == 16 for r in list(rows)[:-1])
    assert 0 < len(rows[-1]["input_ids"]) <= 16  # the last partial block is kept
    assert all(r["labels"] is None for r in rows)  # every token is learned: the ids are stored once
    batch = PaddingCollator.for_tokenizer(tokenizer)(list(rows.with_format("torch")))
    learned = batch["labels"][batch["labels"] != IGNORE_INDEX]
    assert learned.tolist() == expected  # the collator learns each token of the stream


def test_a_long_document_is_tokenized_in_pieces_and_packed_into_the_blocks_of_the_whole_document(
    tmp_path, tokenizer, monkeypatch
):
    import daemon.store.documents
    import daemon.training.encoding

    monkeypatch.setattr(daemon.store.documents, "PIECE_CHARS", 4096)
    monkeypatch.setattr(daemon.training.encoding, "ENCODE_CHUNK_CHARS", 32768)
    calls: list[int] = []  # characters given to the tokenizer in each call
    token_ids = daemon.training.encoding._token_ids
    monkeypatch.setattr(
        daemon.training.encoding,
        "_token_ids",
        lambda tok, texts: calls.append(sum(map(len, texts))) or token_ids(tok, texts),
    )
    long = "\n".join(f"# copy {n}\n" + "".join(stdlib_documents(limit=1000)) for n in range(20))  # about 1 MB
    docs = ["import os\n", long, "x = [1, 2, 3]\n"]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in docs])
    args = _data_args(tmp_path, max_seq_length=64)
    report = scan_jsonl(path)
    rows = tokenize(load_records(report, args), report.shape, tokenizer, args).with_format(None)
    assert max(calls) <= 32768 and len(calls) >= len(long) // 32768  # never the whole document at once
    stream = [t for d in docs for t in [*tokenizer(d, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]]
    assert rows["input_ids"] == [stream[i : i + 64] for i in range(0, len(stream), 64)]  # the whole document's blocks


def test_replayed_examples_keep_their_masks_in_a_packed_file_and_the_file_learns_every_token(tmp_path, tokenizer):
    from daemon.training.data import mix_replay, replay_examples

    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x = [1, 2, 3]\n" * 4}])
    args = _data_args(tmp_path, max_seq_length=8)
    report = scan_jsonl(path)
    data = prepare_datasets(load_records(report, args), report.shape, tokenizer, args, seed=0)
    masked = {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}
    mixed = mix_replay(data, [masked, {"input_ids": [8, 9]}], seed=0)
    rows = list(mixed.train.with_format("torch"))
    collate = PaddingCollator.for_tokenizer(tokenizer)
    by_ids = {tuple(r["input_ids"].tolist()): collate([r])["labels"][0].tolist() for r in rows}
    assert by_ids.pop((5, 6, 7)) == masked["labels"]
    assert by_ids.pop((8, 9)) == [8, 9]
    assert by_ids and all(labels == list(ids) for ids, labels in by_ids.items())  # the file's own blocks
    assert (mixed.tokens, mixed.replayed_tokens) == (data.tokens, 3 + 2)  # the file's own, and the replay's beside
    own = replay_examples(mixed.own, list(range(mixed.examples)))
    assert all(set(e) == {"input_ids"} for e in own)  # stored as "every token learned"


def test_prompt_tokens_are_masked_out_of_the_labels(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: 1+1?\nA:", "completion": " 2"}])
    args = _data_args(tmp_path, max_seq_length=64)
    report = scan_jsonl(path)
    row = tokenize(load_records(report, args), report.shape, tokenizer, args)[0]
    n_prompt = len(tokenizer("Q: 1+1?\nA:")["input_ids"])
    completion = tokenizer(" 2", add_special_tokens=False)["input_ids"]
    assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert row["labels"][n_prompt:] == completion + [tokenizer.eos_token_id]
    assert row["input_ids"][n_prompt:] == completion + [tokenizer.eos_token_id]


def test_only_assistant_turns_are_learned_in_conversations(tmp_path, tokenizer):
    messages = [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": messages}])
    args = _data_args(tmp_path, max_seq_length=256)
    report = scan_jsonl(path)
    row = tokenize(load_records(report, args), report.shape, tokenizer, args)[0]
    learned = tokenizer.decode(
        [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != IGNORE_INDEX]
    )
    assert learned == "hi<|im_end|>\nciao<|im_end|>\n"
    masked = tokenizer.decode(
        [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab == IGNORE_INDEX]
    )
    assert "hello there" in masked and "bye" in masked and "<|im_start|>assistant" in masked


def test_a_tokenizer_without_chat_template_gets_the_documented_default(tokenizer):
    from daemon.training.encoding import chat_template_of

    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    assert chat_template_of(bare) == DEFAULT_CHAT_TEMPLATE


def test_examples_with_no_learnable_token_after_truncation_are_dropped(tmp_path, tokenizer):
    rows = [{"prompt": "long prompt " * 40, "completion": " x"}, {"prompt": "short", "completion": " y"}]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    args = _data_args(tmp_path, max_seq_length=16, min_train_examples_for_eval=100)
    report = scan_jsonl(path)
    data = prepare_datasets(load_records(report, args), report.shape, tokenizer, args, seed=0)
    assert data.examples == 1
    assert data.dropped == 1


def test_heldout_slice_is_small_bounded_and_absent_for_small_files():
    args = DataArguments(eval_fraction=0.05, max_eval_examples=64, min_train_examples_for_eval=16)
    assert heldout_size(10, args) == 0
    assert heldout_size(100, args) == 5
    assert heldout_size(10_000, args) == 64


def test_split_and_order_are_reproducible_with_the_seed(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in stdlib_documents(limit=40)])
    args = _data_args(tmp_path, max_seq_length=32)
    report = scan_jsonl(path)
    a = prepare_datasets(load_records(report, args), report.shape, tokenizer, args, seed=3)
    b = prepare_datasets(load_records(report, args), report.shape, tokenizer, args, seed=3)
    assert a.train["input_ids"][:5] == b.train["input_ids"][:5]
    assert a.eval is not None and a.eval_examples > 0
    assert a.examples + a.eval_examples == tokenize(load_records(report, args), "text", tokenizer, args).num_rows


def test_tokenization_is_cached_by_content_not_by_path_or_checkpoint(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    rows = [{"text": d} for d in stdlib_documents(limit=20)]
    first, copy = write_jsonl(tmp_path / "a.jsonl", rows), write_jsonl(tmp_path / "renamed.jsonl", rows)
    tokenizer.save_pretrained(tmp_path / "checkpoint-7")  # the same tokenizer, loaded from another directory
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "checkpoint-7")
    args = _data_args(tmp_path, max_seq_length=32)

    def cache_files(path, tok, data_args):
        report = scan_jsonl(path)
        return [f["filename"] for f in tokenize(load_records(report, data_args), "text", tok, data_args).cache_files]

    original = cache_files(first, tokenizer, args)
    assert cache_files(copy, reloaded, args) == original
    assert cache_files(copy, reloaded, _data_args(tmp_path, max_seq_length=16)) != original
    write_jsonl(copy, rows[:-1])
    assert cache_files(copy, reloaded, args) != original


def test_a_file_that_changes_between_the_scan_and_the_read_fails_instead_of_training_other_content(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in stdlib_documents(limit=6)])
    report = scan_jsonl(path)
    with open(path, "a", encoding="utf-8") as f:  # a writer that paused past the settle time goes on
        f.write('{"text": "written after the claim"}\n')
    with pytest.raises(DatasetError, match="changed while it was being read.*rename it into the inbox"):
        load_records(report, _data_args(tmp_path))


def test_the_heldout_slice_is_kept_as_raw_records_of_the_files_shape(tmp_path, tokenizer):
    args = _data_args(tmp_path, eval_fraction=0.25, min_train_examples_for_eval=1, max_seq_length=64)
    rows = [{"prompt": f"Q{i}: what is {i} squared?\nA:", "completion": f" {i * i}"} for i in range(40)]
    report = scan_jsonl(write_jsonl(tmp_path / "pc.jsonl", rows))
    data = prepare_datasets(load_records(report, args), report.shape, tokenizer, args, seed=0)
    assert data.eval is not None and len(data.heldout_records) == data.eval_examples == 10
    eos = [tokenizer.eos_token_id]
    encoded = [tokenizer(r["prompt"])["input_ids"] + tokenizer(r["completion"])["input_ids"] + eos for r in rows]
    heldout = [rows.index(r) for r in data.heldout_records]  # each is one of the file's records, as written
    assert sorted(map(tuple, data.eval["input_ids"])) == sorted(tuple(encoded[i]) for i in heldout)
    assert "record" not in data.train.column_names  # training rows are as before

    docs = stdlib_documents(limit=30)
    report = scan_jsonl(write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in docs]))
    data = prepare_datasets(load_records(report, args), "text", tokenizer, args, seed=0)
    assert data.heldout_records and len(data.heldout_records) >= data.eval_examples
    assert all(any(r["text"] in d for d in docs) for r in data.heldout_records)  # pieces of the documents, exact


def test_the_collator_right_pads_without_a_mask_and_pads_rows_on_request():
    import torch
    from transformers import DataCollatorForSeq2Seq

    from daemon.training.data import PaddingCollator
    from daemon.training.model import train_tokenizer

    tokenizer = train_tokenizer(stdlib_documents(limit=20), vocab_size=300)
    collate = PaddingCollator.for_tokenizer(tokenizer)
    short = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate([{k: torch.tensor(v) for k, v in row.items()} for row in short])  # torch format
    pad = tokenizer.pad_token_id
    assert sorted(batch) == ["input_ids", "labels"]  # right padding in a causal model: nothing to mask
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    reference = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)(short)
    assert all(torch.equal(batch[key], reference[key]) for key in batch)  # the collator it replaces
    four = PaddingCollator.for_tokenizer(tokenizer, rows=4)(short)
    assert four["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad], [pad] * 3, [pad] * 3]
    assert four["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [-100] * 3, [-100] * 3]


def test_a_right_padded_batch_without_a_mask_has_the_masked_batchs_loss_and_gradients(tokenizer):
    import torch
    from helpers import tiny_model

    from daemon.training.data import PaddingCollator

    rows = [{"input_ids": list(range(5, 17))}, {"input_ids": [20, 21, 22]}, {"input_ids": [30, 31, 32, 33, 34]}]
    batch = PaddingCollator.for_tokenizer(tokenizer, rows=4)(rows)  # a padded row, like a file's last micro-batch
    lengths = torch.tensor([len(r["input_ids"]) for r in rows] + [0])
    mask = (torch.arange(batch["input_ids"].shape[1])[None, :] < lengths[:, None]).long()

    def loss_and_grads(**inputs):
        model = tiny_model(len(tokenizer), seed=3)
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads(**batch)
    masked_loss, masked_grads = loss_and_grads(**batch, attention_mask=mask)
    other_loss, _ = loss_and_grads(**PaddingCollator.for_tokenizer(tokenizer)(rows[:1]))
    assert torch.allclose(loss, masked_loss, atol=1e-6)
    assert all(torch.allclose(g, m, atol=1e-6) for g, m in zip(grads, masked_grads, strict=True))
    assert not torch.allclose(loss, other_loss)  # the comparison can fail: another batch differs


def test_a_compiled_model_sees_one_shape_through_short_rows_and_a_files_smaller_last_micro_batch(tokenizer):
    import torch
    from helpers import tiny_model
    from transformers import TrainingArguments

    from daemon.training.data import PaddingCollator

    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=3, torch_compile=True, use_cpu=True)
    collate = PaddingCollator.for_training(tokenizer, args, grad_workers=0)
    full = [{"input_ids": list(range(5, 13))}] * 3
    with_short = [*full[:2], {"input_ids": [5, 6]}]  # a packed file's short last block of a map batch
    last = full[:1]  # the file's last micro-batch: one example
    model = torch.compile(tiny_model(len(tokenizer)), backend="eager")  # dynamo's guards, no inductor
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for examples in (full, with_short, last):
            model(**collate(examples)).loss.backward()  # a recompile raises
    assert PaddingCollator.for_training(tokenizer, args, grad_workers=2).rows is None  # workers: own rows


def _padded_tokens(lengths: list[int], order: list[int], batch: int) -> int:
    """Tokens a right-padding collator adds over ``order`` cut into micro-batches of ``batch``."""
    chunks = [[lengths[i] for i in order[k : k + batch]] for k in range(0, len(order), batch)]
    return sum(max(c) * len(c) - sum(c) for c in chunks)


def test_length_grouping_batches_short_examples_together_in_a_seeded_order():
    """Rehearsed chat turns (~90 tokens) drawn beside 256-token blocks were each padded to a whole block."""
    import random

    import datasets

    from daemon.training.data import length_grouped

    rng = random.Random(0)
    lengths = [256] * 160 + [rng.randint(40, 120) for _ in range(40)]
    rng.shuffle(lengths)
    rows = datasets.Dataset.from_dict({"length": lengths}).shuffle(seed=3)  # through an indices mapping
    shuffled = list(range(rows.num_rows))
    order = length_grouped(rows, 8, seed=7)
    assert sorted(order) == shuffled and order == length_grouped(rows, 8, seed=7) != length_grouped(rows, 8, seed=8)
    seen = rows["length"]
    # Grouped, the 40 short examples pad to far fewer tokens than in a shuffle
    assert _padded_tokens(seen, order, 8) < 0.5 * _padded_tokens(seen, shuffled, 8)
