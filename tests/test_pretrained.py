"""Starting from a pretrained model: what a --model_name_or_path folder must hold, refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, export_tiny, run_cli, stdlib_documents, write_jsonl


def _folder(root: Path, config: dict | None, tokenizer: bool = True) -> Path:
    folder = root / "model"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.mark.parametrize(
    ("config", "tokenizer", "message"),
    [
        ({"architectures": ["BertForMaskedLM"]}, True, "BertForMaskedLM is not a causal language model"),
        (
            {"architectures": ["MyForCausalLM"], "auto_map": {"AutoModelForCausalLM": "my.MyForCausalLM"}},
            True,
            "needs its own code; pass --trust_remote_code",
        ),
        ({"architectures": ["LlamaForCausalLM"]}, False, "no tokenizer"),
        (None, True, "no readable config.json"),
    ],
)
def test_a_folder_that_cannot_start_a_run_is_refused_in_one_line_before_anything_is_written(
    tree, config, tokenizer, message
):
    model = _folder(tree.root, config, tokenizer)
    data = write_jsonl(tree.root / "a.jsonl", [{"text": d} for d in stdlib_documents(limit=8)])
    result = run_cli(["train.py", "--dataset", str(data), "--model_name_or_path", str(model), *tree.flags()], cwd=REPO)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert [p for p in tree.status.iterdir()] == [] and [p for p in tree.output.iterdir()] == []


def test_custom_code_is_accepted_with_trust_remote_code_and_a_plain_export_passes(tree):
    from daemon.pretrained import pretrained_problems

    model = _folder(
        tree.root, {"architectures": ["MyForCausalLM"], "auto_map": {"AutoModelForCausalLM": "my.MyForCausalLM"}}
    )
    assert pretrained_problems(model, trust_remote_code=True) == []
    assert pretrained_problems(export_tiny(tree.root / "tiny"), trust_remote_code=False) == []


def test_a_tokenizer_without_pad_token_or_chat_template_is_completed_and_said_in_the_log(tree, caplog):
    from transformers import AutoTokenizer

    from daemon.store.jsonl import DEFAULT_CHAT_TEMPLATE
    from daemon.training.model import load_pretrained

    folder = export_tiny(tree.root / "tiny")
    bare = AutoTokenizer.from_pretrained(folder)
    bare.pad_token, bare.chat_template = None, None
    bare.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    with caplog.at_level("INFO", logger="daemon.training.model"):
        _, tokenizer = load_pretrained(folder)
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert "has no pad token" in caplog.text and "has no chat template" in caplog.text


def test_a_pretrained_start_keeps_the_base_models_answers_as_a_slice_scored_after_every_file(tree):
    from helpers import train

    from daemon.quality.forgetting import read_rows
    from daemon.training.base_slice import TEXT_PROMPTS, base_slice_path

    base = export_tiny(tree.root / "base")
    docs = stdlib_documents(limit=60)
    first = train(tree, write_jsonl(tree.root / "a.jsonl", [{"text": d} for d in docs[:30]]), model_name_or_path=base)
    records = [json.loads(line) for line in base_slice_path(tree.status).read_text().splitlines()]
    assert records and all(r["prompt"] in TEXT_PROMPTS and r["completion"] for r in records)  # not a chat model
    second = train(tree, write_jsonl(tree.root / "b.jsonl", [{"text": d} for d in docs[30:]]), model_name_or_path=base)
    assert json.loads((tree.output / "origin.json").read_text()) == {"base_model": str(base)}  # kept by exports
    base_rows = [r for r in read_rows(tree.status) if r["slice"] == "00000000-base-model"]
    # scored by the base model itself (step 0), then after each file, on the same examples
    assert [r["step"] for r in base_rows] == [0, first["end_step"], second["end_step"]]
    assert base_rows[0]["examples"] == len(records) and all(r["loss"] > 0 for r in base_rows)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tree.output).use_cache  # the export generates with its KV cache
    status = json.loads((tree.status / "training_status.json").read_text())
    assert status["forgetting"]["slices"] == 2  # the first file's slice and the base model's: drift from the base


def test_the_embedded_model_records_that_it_was_bootstrapped_and_keeps_no_base_slice(tree):
    from helpers import train

    from daemon.store.origin import base_model_of
    from daemon.training.base_slice import base_slice_path

    train(tree, write_jsonl(tree.root / "a.jsonl", [{"text": d} for d in stdlib_documents(limit=30)]))
    assert json.loads((tree.output / "origin.json").read_text()) == {"base_model": None}
    assert base_model_of(tree.output, "some/folder/given/later") is None  # the line's origin wins over a flag
    assert not base_slice_path(tree.status).exists()


def test_defaults_follow_the_starting_model_and_a_flag_given_always_wins(tree):
    from daemon.config import CHAT_SAMPLE_PROMPTS, DEFAULT_SAMPLE_PROMPTS
    from daemon.training.arguments import parse_args

    def flags(*extra: str):
        parsed = parse_args(["--dataset", "a.jsonl", f"--output_dir={tree.output}", *extra])
        return parsed.training.learning_rate, parsed.training.warmup_steps, parsed.samples.sample_prompts

    assert flags() == (5e-4, 100, DEFAULT_SAMPLE_PROMPTS)  # the embedded model, from scratch
    base = export_tiny(tree.root / "base")  # its tokenizer carries only the product's default template
    assert flags(f"--model_name_or_path={base}") == (5e-5, 0, DEFAULT_SAMPLE_PROMPTS)
    (base / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert flags("--model_name_or_path", str(base)) == (5e-5, 0, CHAT_SAMPLE_PROMPTS)  # a chat model: questions
    assert flags(f"--model_name_or_path={base}", "--learning_rate=2e-4", "--warmup_steps", "5")[:2] == (2e-4, 5)
    rehearse = parse_args(["--dataset", "a.jsonl", f"--output_dir={tree.output}", f"--model_name_or_path={base}"])
    assert rehearse.replay.base_rehearsal is True  # a pretrained base rehearses its own answers (BENCHMARKS.md)
    given = ["--dataset", "a.jsonl", f"--output_dir={tree.output}", f"--model_name_or_path={base}"]
    assert parse_args([*given, "--base_rehearsal", "false"]).replay.base_rehearsal is False
    assert parse_args(["--dataset", "a.jsonl", f"--output_dir={tree.output}"]).replay.base_rehearsal is False
    # The embedded model distils its replayed and its own examples (the continual bench's picks); a base neither
    techniques = parse_args(["--dataset", "a.jsonl", f"--output_dir={tree.output}"]).techniques
    assert (techniques.replay_distillation, techniques.file_distillation) == (1.0, 0.7)
    techniques = parse_args(given).techniques
    assert (techniques.replay_distillation, techniques.file_distillation) == (0.0, 0.0)
    # Once the line has started, its origin decides, whatever a later file is given
    (tree.output / "origin.json").write_text(json.dumps({"base_model": str(base)}))
    assert flags()[:2] == (5e-5, 0)
    (tree.output / "origin.json").write_text(json.dumps({"base_model": None}))
    assert flags(f"--model_name_or_path={base}")[:2] == (5e-4, 100)


def test_hub_kernels_stay_off_unless_the_user_asks_for_them(tree, monkeypatch):
    """transformers 5 turns hub kernels on whenever the ``kernels`` package is installed: a CUDA model's
    first ``train()`` then fetches code from the Hub, which an offline daemon cannot (seen on an H200)."""
    pytest.importorskip("kernels")
    from daemon.training.model import load_pretrained

    folder = export_tiny(tree.root / "tiny")
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    assert load_pretrained(folder)[0].use_kernels is False
    monkeypatch.setenv("USE_HUB_KERNELS", "YES")
    assert load_pretrained(folder)[0].use_kernels is True


def _mapped_from(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process that map ``path`` (``/proc/self/maps``)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_trainable_parameters_leave_the_loaded_files_pages_before_the_first_optimizer_step(tmp_path):
    import torch

    from daemon.training.model import load_pretrained, own_trainable_memory

    folder = export_tiny(tmp_path / "model")
    model, _ = load_pretrained(folder)
    weights = folder / "model.safetensors"

    def in_file(tensor) -> bool:
        return any(start <= tensor.data_ptr() < end for start, end in _mapped_from(weights))

    params = dict(model.named_parameters())
    assert all(in_file(p) for p in params.values())  # as loaded: the file's copy-on-write pages
    frozen = params["model.norm.weight"]
    frozen.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in params.items()}
    copied = own_trainable_memory(model)
    assert copied == sum(p.numel() * p.element_size() for p in params.values() if p.requires_grad)
    assert not any(in_file(p) for p in params.values() if p.requires_grad)
    assert in_file(frozen)  # never written: left where it was
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings stay one parameter
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_the_lines_own_base_given_again_beside_a_checkpoint_is_not_warned_about_and_another_is(tree, caplog):
    """The README runs the daemon with --model_name_or_path, which it passes to every file: each file after the first
    warned that the flag was ignored, though the user did what the README says."""
    from daemon.config import ModelArguments
    from daemon.store.checkpoints import Checkpoint
    from daemon.store.origin import record_origin
    from daemon.training.model import starting_model

    base, other = export_tiny(tree.root / "base"), export_tiny(tree.root / "other")
    checkpoint = Checkpoint(export_tiny(tree.output / "checkpoint-5"), 5)
    record_origin(tree.output, str(base))
    for given, warned in ((str(base), False), (str(tree.root / "." / "base"), False), (str(other), True)):
        caplog.clear()
        with caplog.at_level("INFO", logger="daemon.training.model"):
            starting_model(ModelArguments(model_name_or_path=given), tree.output, 0, checkpoint, None, "text")
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert bool(warnings) == warned, warnings
        assert "continuing from" in caplog.text
    assert f"a line started from {base}" in warnings[0] and f"--model_name_or_path {other} is ignored" in warnings[0]
