"""The exported model's card: HF metadata, what the model is, the files in its weights, through a rollback."""

from __future__ import annotations

from pathlib import Path

from helpers import Tree, stdlib_documents, train, write_jsonl
from huggingface_hub import ModelCard

from daemon.store.checkpoints import export_step
from daemon.store.records import HistoryRow, Outcome
from daemon.store.rollback import roll_back_to
from daemon.store.status import StatusFile
from daemon.views.model_card import CARD_FILE, describe_model, trained_files


def _text_file(path: Path, n: int, offset: int) -> Path:
    return write_jsonl(path, [{"text": d} for d in stdlib_documents(limit=n + offset)[offset:]])


def _card(tree: Tree) -> ModelCard:
    return ModelCard.load(tree.output / CARD_FILE)  # a local path: read, never downloaded


def test_the_card_names_the_model_its_step_and_the_files_in_its_weights_through_a_rollback(tree):
    a, b = (train(tree, _text_file(tree.root / f"{n}.jsonl", 4, 4 * i)) for i, n in enumerate("ab"))
    card = _card(tree)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "llama" in card.data.tags
    facts = describe_model(tree.output)
    assert facts.parameters is not None and f"({facts.parameters:,})" in card.text
    assert (
        "`LlamaForCausalLM` (`llama`)" in card.text
        and "| layers / hidden size / attention heads | 2 / 32 / 2 |" in card.text
    )
    assert f"| global_step | {b['end_step']} |" in card.text
    assert f"| `a.jsonl` | 0 → {a['end_step']} |" in card.text
    assert f"| `b.jsonl` | {a['end_step']} → {b['end_step']} |" in card.text
    assert f"{b['eval_loss']:.4f}" in card.text
    assert 'pipeline("text-generation", model="current_model")' in card.text
    assert "| started from | the embedded model |" in card.text and 'generator("def "' in card.text

    roll_back_to(tree.output, tree.status, a["end_step"])
    card = _card(tree)
    assert export_step(tree.output) == a["end_step"]
    assert f"| global_step | {a['end_step']} |" in card.text
    assert "`a.jsonl`" in card.text and "`b.jsonl`" not in card.text


def _done(name: str, start: int, end: int, eval_loss: float) -> HistoryRow:
    """A done history row of ``name`` trained from ``start`` to ``end``."""
    return HistoryRow(
        file=name, sha256=f"sha-{name}", start_step=start, end_step=end, planned_steps=end - start, examples=8,
        tokens=256, wall_seconds=1.0, train_seconds=1.0, train_loss=3.0, eval_loss=eval_loss,
        outcome=Outcome.DONE, error=None, finished_at="2025-01-01T00:00:00Z",
    )  # fmt: skip


def test_files_rolled_back_or_past_the_exported_step_are_not_in_the_card(tree):
    status = StatusFile(tree.status)
    a, b = _done("a.jsonl", 0, 5, 3.0), _done("b.jsonl", 5, 9, 2.5)
    for row in (
        a,
        b,
        HistoryRow.rolled_back("b.jsonl", "sha-b.jsonl", 5, 9, 4, to_step=5),
        _done("c.jsonl", 5, 8, 2.0),
    ):
        status.record_outcome(row)
    assert [f.file for f in trained_files(tree.status, 8)] == ["a.jsonl", "c.jsonl"]
    assert [f.file for f in trained_files(tree.status, 5)] == ["a.jsonl"]  # a rollback to 5, before its history rows
    finishing = _done("d.jsonl", 8, 12, 1.5).as_dict()  # exported before its history row is appended
    assert [(f.file, f.eval_loss) for f in trained_files(tree.status, 12, finishing)][-1] == ("d.jsonl", 1.5)


def test_a_chat_models_card_names_its_base_and_its_usage_code_runs_as_written(tree):
    """A pretrained chat line's card: the base it started from, and usage that asks a question in the model's own
    chat template (the card showed a chat model continuing 'def '); both snippets are run as the card gives them."""
    import contextlib
    import io
    import re

    from helpers import export_tiny

    from daemon.store.jsonl import DEFAULT_CHAT_TEMPLATE

    base = export_tiny(tree.root / "base")
    (base / "chat_template.jinja").write_text("{# a base model's own #}" + DEFAULT_CHAT_TEMPLATE)
    train(tree, _text_file(tree.root / "a.jsonl", 4, 0), model_name_or_path=base)
    card = _card(tree)
    assert f"| started from | `{base}` (a pretrained base) |" in card.text
    assert "apply_chat_template(" in card.text and 'generator("def "' not in card.text
    snippets = re.findall(r"```python\n(.*?)```", card.text, re.S)
    assert len(snippets) == 2
    for code in snippets:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(code.replace('"current_model"', repr(str(tree.output))), {})  # noqa: S102 - the card's own code
        assert printed.getvalue().endswith("\n")  # the snippet ran to its last line, the print of the answer
