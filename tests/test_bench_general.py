"""The benches' independent general slices (bench/general_slices.py): disjoint from every prompt the product uses."""

from __future__ import annotations

import re

from bench import general_slices
from daemon.training import base_slice, rehearsal

# Words of a question's frame, not of its topic.
FRAME = set(
    "what is the a an of in do does you how many are who wrote and which give me word that to for on there one name "
    "i can called known as main get by with made into turn have".split()
)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower())) - FRAME


def test_human_answers_ask_nothing_the_product_prompts_or_rehearses():
    asked = [q for q, _, _ in general_slices.HUMAN_ANSWERS]
    product = base_slice.CHAT_PROMPTS + rehearsal.CHAT_PROMPTS
    assert len(asked) == len(set(asked)) == 24
    assert not set(asked) & set(product)
    # No question shares two topic words with one of the product's (the same topic asked twice).
    for question in asked:
        for prompt in product:
            shared = _words(question) & _words(prompt)
            assert len(shared) < 2, (question, prompt, shared)


def test_slices_are_chat_records_and_license_documents(tmp_path, monkeypatch):
    monkeypatch.setattr(general_slices, "LICENSES", tmp_path)
    (tmp_path / "GPL-3").write_text("Everyone is permitted to copy.\n" * 200)  # 6,200 characters
    answers, licenses = general_slices.general_slices()
    assert (answers.name, answers.shape, licenses.name, licenses.shape) == (
        "human-answers",
        "messages",
        "licenses",
        "text",
    )
    assert [m["role"] for m in answers.records[0]["messages"]] == ["user", "assistant"]
    documents = [r["text"] for r in licenses.records]
    assert len(documents) == 7 and all(0 < len(d) <= 1000 for d in documents)
    assert "".join(documents) == (tmp_path / "GPL-3").read_text()


def test_without_the_licenses_folder_only_the_answers_are_scored(tmp_path, monkeypatch):
    monkeypatch.setattr(general_slices, "LICENSES", tmp_path / "missing")
    assert [s.name for s in general_slices.general_slices()] == ["human-answers"]


def test_each_written_answer_is_counted_correct_and_a_wrong_one_is_not():
    for _, answer, words in general_slices.HUMAN_ANSWERS:
        assert general_slices.says(answer, words), answer
    assert general_slices.says("TOKYO, of course.", ("tokyo",))
    assert not general_slices.says("There are 24 hours in a day.", ("2", "two"))  # "24" is not "2"
    assert not general_slices.says("I am the only one you can trust.", ("tokyo",))
