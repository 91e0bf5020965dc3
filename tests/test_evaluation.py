"""The evaluation suite, forgetting matrix and quality gate.

daemon.store.suite, daemon.training.evaluation, daemon.quality.forgetting.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from pathlib import Path

import pytest
from helpers import TINY_CONFIG, Tree, daemon_argv, read_status, run_cli, stdlib_documents, train, write_jsonl

from daemon.config import EvaluationArguments
from daemon.exceptions import ConfigError, RegressionError
from daemon.quality.forgetting import build_matrix, format_figures, format_matrix, read_rows, write_rows
from daemon.store.records import HistoryRow, Outcome
from daemon.store.status import StatusFile, history_violations
from daemon.store.suite import EVAL_FILE, HELD_OUT, SUITE_DIR, Slice, subset
from daemon.training.evaluation import MIN_EXAMPLES, Scorer, SliceScore, evaluate_suite

GOLDEN = [
    {"prompt": f"Q: what does json.{name} do?\nA:", "completion": f" json.{name} {verb}."}
    for name, verb in [
        ("dumps", "serializes an object to a str"),
        ("loads", "parses a str into an object"),
        ("dump", "writes an object to a file"),
        ("load", "reads an object from a file"),
        ("JSONDecoder", "decodes JSON text"),
        ("JSONEncoder", "encodes Python objects"),
    ]
]
CHAT = [
    {
        "messages": [
            {"role": "user", "content": f"What is {i} + {i}?"},
            {"role": "assistant", "content": f"{i} + {i} is {2 * i}."},
        ]
    }
    for i in range(6)
]


def _text_file(path: Path, first: int, count: int = 12) -> Path:
    return write_jsonl(path, [{"text": d} for d in stdlib_documents(limit=first + count)[first:]])


def _noise_file(path: Path, count: int = 12) -> Path:
    rng = random.Random(0)
    return write_jsonl(path, [{"text": "".join(chr(rng.randint(33, 126)) for _ in range(600))} for _ in range(count)])


@pytest.fixture(scope="module")
def two_files(tmp_path_factory) -> Path:
    """A tree whose model was trained on two real files (json's sources), each leaving a held-out slice."""
    tree = Tree(tmp_path_factory.mktemp("two_files"))
    for folder in (tree.inbox, tree.status, tree.output):
        folder.mkdir()
    train(tree, _text_file(tree.root / "a.jsonl", 0))
    train(tree, _text_file(tree.root / "b.jsonl", 12))
    return tree.root


def _copy(source: Path, tmp_path: Path) -> Tree:
    shutil.copytree(source, tmp_path / "tree")
    return Tree(tmp_path / "tree")


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def test_three_files_fill_a_lower_triangular_matrix_with_the_eval_files_as_extra_columns(tree, capsys):
    from daemon.__main__ import main

    golden = write_jsonl(tree.root / "golden.jsonl", GOLDEN)
    chat = write_jsonl(tree.root / "chat.jsonl", CHAT)
    for n in range(3):
        row = train(tree, _text_file(tree.root / f"part{n}.jsonl", 12 * n), eval_files=[golden, chat])
        assert row["quality_gate"]["errors"] == [] and row["eval_seconds"] > 0

    rows = read_rows(tree.status)
    m = build_matrix(rows)
    assert [f["after_file"] for f in m.files] == ["part0.jsonl", "part1.jsonl", "part2.jsonl"]
    assert [s["kind"] for s in m.slices] == [HELD_OUT] * 3 + [EVAL_FILE] * 2
    assert [s["slice"] for s in m.slices[3:]] == ["eval:golden.jsonl", "eval:chat.jsonl"]
    for i, losses in enumerate(m.loss):  # held-out slice j is scored from its own file on: lower-triangular
        assert [loss is not None for loss in losses[:3]] == [j <= i for j in range(3)]
        assert all(loss is not None and loss > 0 for loss in losses[3:])
    assert all(m.change[j][j] == 0 for j in range(3))
    for name in {r["slice"] for r in rows}:  # the same subset every time: same examples -> same tokens, bytes
        seen = {(r["examples"], r["tokens"], r["bytes"]) for r in rows if r["slice"] == name}
        assert len({examples for examples, _, _ in seen}) == len(seen)
    history = tree.history()
    own = {r["step"]: r["loss"] for r in rows if r["slice"].startswith(f"{r['step']:08d}-")}
    assert [h["eval_loss"] for h in history] == [own[h["end_step"]] for h in history]

    status = read_status(tree)
    assert set(status["forgetting"]) == {"mean", "max", "worst_slice", "backward_transfer", "slices"}
    assert status["forgetting"]["backward_transfer"] == -status["forgetting"]["mean"]
    assert status["forgetting"]["slices"] == 2
    snapshot = json.loads(next((tree.status / "evolution").glob("*-part2/snapshot.json")).read_text())
    assert [r["slice"] for r in snapshot["evaluations"]] == [
        r["slice"] for r in rows if r["step"] == m.files[-1]["step"]
    ]
    assert snapshot["forgetting"] == status["forgetting"]
    assert len(list((tree.status / SUITE_DIR).glob("*.jsonl"))) == 3

    assert main(["status", "--json", "--status_dir", str(tree.status)]) == 0
    assert json.loads(capsys.readouterr().out)["matrix"] == m.as_dict()


def test_bits_per_byte_of_a_model_that_predicts_uniformly_is_log2_vocab_per_token_over_bytes():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from daemon.training.encoding import chat_template_of, tokenize
    from daemon.training.model import train_tokenizer

    tokenizer = train_tokenizer(stdlib_documents(limit=20), vocab_size=320)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, **TINY_CONFIG))
    torch.nn.init.zeros_(model.lm_head.weight)  # logits 0: every token costs ln(vocab) nats
    vocab = model.config.vocab_size
    scorer = Scorer(model, tokenizer, max_length=8, batch_size=3, autocast=None)  # windows of 8: long texts split
    texts = ["héllo wörld, ünïcode", "def f(x):\n    return x * 2\n"]

    def score(shape: str, records: list[dict]) -> dict:
        result = SliceScore("s", HELD_OUT)
        scorer.score(Slice("s", HELD_OUT, shape, records), 0, len(records), result)
        return result.as_row(1, "f.jsonl", "0" * 64)

    row = score("text", [{"text": t} for t in texts])
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)  # + closing EOS
    utf8_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert (row["examples"], row["tokens"], row["bytes"]) == (2, tokens, utf8_bytes)
    assert row["loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert row["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert row["bits_per_byte"] == pytest.approx(tokens * math.log(vocab) / (math.log(2) * utf8_bytes), rel=1e-6)

    pc = score("prompt_completion", [{"prompt": "Q: 2+2?\nA:", "completion": " four ✓"}])
    assert pc["bytes"] == len(" four ✓".encode())
    assert pc["tokens"] == len(tokenizer(" four ✓", add_special_tokens=False)["input_ids"]) + 1

    import datasets

    from daemon.config import DataArguments

    chat = score("messages", CHAT[:2])  # learned tokens: as training learns them (assistant turns only)
    trained = tokenize(datasets.Dataset.from_list(CHAT[:2]), "messages", tokenizer, DataArguments(max_seq_length=512))
    assert chat["tokens"] == sum(sum(label != -100 for label in labels) for labels in trained["labels"])
    assert chat_template_of(tokenizer)  # the default ChatML renders the turns whose bytes are counted
    assert chat["bits_per_byte"] == pytest.approx(chat["tokens"] * math.log2(vocab) / chat["bytes"], rel=1e-6)


def test_windows_are_batched_by_length_and_the_scores_do_not_depend_on_the_batches(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from daemon.training.model import train_tokenizer

    tokenizer = train_tokenizer(stdlib_documents(limit=20), vocab_size=320)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **TINY_CONFIG))
    texts = ["def f(x):\n    return x * 2\n", "a", "héllo wörld, ünïcode"]  # windows of 8 and short ones
    records = [{"text": t} for t in texts]
    piece = Slice("s", HELD_OUT, "text", records)
    batches: list[list[int]] = []
    forward = Scorer._forward

    def recording(self, batch, into):
        batches.append([len(ids) for ids, _, _ in batch])
        forward(self, batch, into)

    monkeypatch.setattr(Scorer, "_forward", recording)
    one_by_one, grouped = SliceScore("s", HELD_OUT), SliceScore("s", HELD_OUT)
    Scorer(model, tokenizer, max_length=8, batch_size=1, autocast=None).score(piece, 0, len(records), one_by_one)
    batches.clear()
    Scorer(model, tokenizer, max_length=8, batch_size=8, autocast=None).score(piece, 0, len(records), grouped)
    lengths = [n for batch in batches for n in batch]
    assert max(lengths) == 8 and 2 * min(lengths) <= 8  # mixed: batched in order, short ones would be padded
    assert all(2 * n > max(batch) for batch in batches for n in batch), batches  # no window padded to twice its length
    assert grouped.example_tokens == one_by_one.example_tokens
    assert grouped.example_nats == pytest.approx(one_by_one.example_nats, rel=1e-5)
    monkeypatch.setattr("daemon.training.evaluation.SORTED_WINDOWS", 2)  # sorted a few at a time: the same scores
    bounded = SliceScore("s", HELD_OUT)
    Scorer(model, tokenizer, max_length=8, batch_size=8, autocast=None).score(piece, 0, len(records), bounded)
    assert bounded.example_nats == pytest.approx(one_by_one.example_nats, rel=1e-5)


class _Recorder:
    """A scorer that records which records it scored (one learned token each)."""

    def __init__(self) -> None:
        self.scored: list[int] = []

    def score(self, piece: Slice, start: int, stop: int, into: SliceScore) -> None:
        for record in piece.records[start:stop]:
            self.scored.append(record["i"])
            into.example_nats.append(1.0)
            into.example_tokens.append(1)


def test_the_same_subset_is_scored_after_every_file_and_a_smaller_budget_scores_a_prefix_of_it():
    assert subset(range(100), 10) == subset(range(100), 20)[:10] == subset(iter(range(100)), 10)
    assert sorted(subset(range(100))) == list(range(100)) and subset(range(100))[:5] != list(range(5))

    def scored(budget: float) -> list[int]:
        records = subset({"i": i} for i in range(50))
        recorder = _Recorder()
        evaluate_suite(recorder, None, [Slice("s", HELD_OUT, "text", records)], budget)  # type: ignore[arg-type]
        return recorder.scored

    small, large = scored(0.0), scored(1e9)
    assert len(small) == MIN_EXAMPLES and len(large) == 50
    assert small == large[:MIN_EXAMPLES] == scored(0.0)  # the same examples, and a prefix of the larger subset
    assert large == scored(1e9)


def test_a_slice_named_whole_is_scored_whole_whatever_the_budget():
    """The base-model slice was read on one example of 24 after SmolLM2's short files: no measure of drift."""
    slices = [Slice(name, HELD_OUT, "text", [{"i": i} for i in range(24)]) for name in ("00000000-base-model", "b")]
    recorder = _Recorder()
    result = evaluate_suite(recorder, None, slices, 0.0, frozenset({"00000000-base-model"}))  # type: ignore[arg-type]
    assert recorder.scored == list(range(24)) + list(range(MIN_EXAMPLES))  # the base slice whole, the other its least
    assert [s.examples for s in result.scores] == [24, MIN_EXAMPLES]


def test_a_noise_file_after_two_real_files_is_rolled_back_to_its_start_checkpoint(two_files, tmp_path):
    tree = _copy(two_files, tmp_path)
    start = tree.history()[-1]["end_step"]
    checkpoint = tree.output / f"checkpoint-{start}"
    before = (checkpoint / "model.safetensors").read_bytes()

    # Without replay, as below: the embedded model's default replay of a and b (weighted, distilled) and the noise
    # file's own rows distilled toward b's end hold the earlier slices within about 0.04 nats of their scores.
    noise = _noise_file(tree.root / "noise.jsonl")
    with pytest.raises(RegressionError, match=r"rose by .* nats .*worst slice 0000\d+-[ab]"):
        train(tree, noise, max_regression=0.05, on_regression="rollback", replay_fraction=0)

    failed = tree.history()[-1]
    assert (failed["file"], failed["outcome"]) == ("noise.jsonl", Outcome.FAILED)
    assert "quality gate" in failed["error"] and failed["quality_gate"]["worst_slice"] in failed["error"]
    gate = failed["quality_gate"]
    assert gate["exceeded"] and gate["action"] == "rollback" and gate["slices"] == 2
    assert gate["regression"] > 0.05 and gate["worst_change"] >= gate["regression"]  # the earlier slices' loss rose
    assert sorted(p.name for p in tree.output.glob("checkpoint-*") if int(p.name.split("-")[1]) > start) == []
    assert (checkpoint / "model.safetensors").read_bytes() == before
    export, saved = _weights(tree.output), _weights(checkpoint)
    assert export.keys() == saved.keys() and all(export[k].equal(saved[k]) for k in saved)  # bitwise
    assert json.loads((tree.output / "export.json").read_text())["global_step"] == start
    assert max(r["step"] for r in read_rows(tree.status)) == start  # no evaluation of the undone model
    assert len(list((tree.status / SUITE_DIR).glob("*.jsonl"))) == 2

    after = train(tree, _text_file(tree.root / "c.jsonl", 24))
    assert after["start_step"] == start
    assert history_violations([r for r in tree.history() if r["outcome"] == Outcome.DONE]) == []


def test_with_warn_the_noise_file_is_kept_and_the_regression_recorded(two_files, tmp_path, caplog):
    tree = _copy(two_files, tmp_path)
    with caplog.at_level(logging.WARNING, logger="daemon.training.evaluation"):
        # Without replay: the embedded model's default replay of a and b (weighted in the loss) kept their
        # slices below their first scores through the noise (forgetting < 0), though the gate saw the rise.
        row = train(tree, _noise_file(tree.root / "noise.jsonl"), max_regression=0.05, replay_fraction=0)
    assert row["outcome"] == Outcome.DONE
    gate = row["quality_gate"]
    assert gate["exceeded"] and gate["action"] == "warn" and gate["regression"] > 0.05
    assert read_status(tree)["quality_gate"] == gate
    snapshot = json.loads(next((tree.status / "evolution").glob("*-noise/snapshot.json")).read_text())
    assert snapshot["quality_gate"] == gate
    warning = next(r.getMessage() for r in caplog.records if "quality gate" in r.getMessage())
    assert warning.startswith("noise.jsonl: ") and gate["worst_slice"] in warning and "kept" in warning
    assert read_status(tree)["forgetting"]["mean"] > 0  # the earlier slices were forgotten


def test_a_slice_that_cannot_be_scored_is_reported_and_the_gate_warns_instead_of_failing_the_file(
    two_files, tmp_path, monkeypatch
):
    tree = _copy(two_files, tmp_path)
    unreadable = tree.root / "binary.jsonl"
    unreadable.write_bytes(b"\x00\x01 not json")
    original = Scorer.score

    def broken(self, piece, start, stop, into):
        if piece.name.endswith("-a"):
            raise RuntimeError("scoring broke")
        return original(self, piece, start, stop, into)

    monkeypatch.setattr(Scorer, "score", broken)
    row = train(
        tree,
        _text_file(tree.root / "c.jsonl", 24),
        eval_files=[unreadable],
        max_regression=0.0,
        on_regression="rollback",
    )
    assert row["outcome"] == Outcome.DONE  # never a crash of the file, never a rollback on partial evidence
    gate = row["quality_gate"]
    assert gate["action"] == "warn"
    first = next(r for r in tree.history() if r["file"] == "a.jsonl")
    assert {e["slice"] for e in gate["errors"]} == {"eval:binary.jsonl", f"{first['end_step']:08d}-a"}
    assert any("scoring broke" in e["error"] for e in gate["errors"])
    assert read_status(tree)["evaluation"]["errors"] == gate["errors"]


def test_the_daemon_files_a_rolled_back_drop_in_failed_with_the_regression_and_the_worst_slice(two_files, tmp_path):
    tree = _copy(two_files, tmp_path)
    _noise_file(tree.inbox / "noise.jsonl")
    # Without replay, as above: with it the earlier slices stay within about 0.04 nats through the noise
    argv = daemon_argv(tree, "--once", max_regression=0.05, on_regression="rollback", replay_fraction=0)
    result = run_cli(argv, cwd=tree.root)
    assert result.returncode == 0, result.stderr[-2000:]
    error = (tree.inbox / "failed" / "noise.jsonl.error.txt").read_text()
    assert "quality gate" in error and "worst slice" in error and "rolled back" in error
    assert (tree.inbox / "failed" / "noise.jsonl").is_file()
    assert read_status(tree)["global_step"] == tree.history()[-2]["end_step"]


def _fake_rows(files: int, evals: int) -> list[list[dict]]:
    """Row sets of ``files`` models over their held-out slices and ``evals`` eval files, as evaluate_file makes them."""
    sets = []
    for i in range(files):
        step = 1000 * (i + 1)
        names = [(f"{1000 * (j + 1):08d}-stdlib-drop-2026-11-{j:02d}", HELD_OUT) for j in range(i + 1)]
        names += [(f"eval:golden-set-number-{e}.jsonl", EVAL_FILE) for e in range(evals)]
        sets.append(
            [
                {
                    "step": step,
                    "after_file": f"stdlib-drop-2026-11-{i:02d}.jsonl",
                    "sha256": "0" * 64,
                    "slice": name,
                    "kind": kind,
                    "examples": 64,
                    "tokens": 4000,
                    "bytes": 9000,
                    "loss": 3.0 + 0.1 * i - 0.05 * j,
                    "perplexity": math.exp(3.0),
                    "bits_per_byte": 1.9,
                    "prefix_loss": {"64": 3.0 + 0.1 * i - 0.05 * j},
                }
                for j, (name, kind) in enumerate(names)
            ]
        )
    return sets


def test_the_status_summary_of_ten_files_fits_in_100_columns(tmp_path, capsys):
    from daemon.__main__ import main

    status = StatusFile(tmp_path)
    start = 0
    for rows in _fake_rows(10, evals=2):
        write_rows(tmp_path, start, rows)
        history = HistoryRow(
            file=rows[0]["after_file"],
            sha256="0" * 64,
            start_step=start,
            end_step=rows[0]["step"],
            planned_steps=rows[0]["step"] - start,
            examples=10_000,
            tokens=2_000_000,
            wall_seconds=600.0,
            train_seconds=550.0,
            train_loss=3.1,
            eval_loss=3.0,
            outcome=Outcome.DONE,
            error=None,
            finished_at="2026-11-22T00:00:00Z",
            eval_seconds=50.0,
        )
        status.record_outcome(history)
        start = rows[0]["step"]
    gate = {"max_regression": 0.1, "regression": 0.05, "slices": 11, "action": "none", "errors": []}
    gate |= {"worst_slice": "00001000-stdlib-drop-2026-11-00", "worst_change": 0.9, "exceeded": False}
    evaluation = {"slices": 12, "examples_per_slice": 64, "seconds": 50.0, "budget_seconds": 55.0, "errors": []}
    forgetting = {"mean": 0.45, "max": 0.9, "worst_slice": gate["worst_slice"], "backward_transfer": -0.45, "slices": 9}
    transfer = {"before_loss": 10.123, "after_loss": 2.071, "learned": 8.052, "forward_transfer": -1.793}
    transfer |= {"mean": -1.16, "files": 10}
    status.update(
        forgetting=forgetting, quality_gate=gate, evaluation=evaluation, forward_transfer=transfer, global_step=start
    )

    assert main(["status", "--status_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in out) <= 100, max(out, key=len)
    matrix = format_matrix(read_rows(tmp_path))
    assert len([line for line in matrix if "stdl~-11-" in line]) == 2 * 10  # every file, in both tables
    assert "not shown" not in "\n".join(matrix)  # 10 held-out slices and 2 eval files all fit
    assert all(line in out for line in matrix + format_figures(read_status_doc(tmp_path)))


def read_status_doc(status_dir: Path) -> dict:
    return json.loads((status_dir / "training_status.json").read_text())


def test_a_models_rows_replace_those_of_undone_models_above_the_files_start(tmp_path):
    sets = _fake_rows(3, evals=0)  # models at steps 1000, 2000, 3000
    for start, rows in zip((0, 1000, 2000), sets, strict=True):
        write_rows(tmp_path, start, rows)
    assert [r["step"] for r in read_rows(tmp_path)] == [1000] + [2000] * 2 + [3000] * 3
    redo = [dict(row, step=2500, after_file="other.jsonl") for row in sets[2]]  # the file at 3000 was undone
    write_rows(tmp_path, 2000, redo)
    assert read_rows(tmp_path) == sets[0] + sets[1] + redo


def test_the_quality_gate_flags_are_checked():
    with pytest.raises(ConfigError, match="--on_regression rollback needs --max_regression"):
        EvaluationArguments(on_regression="rollback")
    with pytest.raises(ConfigError, match="--eval_budget must be >= 0"):
        EvaluationArguments(eval_budget=-1)
    with pytest.raises(ConfigError, match="--eval_files: no such file"):
        EvaluationArguments(eval_files=["missing.jsonl"]).check_eval_files()


def test_the_evaluation_log_line_names_the_subset_only_where_other_slices_are_cut_to_it(tree, caplog):
    """A line's first file has only its own slice, scored whole: the log said 'up to 1 examples a slice'."""

    def logged(path: Path) -> str:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="daemon.training.evaluation"):
            train(tree, path)
        return next(r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluated"))

    first = logged(_text_file(tree.root / "a.jsonl", 0))
    assert first.startswith("evaluated 1 slice in ") and "example" not in first
    second = logged(_text_file(tree.root / "b.jsonl", 12))
    assert second.startswith("evaluated 2 slices in ") and "other slices on up to " in second


def test_status_says_forgetting_and_transfer_once_names_the_base_slice_and_counts_in_the_singular():
    """``python -m daemon status`` printed forgetting and forward transfer twice (summary, then figures cut at 100
    columns); step 0's slice read '-base-model'; one file or example read '1 files', '1 examples'."""
    from daemon.views.summary import format_summary

    doc = {
        "state": "idle", "global_step": 20, "max_steps": 20,
        "forgetting": {"mean": 0.1, "backward_transfer": -0.1, "slices": 2, "max": 0.2,
                       "worst_slice": "00000000-base-model"},
        "quality_gate": {"max_regression": None, "regression": 0.1, "slices": 2, "action": "none",
                         "worst_slice": "00000000-base-model", "worst_change": 0.2, "errors": []},
        "evaluation": {"slices": 2, "examples_per_slice": 1, "seconds": 1.0, "budget_seconds": 2.0, "errors": []},
        "forward_transfer": {"before_loss": 3.3, "after_loss": 2.7, "learned": 0.6, "forward_transfer": 7.5,
                             "mean": 7.5, "files": 1},
    }  # fmt: skip
    printed = format_summary(doc, None, []).splitlines() + format_figures(doc)
    forgetting = [line for line in printed if "forgetting" in line or "backward transfer" in line]
    transfer = [line for line in printed if "own slice" in line]
    assert len(forgetting) == 1 and len(transfer) == 1, printed
    assert "mean +0.100 nats over 2 slices, max +0.200" in forgetting[0]
    assert transfer[0].endswith("forward +7.500 (mean +7.500, 1 file)")
    gate, evaluation = format_figures(doc)
    assert "worst 0-base-model +0.200" in gate
    assert "2 slices, up to 1 example each" in evaluation and "0 slices failed" in evaluation


def test_a_pretrained_lines_base_row_is_numbered_0_so_files_keep_the_numbers_of_the_other_tables():
    """The base model's step-0 row took number 1, so the matrix called the first file 2 where the history's
    tables, the loss plot and the report's file tables call it 1."""
    from daemon.quality.transfer import format_transfer
    from daemon.views.report import matrix_figure

    def row(step: int, after: str, name: str, loss: float, **extra) -> dict:
        return {"step": step, "after_file": after, "sha256": "", "slice": name, "kind": HELD_OUT, "examples": 8,
                "tokens": 80, "bytes": 300, "loss": loss, "perplexity": math.exp(loss), "bits_per_byte": 1.0,
                "prefix_loss": {"8": loss}, **extra}  # fmt: skip

    base = "00000000-base-model"
    rows = [
        row(0, "(base model)", base, 1.2),
        row(10, "a.jsonl", base, 1.1), row(10, "a.jsonl", "00000010-a", 3.0, before_loss=3.5),
        row(20, "b.jsonl", base, 1.3), row(20, "b.jsonl", "00000010-a", 3.1),
        row(20, "b.jsonl", "00000020-b", 2.0, before_loss=2.9),
    ]  # fmt: skip
    lines = format_matrix(rows)
    assert lines[1].split() == ["#0", "#1", "#2"]
    assert [line.split()[:2] for line in lines[2:5]] == [["0", "(bas~model)"], ["1", "a"], ["2", "b"]]
    transfer = format_transfer(rows)
    assert [line.split()[:2] for line in transfer[2:]] == [["1", "10"], ["2", "20"]]
    axes = matrix_figure(build_matrix(rows)).axes[0]
    assert [t.get_text().split()[0] for t in axes.get_yticklabels()] == ["0", "1", "2"]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["#0", "#1", "#2"]
    embedded = [r for r in rows if r["slice"] != base]  # no base row: files still start at 1
    assert [line.split()[0] for line in format_matrix(embedded)[2:4]] == ["1", "2"]
