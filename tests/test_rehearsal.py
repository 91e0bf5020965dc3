"""Rehearsal of the base model's own answers: a replay share at step 0 for a pretrained start.

daemon/training/rehearsal.py.
"""

from __future__ import annotations

import json
import re

from helpers import export_tiny, stdlib_documents, train, write_jsonl

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


def test_a_pretrained_start_rehearses_the_base_models_answers_from_its_first_file(tree):
    from daemon.store.replay import read_share, store_files
    from daemon.training.rehearsal import rehearsal_path

    base = export_tiny(tree.root / "base")
    docs = stdlib_documents(limit=60)
    on = {"model_name_or_path": base, "base_rehearsal": "true"}
    first = train(tree, write_jsonl(tree.root / "a.jsonl", [{"text": d} for d in docs[:30]]), **on)
    path = rehearsal_path(tree.status)
    share = read_share(0, path)
    assert share.header["end_step"] == 0 and share.examples
    assert all(-100 in e["labels"] for e in share.examples)  # prompt-masked, as a prompt-completion file's
    assert first["replayed_examples"] > 0  # the first file already replays it: the only share then
    kept = path.read_bytes()
    second = train(tree, write_jsonl(tree.root / "b.jsonl", [{"text": d} for d in docs[30:]]), **on)
    assert path.read_bytes() == kept  # written once, at the line's start
    assert [step for step, _ in store_files(tree.status)] == [0, first["end_step"], second["end_step"]]


def test_the_embedded_model_and_a_pretrained_start_by_default_keep_no_rehearsal(tree):
    from daemon.training.rehearsal import rehearsal_path

    docs = stdlib_documents(limit=30)
    row = train(tree, write_jsonl(tree.root / "a.jsonl", [{"text": d} for d in docs]))
    assert not rehearsal_path(tree.status).exists() and not row["replayed_examples"]  # scratch: unchanged
    other = tree.root / "other"
    flags = {"output_dir": other / "model", "status_dir": other / "status"}
    base = export_tiny(tree.root / "base")
    row = train(tree, tree.root / "a.jsonl", model_name_or_path=base, **flags)  # off until measured
    assert not rehearsal_path(other / "status").exists() and not row["replayed_examples"]
    assert json.loads((other / "status" / "history.jsonl").read_text())["outcome"] == "done"
