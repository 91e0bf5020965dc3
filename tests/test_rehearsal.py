"""Rehearsal of the base model's own answers: a replay share at step 0 for a pretrained start.

daemon/training/rehearsal.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from helpers import export_tiny, new_tree, stdlib_documents, train, write_jsonl

# Words too common to say two prompts share a topic.
_COMMON = set(
    "a an the is are of in to and or for what how who why which does do you me give name write one two three "
    "short sentence that with by from at on it its this made make used use there many much our main was has "
    "because need".split()
)


def _words(prompts: list[str]) -> set[str]:
    return {w for p in prompts for w in re.findall(r"[a-z]+", p.lower()) if w not in _COMMON and len(w) > 2}


def test_the_rehearsal_prompts_are_disjoint_from_the_evaluation_slices_prompts():
    """Training on the base-model slice's own prompts would make its measurement of drift worthless."""
    from daemon.training import base_slice, rehearsal

    for rehearsed, evaluated in [
        (rehearsal.CHAT_PROMPTS, base_slice.CHAT_PROMPTS),
        (rehearsal.TEXT_PROMPTS, base_slice.TEXT_PROMPTS),
    ]:
        assert len(set(rehearsed)) == len(rehearsed) >= 2 * len(evaluated) - 1
        assert not {p.lower() for p in rehearsed} & {p.lower() for p in evaluated}
        # and on other topics: no content word of an evaluation prompt is in a rehearsal prompt
        assert not _words(rehearsed) & _words(evaluated), _words(rehearsed) & _words(evaluated)


def test_rehearsal_examples_are_the_base_models_greedy_answers_with_the_prompt_masked(tree):
    from daemon.training.model import load_pretrained
    from daemon.training.rehearsal import CHAT_PROMPTS, TEXT_PROMPTS, rehearsal_examples
    from daemon.training.snapshots import chat_prompt_ids

    folder = export_tiny(tree.root / "base")
    model, tokenizer = load_pretrained(folder)
    examples = rehearsal_examples(model, tokenizer, max_length=128)
    assert examples  # a random tiny model still answers most openings
    prompts = {tuple(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in TEXT_PROMPTS}
    for e in examples:
        masked = e["labels"].index(next(label for label in e["labels"] if label != -100))
        assert tuple(e["input_ids"][:masked]) in prompts and e["labels"][:masked] == [-100] * masked
        assert e["labels"][masked:] == e["input_ids"][masked:] and len(e["input_ids"]) <= 128
    # A chat model answers the chat prompts, each a user turn in its template
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    model, tokenizer = load_pretrained(folder)
    chat = rehearsal_examples(model, tokenizer, max_length=512)
    turns = {tuple(chat_prompt_ids(tokenizer, p)) for p in CHAT_PROMPTS}
    assert chat and all(tuple(e["input_ids"][: e["labels"].count(-100)]) in turns for e in chat)


def test_under_bf16_training_the_answers_come_from_a_bf16_copy_and_the_model_is_untouched(tree):
    """On a CPU that trains in bf16 the base's answers are generated on a bf16 copy (faster: BENCHMARKS.md,
    "real-model speed"): they are what the bf16 model answers, and the fp32 weights training starts from
    stay as loaded."""
    import copy

    import torch

    from daemon.training.base_slice import bf16_copy, greedy_answers
    from daemon.training.model import load_pretrained
    from daemon.training.rehearsal import CHAT_PROMPTS, TEXT_PROMPTS

    model, tokenizer = load_pretrained(export_tiny(tree.root / "base"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    answers = greedy_answers(model, tokenizer, CHAT_PROMPTS, TEXT_PROMPTS, 16, torch.bfloat16)[3]
    cast = copy.deepcopy(model)
    for p in cast.parameters():
        p.data = p.data.to(torch.bfloat16)
    assert answers == greedy_answers(cast, tokenizer, CHAT_PROMPTS, TEXT_PROMPTS, 16)[3]
    assert all(p.dtype == torch.float32 and torch.equal(p, before[n]) for n, p in model.named_parameters())
    clone = bf16_copy(model)
    assert {p.dtype for p in clone.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in clone.parameters())
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied, as SmolLM2's
    assert clone.get_output_embeddings().weight is clone.get_input_embeddings().weight


def test_a_pretrained_start_rehearses_the_base_models_answers_in_every_file(tree, caplog):
    from daemon.store.replay import read_share, replay_count, store_files
    from daemon.training.rehearsal import rehearsal_path

    base = export_tiny(tree.root / "base")
    docs = stdlib_documents(limit=60)
    on = {"model_name_or_path": base, "base_rehearsal": "true", "base_rehearsal_fraction": "0.25"}
    first = train(tree, write_jsonl(tree.root / "a.jsonl", [{"text": d} for d in docs[:30]]), **on)
    path = rehearsal_path(tree.status)
    share = read_share(0, path)
    assert share.header["end_step"] == 0 and share.examples
    assert all(-100 in e["labels"] for e in share.examples)  # prompt-masked, as a prompt-completion file's
    # The first file has no earlier file to replay: what it replays is the rehearsal, at its own fraction
    assert first["replayed_examples"] == replay_count(first["examples"], 0.25) > 0
    kept = path.read_bytes()
    with caplog.at_level("INFO", logger="daemon.store.replay"):
        second = train(tree, write_jsonl(tree.root / "b.jsonl", [{"text": d} for d in docs[30:]]), **on)
    # the store's line counts done files, the rehearsal apart (it said "over 3 files" after two)
    assert "over 2 files and the base model's answers)" in caplog.text
    assert path.read_bytes() == kept  # written once, at the line's start
    assert [step for step, _ in store_files(tree.status)] == [0, first["end_step"], second["end_step"]]
    # The second file: its replay of the first file, and the rehearsal beside it at its own fraction
    both = replay_count(second["examples"], 0.09) + replay_count(second["examples"], 0.25)
    assert second["replayed_examples"] == both


def test_the_rehearsal_share_is_drawn_at_its_own_fraction_never_as_an_earlier_files_replay(tmp_path):
    """Drawn from the pool of all shares, the base model's answers reached a chat drop at 9 % x 48 / pool:
    next to nothing (BENCHMARKS.md "real-model stream"). They have a draw of their own."""
    from daemon.store.replay import Share, select_rehearsal, select_replay, store_shares, write_share
    from daemon.store.replay_mix import select_weighted_replay
    from daemon.training.rehearsal import rehearsal_path

    def share(step: int, path: Path, marker: int) -> None:
        header = {"file": f"f{step}", "sha256": "", "end_step": step, "tokenizer": "t"}
        write_share(Share(step, path, header, [{"input_ids": [marker, i]} for i in range(5)]))

    share(0, rehearsal_path(tmp_path), 0)
    share(7, tmp_path / "replay" / "00000007-a.jsonl", 7)
    replayed = select_replay(tmp_path, 7, 40, "s", "t")
    assert len(replayed) == 40 and {e["input_ids"][0] for e in replayed} == {7}
    weighted, _ = select_weighted_replay(tmp_path, 7, 40, "s", "t", [])
    assert len(weighted) == 40 and {e["input_ids"][0] for e in weighted} == {7}
    rehearsed = select_rehearsal(tmp_path, 12, "s", "t")
    assert len(rehearsed) == 12 and {e["input_ids"][0] for e in rehearsed} == {0}
    assert rehearsed == select_rehearsal(tmp_path, 12, "s", "t")  # seeded: a resumed file draws the same
    assert select_rehearsal(tmp_path, 12, "s", "another tokenizer") == []
    # The balanced cooldown mix keeps the base's answers as one of its shares (daemon/training/cooldown_mix.py)
    assert [s.step for s in store_shares(tmp_path, 7, "t", with_rehearsal=True)] == [0, 7]
    assert [s.step for s in store_shares(tmp_path, 7, "t")] == [7]


def test_a_pretrained_start_rehearses_by_default_and_the_embedded_model_never(tree):
    from daemon.store.replay import replay_count
    from daemon.training.rehearsal import rehearsal_path

    docs = stdlib_documents(limit=30)
    row = train(tree, write_jsonl(tree.root / "a.jsonl", [{"text": d} for d in docs]))
    assert not rehearsal_path(tree.status).exists() and not row["replayed_examples"]  # scratch: no base to keep
    base = export_tiny(tree.root / "base")
    for name, extra, rehearsed in [("default", {}, True), ("off", {"base_rehearsal": "false"}, False)]:
        other = tree.root / name
        flags = {"output_dir": other / "model", "status_dir": other / "status", "model_name_or_path": base}
        row = train(tree, tree.root / "a.jsonl", **flags, **extra)
        assert rehearsal_path(other / "status").exists() is rehearsed
        assert row["replayed_examples"] == (replay_count(row["examples"], 0.2) if rehearsed else 0)
        assert json.loads((other / "status" / "history.jsonl").read_text())["outcome"] == "done"


def test_the_daemons_idle_spare_keeps_the_base_answers_the_first_file_finds(tmp_path, caplog):
    """``prepare_idle_line``: the rehearsal share and base slice kept ahead are those the first file writes itself."""
    from daemon.quality.forgetting import read_rows
    from daemon.store.replay import read_share
    from daemon.training.arguments import parse_args
    from daemon.training.base_slice import base_slice_path
    from daemon.training.prepare import prepare_idle_line
    from daemon.training.rehearsal import rehearsal_path

    base = export_tiny(tmp_path / "base")
    flags = {"model_name_or_path": base, "base_rehearsal": "true", "base_rehearsal_fraction": "0.25"}
    ahead, direct = new_tree(tmp_path / "ahead"), new_tree(tmp_path / "direct")
    assert prepare_idle_line(parse_args(ahead.flags(**flags)))
    kept = rehearsal_path(ahead.status).read_bytes(), base_slice_path(ahead.status).read_bytes()
    docs = [{"text": d} for d in stdlib_documents(limit=30)]
    caplog.clear()  # what the spare's part logged (another test may have set the root logger to INFO)
    with caplog.at_level("INFO"):
        row = train(ahead, write_jsonl(tmp_path / "a.jsonl", docs), **flags)
    assert "kept the base model's own answers" not in caplog.text  # the file found them: nothing generated again
    assert (rehearsal_path(ahead.status).read_bytes(), base_slice_path(ahead.status).read_bytes()) == kept
    train(direct, write_jsonl(tmp_path / "a.jsonl", docs), **flags)
    assert read_share(0, rehearsal_path(ahead.status)).examples == read_share(0, rehearsal_path(direct.status)).examples
    assert base_slice_path(ahead.status).read_bytes() == base_slice_path(direct.status).read_bytes()

    def base_rows(tree):
        return [(r["slice"], r["loss"]) for r in read_rows(tree.status) if r["step"] == 0]

    assert base_rows(ahead) == base_rows(direct) != []
    # A started line (a complete checkpoint) or the embedded model's has nothing to keep ahead
    assert row["end_step"] > 0 and not prepare_idle_line(parse_args(ahead.flags(**flags)))
    assert not prepare_idle_line(parse_args(new_tree(tmp_path / "embedded").flags()))


def test_base_answers_kept_from_another_base_model_are_made_again_before_the_line_starts(tmp_path, caplog):
    """A daemon restarted with another --model_name_or_path before its first file: what its idle spare kept of the
    first base is dropped, and the line rehearses and measures drift against the base it trains."""
    from daemon.quality.forgetting import read_rows
    from daemon.training.arguments import parse_args
    from daemon.training.base_slice import base_slice_path
    from daemon.training.prepare import prepare_idle_line
    from daemon.training.rehearsal import rehearsal_path

    first, second = export_tiny(tmp_path / "first"), export_tiny(tmp_path / "second", seed=1)
    rehearse = {"base_rehearsal": "true", "base_rehearsal_fraction": "0.25"}
    line, fresh = new_tree(tmp_path / "line"), new_tree(tmp_path / "fresh")

    def kept(tree):
        rows = [
            (r["slice"], r["loss"]) for r in read_rows(tree.status) if r["step"] == 0 and "base-model" in r["slice"]
        ]
        return rehearsal_path(tree.status).read_bytes(), base_slice_path(tree.status).read_bytes(), rows

    assert prepare_idle_line(parse_args(line.flags(model_name_or_path=first, **rehearse)))
    of_first = kept(line)
    assert prepare_idle_line(parse_args(fresh.flags(model_name_or_path=second, **rehearse)))
    of_second = kept(fresh)
    assert of_first != of_second and len(of_second[2]) == 1
    with caplog.at_level("WARNING", logger="daemon.training.prepare"):
        assert prepare_idle_line(parse_args(line.flags(model_name_or_path=second, **rehearse)))
    assert "made from another base model" in caplog.text
    assert kept(line) == of_second
    assert not prepare_idle_line(parse_args(line.flags(model_name_or_path=second, **rehearse)))  # same source: kept
    # The first file finds the first base's answers kept ahead and trains the second: it makes them again too
    assert prepare_idle_line(parse_args(line.flags(model_name_or_path=first, **rehearse)))
    docs = [{"text": d} for d in stdlib_documents(limit=30)]
    train(line, write_jsonl(tmp_path / "a.jsonl", docs), model_name_or_path=second, **rehearse)
    assert kept(line) == of_second
    # The line has started: another base given later changes nothing it kept
    assert not prepare_idle_line(parse_args(line.flags(model_name_or_path=first, **rehearse)))
    assert kept(line) == of_second
