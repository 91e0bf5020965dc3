"""Evolution snapshots: per-prompt seeds, the boundary after a prompt ending in whitespace, recorded settings."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import stdlib_documents, tiny_model

from daemon.training.model import train_tokenizer
from daemon.training.snapshots import SEED_RULE, GenerationSettings, generate_samples, write_snapshot

SETTINGS = GenerationSettings(max_new_tokens=8, temperature=0.8, top_k=50, seed=7)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(stdlib_documents(), vocab_size=320)


def test_generation_feeds_the_output_head_a_contiguous_input_and_samples_the_same(tokenizer):
    """generate's first pass slices the last position, a strided view that F.linear sends to a bmm copying
    the head's weight per prompt on a CPU (BENCHMARKS.md, "real-model speed"); contiguous_head gives it a copy."""
    from daemon.training.snapshots import contiguous_head

    model = tiny_model(len(tokenizer))
    seen: list[bool] = []
    model.get_output_embeddings().register_forward_hook(lambda _, args, out: seen.append(args[0].is_contiguous()))
    bare = model.get_output_embeddings()._forward_pre_hooks.copy()
    hooked = generate_samples(model, tokenizer, ["def ", "import os"], SETTINGS)  # enters contiguous_head
    assert seen and all(seen)
    assert model.get_output_embeddings()._forward_pre_hooks.keys() == bare.keys()  # removed after the call
    seen.clear()
    ids = torch.tensor([tokenizer("def f(x):")["input_ids"]] * 2)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    assert not seen[0]
    seen.clear()
    with torch.inference_mode(), contiguous_head(model):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    assert seen and all(seen)  # without the hook, the first pass's input is the strided view
    assert generate_samples(model, tokenizer, ["def ", "import os"], SETTINGS) == hooked


def test_each_prompt_samples_from_its_own_seed(tokenizer):
    model = tiny_model(len(tokenizer))
    first, second = generate_samples(model, tokenizer, ["def ", "def "], SETTINGS)
    assert (first["seed"], second["seed"]) == (7, 8)
    assert first["completion"] != second["completion"]  # the same prompt, two seeds: two different draws
    assert generate_samples(model, tokenizer, ["def ", "def "], SETTINGS) == [first, second]  # reproducible


class _SpaceLedModel(torch.nn.Module):
    """A stand-in causal LM whose scores favour ``favoured`` (``"i"``) over ``"Ġis"`` (a space glued to a word)."""

    device = torch.device("cpu")

    def __init__(self, tokenizer, favoured: str = "i") -> None:
        from transformers import PretrainedConfig

        super().__init__()
        self.config = PretrainedConfig(vocab_size=len(tokenizer))
        self.space_is, self.bare_i = tokenizer.convert_tokens_to_ids(["Ġis", favoured])
        assert None not in (self.space_is, self.bare_i)
        self.fed: list[list[int]] = []

    def generate(self, input_ids, logits_processor, generation_config, **kwargs):
        self.fed.append(input_ids[0].tolist())
        scores = torch.full((1, self.config.vocab_size), -10.0)
        scores[0, self.bare_i], scores[0, self.space_is] = 10.0, 0.0  # "i" wins unless it is not allowed
        picked = int(logits_processor(input_ids, scores).argmax())  # greedy over what the processor leaves
        return torch.cat([input_ids, torch.tensor([[picked]])], dim=1)


def test_a_prompt_ending_in_a_space_reads_with_one_space_before_the_next_word(tokenizer):
    model = _SpaceLedModel(tokenizer)
    (sample,) = generate_samples(model, tokenizer, ["import "], SETTINGS)
    assert sample["prompt"] + sample["completion"] == "import is"  # "Ġis": the only allowed first token of the two
    assert tokenizer.convert_ids_to_tokens(model.fed[0])[-1] != "Ġ"  # the space is not fed alone


@pytest.mark.parametrize("whitespace", ["Ġ", "ĠĠ"])
def test_a_whitespace_only_token_never_follows_a_prompt_ending_in_a_space(tokenizer, whitespace):
    assert whitespace in tokenizer.get_vocab()  # a byte-level BPE trained on code has both
    model = _SpaceLedModel(tokenizer, favoured=whitespace)
    (sample,) = generate_samples(model, tokenizer, ["def "], SETTINGS)
    assert sample["prompt"] + sample["completion"] == "def is"  # one space, then the word; never "def  is"


def test_a_chat_model_answers_each_prompt_as_a_user_turn_of_its_own_template(tokenizer):
    import copy

    chat = copy.deepcopy(tokenizer)
    chat.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    model = tiny_model(len(chat))
    outputs = []
    generate = model.generate
    model.generate = lambda **kwargs: outputs.append(generate(**kwargs)) or outputs[-1]
    (sample,) = generate_samples(model, chat, ["What is JSON?"], SETTINGS)
    (out,) = outputs
    rendered = chat("<|im_start|>user\nWhat is JSON?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    prompt_ids = rendered["input_ids"]
    assert out[0, : len(prompt_ids)].tolist() == prompt_ids  # the template's turn, up to the assistant's
    assert sample["chat"] is True
    assert sample["completion"] == chat.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)
    # the embedded tokenizer's own default template does not make a chat model: its samples continue the prompt
    assert "chat" not in generate_samples(tiny_model(len(tokenizer)), tokenizer, ["def "], SETTINGS)[0]


def test_a_prompt_samples_the_same_alone_and_beside_other_prompts(tokenizer):
    # One batch, left-padded to the longest prompt: prompt 0's draws come from its own generator only.
    model = tiny_model(len(tokenizer))
    (alone,) = generate_samples(model, tokenizer, ["def "], SETTINGS)
    together = generate_samples(model, tokenizer, ["def ", "class Parser(object):\n    "], SETTINGS)
    assert together[0] == alone
    assert together[1]["seed"] == 8 and together[1]["completion"]


def test_a_real_model_continues_a_trailing_space_with_a_space_led_token(tokenizer):
    model = tiny_model(len(tokenizer))
    outputs = []
    generate = model.generate
    model.generate = lambda **kwargs: outputs.append(generate(**kwargs)) or outputs[-1]
    prompts = ["import ", "x = 1\n", "class"]
    samples = generate_samples(model, tokenizer, prompts, SETTINGS)
    (out,) = outputs  # one batch for all the prompts
    pad = tokenizer.pad_token_id
    for sample, row in zip(samples, out, strict=True):
        tokens = row[(row != pad).nonzero()[0, 0] :]  # without the left padding
        assert sample["prompt"] + sample["completion"] == tokenizer.decode(tokens, skip_special_tokens=True)
    prompt = tokenizer("import")["input_ids"]
    first_new = tokenizer.convert_ids_to_tokens(int(out[0, out.shape[1] - SETTINGS.max_new_tokens]))
    assert out[0, out.shape[1] - SETTINGS.max_new_tokens - 1] == prompt[-1]
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
