"""General ability measured without the base model's own outputs: a check on the base-model slice (issues 31, 32).

The suite's base-model slice (:mod:`daemon.training.base_slice`) is the base model's own greedy
answers to neutral prompts. Rehearsal (:mod:`daemon.training.rehearsal`) trains on the base model's
greedy answers to *other* prompts, so a model that only grew sharper towards its own greedy
outputs would read as "forgetting less" there without keeping more of what it knew. The benches
therefore also score two slices that are not model outputs and that no setting trains on:

- :data:`HUMAN_ANSWERS`: 24 short questions with answers written for this bench (one plain correct
  sentence each), as chat records: the loss is on the assistant's turn, in the model's template.
  Their topics are disjoint from both the base-model slice's and the rehearsal's prompts
  (``tests/test_bench_general.py``). Each also names the words a correct answer contains, so
  :func:`correct_answers` counts the questions the model's own greedy answer gets right: knowledge
  read off what the model says, whatever its style (a loss on a written answer also reads how
  close the model's style is to the writer's).
- :func:`license_documents`: the free-software license texts Debian ships in
  ``/usr/share/common-licenses`` (GPL, Apache, MPL, ...), cut into 1,000-character documents: English
  prose that every web-trained model has read many times.

Both are scored like every slice (:class:`daemon.training.evaluation.Scorer`, nats per learned token).
"""

from __future__ import annotations

from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
LICENSE_NAMES = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GFDL-1.3", "Artistic", "CC0-1.0", "GPL-2")
LICENSE_DOCUMENTS = 48

# (question, a correct answer, regular expressions of which a correct answer contains one as a whole word)
HUMAN_ANSWERS = [
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", ("tokyo",)),
    ("How many hours are in a day?", "There are 24 hours in a day.", ("24", "twenty-four", "twenty four")),
    ("What colour do you get by mixing blue and yellow?", "Mixing blue and yellow gives green.", ("green",)),
    ("Who wrote 'Pride and Prejudice'?", "Jane Austen wrote Pride and Prejudice.", ("austen",)),
    ("What is the square root of 81?", "The square root of 81 is 9.", ("9", "nine")),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet.", ("mars",)),
    ("What is the largest mammal?", "The blue whale is the largest mammal.", ("whale",)),
    ("How many strings does a standard guitar have?", "A standard guitar has six strings.", ("six", "6")),
    ("What do you call a baby dog?", "A baby dog is called a puppy.", ("pupp\\w*",)),
    ("What is the chemical formula for water?", "The chemical formula for water is H2O.", ("h2o", "h₂o")),
    ("In which country are the pyramids of Giza?", "The pyramids of Giza are in Egypt.", ("egypt",)),
    (
        "What is the opposite of 'generous'?",
        "The opposite of generous is stingy.",
        ("stingy", "selfish", "miserly", "greedy", "ungenerous"),
    ),
    ("How many weeks are in a year?", "There are 52 weeks in a year.", ("52", "fifty-two", "fifty two")),
    ("Which instrument has 88 keys?", "A standard piano has 88 keys.", ("piano",)),
    (
        "What is the currency of the United Kingdom?",
        "The currency of the United Kingdom is the pound sterling.",
        ("pound",),
    ),
    ("What does a carpenter work with?", "A carpenter works mainly with wood.", ("wood",)),
    ("Which animal is called the king of the jungle?", "The lion is often called the king of the jungle.", ("lion",)),
    ("What is the smallest prime number?", "The smallest prime number is 2.", ("2", "two")),
    (
        "How many players does a football team have on the field?",
        "A football team has eleven players on the field.",
        ("eleven", "11"),
    ),
    ("Which continent is Kenya in?", "Kenya is in Africa.", ("africa",)),
    ("What is ice made of?", "Ice is frozen water.", ("water",)),
    (
        "Give me a word that means 'very big'.",
        "Enormous is a word that means very big.",
        ("huge", "enormous", "giant", "gigantic", "massive", "immense", "vast", "large", "colossal", "tremendous"),
    ),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths.", ("butterfl\\w*", "moths?")),
    ("In which direction does the sun rise?", "The sun rises in the east.", ("east",)),
]


def correct_answers(model, tokenizer, max_new_tokens: int = 32) -> list[bool]:
    """Per question of :data:`HUMAN_ANSWERS`, whether the model's greedy answer (fp32, a user turn of its chat
    template, or the bare question for a model without one) contains one of its words (case-insensitive)."""
    from daemon.training.base_slice import greedy_answers

    questions = [q for q, _, _ in HUMAN_ANSWERS]
    _, _, _, generated = greedy_answers(model, tokenizer, questions, questions, max_new_tokens)
    said = [str(tokenizer.decode(row, skip_special_tokens=True)) for row in generated]
    return [says(text, words) for text, (_, _, words) in zip(said, HUMAN_ANSWERS, strict=True)]


def says(text: str, words: tuple[str, ...]) -> bool:
    """Whether ``text`` contains one of ``words`` (regular expressions) as a whole word, case-insensitive."""
    import re

    return any(re.search(rf"\b(?:{word})\b", text, re.IGNORECASE) for word in words)


def license_documents() -> list[str]:
    """Up to :data:`LICENSE_DOCUMENTS` documents of at most 1,000 characters, spread over the license texts
    (empty where ``/usr/share/common-licenses`` is missing)."""
    from daemon.make_dataset import split_text

    documents: list[str] = []
    for name in LICENSE_NAMES:
        path = LICENSES / name
        if path.is_file():
            documents += [piece for piece in split_text(path.read_text(errors="replace"), 1000) if piece.strip()]
    return documents[:: max(1, len(documents) // LICENSE_DOCUMENTS)][:LICENSE_DOCUMENTS]


def general_slices() -> list:
    """The two slices as :class:`daemon.store.suite.Slice` (names ``human-answers`` and ``licenses``)."""
    from daemon.store.suite import HELD_OUT, Slice

    answers = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a, _ in HUMAN_ANSWERS
    ]
    slices = [Slice("human-answers", HELD_OUT, "messages", answers)]
    documents = license_documents()
    if documents:
        slices.append(Slice("licenses", HELD_OUT, "text", [{"text": d} for d in documents]))
    return slices
