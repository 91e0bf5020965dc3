"""Evolution snapshots: per-prompt seeds, the boundary after a prompt ending in whitespace, recorded settings."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import stdlib_documents, tiny_model

from daemon.model import train_tokenizer
from daemon.snapshots import SEED_RULE, GenerationSettings, generate_samples, write_snapshot

SETTINGS = GenerationSettings(max_new_tokens=8, temperature=0.8, top_k=50, seed=7)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(stdlib_documents(), vocab_size=320)


def test_each_prompt_samples_from_its_own_seed(tokenizer):
    model = tiny_model(len(tokenizer))
    first, second = generate_samples(model, tokenizer, ["def ", "def "], SETTINGS)
    assert (first["seed"], second["seed"]) == (7, 8)
    assert first["completion"] != second["completion"]  # the same prompt, two seeds: two different draws
    assert generate_samples(model, tokenizer, ["def ", "def "], SETTINGS) == [first, second]  # reproducible


class _SpaceLedModel(torch.nn.Module):
    """A stand-in causal LM that always continues with one token, ``"Ġis"`` (a space glued to a word)."""

    device = torch.device("cpu")

    def __init__(self, token_id: int, vocab_size: int) -> None:
        from transformers import PretrainedConfig

        super().__init__()
        self.config = PretrainedConfig(vocab_size=vocab_size)
        self.token_id = token_id
        self.fed: list[list[int]] = []
        self.allowed_first: list[int] | None = None

    def generate(self, input_ids, prefix_allowed_tokens_fn=None, **kwargs):
        self.fed.append(input_ids[0].tolist())
        if prefix_allowed_tokens_fn is not None:
            self.allowed_first = prefix_allowed_tokens_fn(0, input_ids[0])
        return torch.cat([input_ids, torch.tensor([[self.token_id]])], dim=1)


def test_a_prompt_ending_in_a_space_reads_with_one_space_before_the_next_word(tokenizer):
    space_is = tokenizer.convert_tokens_to_ids("Ġis")
    model = _SpaceLedModel(space_is, len(tokenizer))
    (sample,) = generate_samples(model, tokenizer, ["import "], SETTINGS)
    assert sample["prompt"] + sample["completion"] == "import is"
    assert tokenizer.convert_ids_to_tokens(model.fed[0])[-1] != "Ġ"  # the space is not fed alone
    assert space_is in model.allowed_first and tokenizer.convert_tokens_to_ids("is") not in model.allowed_first


def test_a_real_model_continues_a_trailing_space_with_a_space_led_token(tokenizer):
    model = tiny_model(len(tokenizer))
    outputs = []
    generate = model.generate
    model.generate = lambda **kwargs: outputs.append(generate(**kwargs)) or outputs[-1]
    prompts = ["import ", "x = 1\n", "class"]
    samples = generate_samples(model, tokenizer, prompts, SETTINGS)
    for sample, out in zip(samples, outputs, strict=True):
        assert sample["prompt"] + sample["completion"] == tokenizer.decode(out[0], skip_special_tokens=True)
    first_new = tokenizer.convert_ids_to_tokens(int(outputs[0][0, len(tokenizer("import")["input_ids"])]))
    assert first_new.startswith("Ġ")  # the held-back space, glued to what follows


def test_the_snapshot_records_the_sampling_settings_and_each_seed(tmp_path):
    samples = [{"prompt": "def ", "completion": "f():", "seed": 7}, {"prompt": "# ", "completion": "x", "seed": 8}]
    folder = write_snapshot(tmp_path, 12, "a.jsonl", 1.5, 4, SETTINGS, samples)
    doc = json.loads((folder / "snapshot.json").read_text())
    assert doc["generation"] == {
        "do_sample": True,
        "max_new_tokens": 8,
        "temperature": 0.8,
        "top_k": 50,
        "seed": 7,
        "seed_rule": SEED_RULE,
    }
    assert [s["seed"] for s in doc["samples"]] == [7, 8]
    markdown = (folder / "samples.md").read_text()
    assert f"temperature 0.8, top_k 50, max_new_tokens 8, seed 7 (each prompt: {SEED_RULE})" in markdown
    assert "## Sample 2 (seed 8): prompt `'# '`" in markdown
