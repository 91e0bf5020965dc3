"""General ability measured without the base model's own outputs: a check on the base-model slice (issues 31, 32).

The suite's base-model slice (:mod:`daemon.training.base_slice`) is the base model's own greedy
answers to neutral prompts. Rehearsal (:mod:`daemon.training.rehearsal`) trains on the base model's
greedy answers to *other* prompts, so a model that only grew sharper towards its own greedy
outputs would read as "forgetting less" there without keeping more of what it knew. The benches
therefore also score two slices that are not model outputs and that no setting trains on:

- :data:`HUMAN_ANSWERS`: 24 short questions with answers written for this bench (one plain correct
  sentence each), as chat records: the loss is on the assistant's turn, in the model's template.
  Their topics are disjoint from both the base-model slice's and the rehearsal's prompts
  (``tests/test_bench_general.py``).
- :func:`license_documents`: the free-software licence texts Debian ships in
  ``/usr/share/common-licenses`` (GPL, Apache, MPL, ...), cut into 1,000-character documents: English
  prose that every web-trained model has read many times.

Both are scored like every slice (:class:`daemon.training.evaluation.Scorer`, nats per learned token).
"""

from __future__ import annotations

from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
LICENSE_NAMES = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GFDL-1.3", "Artistic", "CC0-1.0", "GPL-2")
LICENSE_DOCUMENTS = 48

HUMAN_ANSWERS = [
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("What colour do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
    ("Who wrote 'Pride and Prejudice'?", "Jane Austen wrote Pride and Prejudice."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    ("What is the largest mammal?", "The blue whale is the largest mammal."),
    ("How many strings does a standard guitar have?", "A standard guitar has six strings."),
    ("What do you call a baby dog?", "A baby dog is called a puppy."),
    ("What is the chemical formula for water?", "The chemical formula for water is H2O."),
    ("In which country are the pyramids of Giza?", "The pyramids of Giza are in Egypt."),
    ("What is the opposite of 'generous'?", "The opposite of generous is stingy."),
    ("How many weeks are in a year?", "There are 52 weeks in a year."),
    ("Which instrument has 88 keys?", "A standard piano has 88 keys."),
    ("What is the currency of the United Kingdom?", "The currency of the United Kingdom is the pound sterling."),
    ("What does a carpenter work with?", "A carpenter works mainly with wood."),
    ("Which animal is called the king of the jungle?", "The lion is often called the king of the jungle."),
    ("What is the smallest prime number?", "The smallest prime number is 2."),
    ("How many players does a football team have on the field?", "A football team has eleven players on the field."),
    ("Which continent is Kenya in?", "Kenya is in Africa."),
    ("What is ice made of?", "Ice is frozen water."),
    ("Give me a word that means 'very big'.", "Enormous is a word that means very big."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths."),
    ("In which direction does the sun rise?", "The sun rises in the east."),
]


def license_documents() -> list[str]:
    """Up to :data:`LICENSE_DOCUMENTS` documents of at most 1,000 characters, spread over the licence texts
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
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in HUMAN_ANSWERS
    ]
    slices = [Slice("human-answers", HELD_OUT, "messages", answers)]
    documents = license_documents()
    if documents:
        slices.append(Slice("licenses", HELD_OUT, "text", [{"text": d} for d in documents]))
    return slices
