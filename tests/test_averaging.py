"""Averaged exports (LAWA): the mean of the last file ends' checkpoints, exported and evaluated; the main line as ever.

daemon.training.averaging, daemon.training.averaging_flags.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import Tree, interrupt_at, read_status, stdlib_documents, train, write_jsonl

from daemon.exceptions import ConfigError
from daemon.quality.forgetting import read_rows
from daemon.training.averaging import averaged_steps
from daemon.training.ema import ema_steps

LAWA = {"average_exports": "lawa", "average_last": 3, "bf16": False}
EMA = {"average_exports": "ema", "ema_decay": 0.9, "bf16": False}


def _text_file(path: Path, first: int, count: int = 10) -> Path:
    return write_jsonl(path, [{"text": d} for d in stdlib_documents(limit=first + count)[first:]])


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _new_tree(root: Path) -> Tree:
    tree = Tree(root)
    for folder in (tree.inbox, tree.status, tree.output):
        folder.mkdir(parents=True)
    return tree


def _files(tree: Tree, count: int = 3, **flags: object) -> list[dict]:
    return [train(tree, _text_file(tree.root / f"f{n}.jsonl", 10 * n), **flags) for n in range(count)]


@pytest.fixture(scope="module")
def lawa(tmp_path_factory) -> Path:
    tree = _new_tree(tmp_path_factory.mktemp("lawa") / "t")
    _files(tree, **LAWA)
    return tree.root


def test_the_export_is_the_mean_of_the_last_file_ends_checkpoints_and_loads(lawa):
    import torch
    from transformers import AutoModelForCausalLM

    tree = Tree(lawa)
    ends = [row["end_step"] for row in tree.history()]
    state = json.loads((tree.output / "export.json").read_text())
    assert state == {"global_step": ends[-1], "averaged_steps": ends}
    exported = _weights(tree.output)
    checkpoints = [_weights(tree.output / f"checkpoint-{step}") for step in ends]
    assert exported.keys() == checkpoints[0].keys()
    for name, tensor in exported.items():
        mean = torch.stack([c[name].double() for c in checkpoints]).mean(0)
        torch.testing.assert_close(tensor.double(), mean, rtol=0, atol=1e-6)
    assert not torch.equal(exported["model.norm.weight"], checkpoints[-1]["model.norm.weight"])  # not the end's
    model = AutoModelForCausalLM.from_pretrained(tree.output)
    torch.testing.assert_close(model.state_dict()["model.embed_tokens.weight"], exported["model.embed_tokens.weight"])
    assert read_status(tree)["evaluation"]["averaged_steps"] == ends


def test_the_evaluation_scores_the_averaged_model(lawa):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from daemon.store.suite import load_suite
    from daemon.training.evaluation import Scorer, SliceScore

    tree = Tree(lawa)
    end = tree.history()[-1]["end_step"]
    rows = [r for r in read_rows(tree.status) if r["step"] == end]
    suite, _ = load_suite(tree.status, end, [], "text", 1000)
    tokenizer = AutoTokenizer.from_pretrained(tree.output)
    for folder, expected in ((tree.output, True), (tree.output / f"checkpoint-{end}", False)):
        model = AutoModelForCausalLM.from_pretrained(folder)
        scorer = Scorer(model, tokenizer, max_length=32, batch_size=8, autocast=None)
        piece = suite[0]  # the first file's slice, scored whole after every file (it is small)
        row = next(r for r in rows if r["slice"] == piece.name)
        score = SliceScore(piece.name, piece.kind)
        scorer.score(piece, 0, row["examples"], score)
        assert (abs(score.prefix_loss(score.examples) - row["loss"]) < 1e-5) is expected


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    tree = _new_tree(tmp_path_factory.mktemp("plain") / "t")
    _files(tree, bf16=False)
    return tree.root


@pytest.mark.parametrize("averaged", ["lawa", "ema"])
def test_the_main_lines_checkpoints_are_those_of_a_run_without_averaging(request, plain, averaged):
    import torch

    tree = Tree(request.getfixturevalue(averaged))
    plain = Tree(plain)
    rows = plain.history()
    assert [r["end_step"] for r in rows][: len(tree.history())] == [r["end_step"] for r in tree.history()]
    for step in (r["end_step"] for r in tree.history()):
        ours, theirs = _weights(tree.output / f"checkpoint-{step}"), _weights(plain.output / f"checkpoint-{step}")
        assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    assert json.loads((plain.output / "export.json").read_text()) == {"global_step": rows[-1]["end_step"]}
    assert not list(plain.output.glob("checkpoint-*/ema.safetensors"))


def test_a_rollback_exports_the_checkpoint_and_the_next_file_averages_the_ends_left(lawa, tmp_path):
    import torch

    from daemon.store.rollback import main as rollback

    shutil.copytree(lawa, tmp_path / "t")
    tree = Tree(tmp_path / "t")
    ends = [row["end_step"] for row in tree.history()]
    assert (
        rollback(["--to_step", str(ends[1]), "--output_dir", str(tree.output), "--status_dir", str(tree.status)]) == 0
    )
    assert json.loads((tree.output / "export.json").read_text()) == {"global_step": ends[1]}
    exported, checkpoint = _weights(tree.output), _weights(tree.output / f"checkpoint-{ends[1]}")
    assert all(torch.equal(exported[name], checkpoint[name]) for name in checkpoint)

    row = train(tree, _text_file(tree.root / "f3.jsonl", 30), **LAWA)
    state = json.loads((tree.output / "export.json").read_text())
    assert state == {"global_step": row["end_step"], "averaged_steps": [ends[0], ends[1], row["end_step"]]}


def test_averaged_steps_take_the_latest_kept_ends_on_disk(tmp_path):
    from helpers import fake_checkpoint

    for step in (10, 20, 30, 40):
        fake_checkpoint(tmp_path, step)
    assert averaged_steps(tmp_path, {10, 20, 30}, 40, 3) == [20, 30, 40]
    assert averaged_steps(tmp_path, {10, 20, 30, 99}, 40, 9) == [10, 20, 30, 40]  # 99: no checkpoint, not earlier
    assert averaged_steps(tmp_path, set(), 40, 3) == [40]
    assert averaged_steps(tmp_path, {10, 20, 30}, 40, 1) == [40]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"average_last": 5}, "--keep_file_checkpoints >= 4"),
        ({"cooldown_fraction": 0.2}, "--cooldown_fraction"),
        ({"average_last": 0}, "--average_last must be >= 1"),
        ({"ema_decay": 1.0}, "--ema_decay must be in"),
    ],
)
def test_averaging_flags_that_cannot_work_are_refused_in_one_line(tree, flags, message):
    from daemon.training.arguments import parse_args

    with pytest.raises(ConfigError, match=message):
        parse_args(["--dataset", "x.jsonl", *tree.flags(average_exports="lawa", **flags)])


@pytest.fixture(scope="module")
def ema(tmp_path_factory) -> Path:
    """Two files with --average_exports ema and a checkpoint at every step (none rotated away)."""
    tree = _new_tree(tmp_path_factory.mktemp("ema") / "t")
    _files(tree, 2, save_steps=1, save_total_limit=1000, **EMA)
    return tree.root


def test_every_checkpoint_holds_the_moving_average_of_its_step_and_the_export_is_the_ends(ema):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tree = Tree(ema)
    end = tree.history()[-1]["end_step"]
    averages = {s: load_file(tree.output / f"checkpoint-{s}" / "ema.safetensors") for s in range(1, end + 1)}
    first = _weights(tree.output / "checkpoint-1")
    assert all(torch.equal(averages[1][name], first[name]) for name in first)  # the initialisation counts for nothing
    for step in range(2, end + 1):  # bias-corrected: ema_t = ema_(t-1) + 0.1 / (1 - 0.9^t) (w_t - ema_(t-1))
        weights, rate = _weights(tree.output / f"checkpoint-{step}"), 0.1 / (1 - 0.9**step)
        assert ema_steps(tree.output / f"checkpoint-{step}") == step  # across the file boundary too
        for name, tensor in averages[step].items():
            previous = averages[step - 1][name].double()
            expected = previous + rate * (weights[name].double() - previous)
            torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6)
    assert json.loads((tree.output / "export.json").read_text()) == {"global_step": end, "ema_decay": 0.9}
    exported = AutoModelForCausalLM.from_pretrained(tree.output).state_dict()
    for name, tensor in averages[end].items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0)
    assert not (tree.output / "ema.safetensors").exists()  # training state, not part of the export
    assert read_status(tree)["evaluation"]["ema_decay"] == 0.9


def test_a_file_resumed_part_way_ends_with_the_average_of_one_trained_straight_through(ema, tmp_path, monkeypatch):
    import torch

    from daemon.exceptions import TrainingInterrupted

    straight = Tree(ema)
    first = straight.history()[0]
    tree = _new_tree(tmp_path / "t")
    train(tree, _text_file(tree.root / "f0.jsonl", 0), save_steps=1, save_total_limit=1000, **EMA)
    data = _text_file(tree.root / "f1.jsonl", 10)
    with monkeypatch.context() as patch:
        interrupt_at(patch, first["end_step"] + 2)
        with pytest.raises(TrainingInterrupted):
            train(tree, data, save_steps=1000, **EMA)  # the stop's checkpoint alone, mid-file
    row = train(tree, data, save_steps=1000, **EMA)
    assert row["end_step"] == straight.history()[1]["end_step"]
    ours = _ema(tree.output / f"checkpoint-{row['end_step']}")
    theirs = _ema(straight.output / f"checkpoint-{row['end_step']}")
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6)


def test_a_rollback_of_an_ema_line_exports_the_checkpoints_own_weights(ema, tmp_path):
    import torch

    from daemon.store.rollback import main as rollback

    shutil.copytree(ema, tmp_path / "t")
    tree = Tree(tmp_path / "t")
    ends = [row["end_step"] for row in tree.history()]
    assert (
        rollback(["--to_step", str(ends[0]), "--output_dir", str(tree.output), "--status_dir", str(tree.status)]) == 0
    )
    assert json.loads((tree.output / "export.json").read_text()) == {"global_step": ends[0]}
    exported, checkpoint = _weights(tree.output), _weights(tree.output / f"checkpoint-{ends[0]}")
    assert all(torch.equal(exported[name], checkpoint[name]) for name in checkpoint)
    assert not (tree.output / "ema.safetensors").exists()


def _ema(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "ema.safetensors")


def test_an_average_saved_without_its_step_count_continues_with_the_uncorrected_update(tmp_path):
    from types import SimpleNamespace

    import torch
    from safetensors.torch import save_file

    from daemon.training.ema import EmaCallback

    model = torch.nn.Linear(2, 2, bias=False)
    old = torch.zeros(2, 2)
    (tmp_path / "checkpoint-3").mkdir()
    save_file({"weight": old}, tmp_path / "checkpoint-3" / "ema.safetensors")  # an older checkpoint's: no "steps"
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=3, is_world_process_zero=True)
    callback = EmaCallback(model, 0.9)
    callback.on_train_begin(args, state, None)
    callback.on_step_end(args, state, None)
    torch.testing.assert_close(callback.average["weight"], 0.1 * model.weight.detach(), rtol=0, atol=1e-7)
    state.global_step = 4
    (tmp_path / "checkpoint-4").mkdir()
    callback.on_save(args, state, None)
    assert ema_steps(tmp_path / "checkpoint-4") is None  # still unrecorded: the next run continues the same way


def test_the_embedded_model_exports_its_weights_moving_average_unless_the_run_says_otherwise(tree, monkeypatch):
    from helpers import export_tiny

    from daemon.training.arguments import parse_args

    def export(*extra: str) -> tuple[str, float]:
        parsed = parse_args(["--dataset", "a.jsonl", f"--output_dir={tree.output}", *extra])
        return parsed.averaging.average_exports, parsed.averaging.ema_decay

    assert export() == ("ema", 0.9)  # the embedded model, from scratch (BENCHMARKS.md "continual")
    assert export("--average_exports", "none") == ("none", 0.9)  # a flag given wins
    assert export("--average_exports=lawa")[0] == "lawa"
    assert export("--cooldown_fraction", "0.2")[0] == "none"  # the cooldown branch is the export asked for
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert export()[0] == "none"  # no average is built for a sharded model
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    base = export_tiny(tree.root / "base")
    assert export(f"--model_name_or_path={base}")[0] == "none"  # a pretrained base: not measured with it
    assert export(f"--model_name_or_path={base}", "--use_peft")[0] == "none"  # so never an adapter's factors


def test_a_run_at_the_defaults_exports_the_average(tmp_path):
    tree = _new_tree(tmp_path / "t")
    row = train(tree, _text_file(tree.root / "f0.jsonl", 0), average_exports=None)  # the product's default
    assert json.loads((tree.output / "export.json").read_text()) == {"global_step": row["end_step"], "ema_decay": 0.9}
    assert (tree.output / f"checkpoint-{row['end_step']}" / "ema.safetensors").is_file()
