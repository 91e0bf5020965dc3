"""``--use_peft``: one LoRA adapter carried across files, with the guarantees of full fine-tuning.

daemon/training/adapters.py, daemon/training/peft_flags.py and daemon/store/adapter_files.py.

A tiny local Llama is the base; two files are trained once for the module with a LoRA adapter,
and each test that changes the tree works on a copy of it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import REPO, Tree, export_tiny, run_cli, stdlib_documents, train, write_jsonl
from safetensors.torch import load_file

from daemon.exceptions import ConfigError
from daemon.store.status import history_violations
from daemon.training.arguments import parse_args

# grad_workers 2: the threaded accumulation computes the adapter's gradients (the base weights have none)
LORA = {"use_peft": True, "lora_r": 4, "save_steps": 5, "learning_rate": 5e-3, "grad_workers": 2}


def _text_file(path: Path, n: int, offset: int) -> Path:
    return write_jsonl(path, [{"text": d} for d in stdlib_documents(limit=n + offset)[offset:]])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def lora_tree(tmp_path_factory) -> tuple[Tree, Path, list[dict], dict[str, str]]:
    """A tree with two files trained on one adapter over a tiny base; the rows, and the base's file digests."""
    tree = Tree(tmp_path_factory.mktemp("lora"))
    base = export_tiny(tree.root / "base")
    digests = {p.name: _digest(p) for p in base.iterdir() if p.is_file()}
    a, b = _text_file(tree.root / "a.jsonl", 10, 0), _text_file(tree.root / "b.jsonl", 10, 10)
    rows = [train(tree, a, model_name_or_path=base, **LORA), train(tree, b, **LORA)]
    return tree, base, rows, digests


def _copy(lora_tree, to: Path) -> tuple[Tree, Path, list[dict]]:
    source, _, rows, _ = lora_tree
    shutil.copytree(source.root, to)
    # origin.json names the base by the path it was given: the copy's base is the same folder, unchanged
    return Tree(to), to / "base", rows


def test_two_files_continue_one_adapter_and_never_touch_the_base_weights(lora_tree):
    tree, base, (first, second), digests = lora_tree
    assert second["start_step"] == first["end_step"] and history_violations(tree.history()) == []
    end_a, end_b = tree.output / f"checkpoint-{first['end_step']}", tree.output / f"checkpoint-{second['end_step']}"
    assert not (end_b / "model.safetensors").exists()  # the adapter only: no copy of the base weights
    adapter_a, adapter_b = (
        load_file(end_a / "adapter_model.safetensors"),
        load_file(end_b / "adapter_model.safetensors"),
    )
    assert adapter_a and all("lora_" in name for name in adapter_a)
    lora_b = [name for name in adapter_b if "lora_B" in name]
    assert lora_b and all(adapter_b[n].abs().sum() > 0 for n in lora_b)  # trained away from peft's zero init
    assert any(not torch.equal(adapter_a[n], adapter_b[n]) for n in adapter_a)  # the second file changed it
    # One optimizer since the first step: its step count is the line's, not the second file's alone.
    optimizer = torch.load(end_b / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(adapter_b)  # moments for the adapter's tensors only
    assert {int(s["step"]) for s in optimizer["state"].values()} == {second["end_step"]}
    assert {p.name: _digest(p) for p in base.iterdir() if p.is_file()} == digests
    merged, original = load_file(tree.output / "model.safetensors"), load_file(base / "model.safetensors")
    untouched = [n for n in original if "proj" not in n]  # embeddings and norms carry no adapter
    assert untouched and all(torch.equal(merged[n], original[n]) for n in untouched)  # bitwise
    assert any(not torch.equal(merged[n], original[n]) for n in original if "proj" in n)


def test_the_merged_export_equals_base_plus_adapter_and_the_adapter_loads_with_peft(lora_tree):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tree, base, _, _ = lora_tree
    merged = AutoModelForCausalLM.from_pretrained(tree.output).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tree.output / "adapter").eval()
    assert not isinstance(merged, PeftModel) and not (tree.output / "adapter_config.json").exists()
    tokens = torch.arange(3, 35).reshape(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, with_adapter(tokens).logits, rtol=1e-4, atol=1e-5)
    card = (tree.output / "README.md").read_text()
    assert "## LoRA adapter" in card and str(base) in card and "| r / alpha / dropout | 4 / 8 / 0.0 |" in card
    status = json.loads((tree.status / "training_status.json").read_text())
    assert status["checkpoints"]["kind"] == "lora" and 0 < status["checkpoints"]["latest_bytes"]
    assert status["gradient_guard"]["workers"] == 2 and status["gradient_guard"]["skipped_steps"] == 0


# train.py in a process that SIGKILLs itself at one step: no handler, no cleanup, as a kill -9 from outside.
_KILLED_AT = """
import os, signal, sys
from daemon.training.callbacks import PlanCallback
from daemon.__main__ import main
original = PlanCallback.on_step_end
def on_step_end(self, args, state, control, **kwargs):
    if state.global_step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, args, state, control, **kwargs)
PlanCallback.on_step_end = on_step_end
main(["train", *sys.argv[1:]])
"""


def test_a_file_sigkilled_mid_way_resumes_its_adapter_exactly(lora_tree, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from test_resume import _losses

    straight, _, _ = _copy(lora_tree, tmp_path / "straight")
    expected = train(straight, _text_file(straight.root / "c.jsonl", 12, 20), **LORA)
    tree, _, _ = _copy(lora_tree, tmp_path / "killed")
    data = _text_file(tree.root / "c.jsonl", 12, 20)
    kill_at = expected["start_step"] + expected["planned_steps"] // 2 + 1
    argv = ["--dataset", str(data), *tree.flags(**LORA)]
    env = {**os.environ, "KILL_AT_STEP": str(kill_at), "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", _KILLED_AT, *argv], cwd=tree.root, env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert expected["start_step"] < max(int(p.name.split("-")[1]) for p in tree.output.glob("checkpoint-*")) < kill_at
    resumed = train(tree, data, **LORA)
    assert (resumed["start_step"], resumed["end_step"]) == (expected["start_step"], expected["end_step"])
    assert history_violations(tree.history()) == [] and [r["file"] for r in tree.history()][-1] == "c.jsonl"
    assert _losses(tree) == pytest.approx(_losses(straight), rel=1e-4)
    end = f"checkpoint-{expected['end_step']}/adapter_model.safetensors"
    torch.testing.assert_close(load_file(tree.output / end), load_file(straight.output / end), rtol=1e-4, atol=1e-6)


def test_rollback_restores_the_adapter_bitwise_and_exports_it_merged(lora_tree, tmp_path):
    from daemon.store.rollback import roll_back_to

    tree, _, (first, _) = _copy(lora_tree, tmp_path / "tree")
    kept = tree.output / f"checkpoint-{first['end_step']}"
    before = _digest(kept / "adapter_model.safetensors")
    roll_back_to(tree.output, tree.status, first["end_step"])
    assert sorted(p.name for p in tree.output.glob("checkpoint-*")) == [kept.name]
    assert _digest(kept / "adapter_model.safetensors") == before
    assert _digest(tree.output / "adapter" / "adapter_model.safetensors") == before  # the export's adapter too
    assert json.loads((tree.output / "export.json").read_text()) == {"global_step": first["end_step"]}
    assert (tree.output / "config.json").is_file() and "## LoRA adapter" in (tree.output / "README.md").read_text()
    nxt = train(tree, _text_file(tree.root / "d.jsonl", 6, 30), **LORA)
    assert nxt["start_step"] == first["end_step"] and history_violations(tree.history()) == []


def _everything(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--use_peft", "false"], "holds a LoRA adapter (r=4); --use_peft false cannot continue it"),
        (["--lora_r=8"], "holds a LoRA adapter of r=4; --lora_r 8 cannot continue it"),
        (["--lora_alpha", "16"], "holds a LoRA adapter of lora_alpha=8; --lora_alpha 16 cannot continue it"),
        (
            ["--lora_target_modules", "q_proj"],
            "holds a LoRA adapter of target_modules down_proj gate_proj k_proj o_proj q_proj up_proj v_proj; "
            "--lora_target_modules q_proj cannot continue it",
        ),
    ],
)
def test_a_switch_away_from_the_adapter_is_refused_in_one_line_and_writes_nothing(lora_tree, flags, says):
    tree, _, _, _ = lora_tree
    before = _everything(tree.root)
    data = str(tree.root / "a.jsonl")
    result = run_cli(["train.py", "--dataset", data, *tree.flags(save_steps=5), *flags], cwd=REPO)
    assert result.returncode != 0 and says in result.stderr and "--merge_adapter" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert _everything(tree.root) == before


def test_target_modules_equal_to_the_running_adapters_continue_it_and_others_are_refused(lora_tree):
    """--lora_target_modules given on a running adapter was neither refused nor applied. peft stores the default
    all-linear as one full name per layer, a list as given: each spelling of the same modules continues."""
    from daemon.store.adapter_files import targets_differ

    source, _, _, _ = lora_tree
    llama = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    stored = json.loads(next(source.output.glob("checkpoint-*/adapter_config.json")).read_text())["target_modules"]
    for same in (["all-linear"], llama, sorted(stored)):
        flags = parse_args(["--dataset", "x.jsonl", *source.flags(), "--lora_target_modules", *same])
        assert flags.peft.use_peft and flags.peft.lora_target_modules == same
    with pytest.raises(ConfigError, match="--lora_target_modules q_proj v_proj cannot continue it"):
        parse_args(["--dataset", "x.jsonl", *source.flags(), "--lora_target_modules", "q_proj", "v_proj"])
    listed = {"target_modules": ["v_proj", "q_proj"]}  # a line started with --lora_target_modules q_proj v_proj
    assert not targets_differ(["q_proj", "v_proj"], listed) and not targets_differ(["v_proj", "q_proj"], listed)
    assert targets_differ(["all-linear"], listed) and targets_differ(["q_proj"], listed)
    assert targets_differ(["q_proj", "v_proj", "k_proj"], listed)
    assert not targets_differ(["ALL-LINEAR"], {"target_modules": "all-linear"})
    assert targets_differ(["q_proj"], {"target_modules": "all-linear"})
    assert not targets_differ([".*proj"], {"target_modules": ".*proj"})


def test_use_peft_on_full_fine_tuning_checkpoints_or_without_a_base_is_refused(tree):
    from helpers import fake_checkpoint

    argv = ["--dataset", "x.jsonl", *tree.flags(), "--use_peft"]
    with pytest.raises(ConfigError, match="--use_peft trains an adapter on a pretrained base"):
        parse_args(argv)
    fake_checkpoint(tree.output, 7)
    with pytest.raises(ConfigError, match="holds full fine-tuning checkpoints; --use_peft cannot continue them"):
        parse_args(argv)


def _without_learning_rate(argv: list[str]) -> list[str]:
    at = argv.index("--learning_rate")
    return argv[:at] + argv[at + 2 :]


def test_flags_not_given_follow_the_running_adapter_and_lora_has_its_own_learning_rate(lora_tree, tree):
    from daemon.training.peft_flags import LORA_LEARNING_RATE

    source, base, _, _ = lora_tree
    flags = parse_args(["--dataset", "x.jsonl", *_without_learning_rate(source.flags())])
    assert flags.peft.use_peft and (flags.peft.lora_r, flags.peft.lora_alpha) == (4, 8)
    assert flags.training.learning_rate == LORA_LEARNING_RATE
    new = _without_learning_rate(tree.flags())
    fresh = parse_args(["--dataset", "x.jsonl", *new, "--model_name_or_path", str(base), "--use_peft=true"])
    assert fresh.training.learning_rate == LORA_LEARNING_RATE and fresh.peft.lora_settings()["r"] == 16
    assert parse_args(["--dataset", "x.jsonl", *new, "--model_name_or_path", str(base)]).training.learning_rate == 5e-5


def test_a_lora_line_rehearses_more_of_the_base_models_answers_unless_told(lora_tree, tree):
    from daemon.training.peft_flags import LORA_REHEARSAL_FRACTION
    from daemon.training.starting_defaults import PRETRAINED_DEFAULTS

    full_fraction = PRETRAINED_DEFAULTS["base_rehearsal_fraction"]

    _, base, _, _ = lora_tree
    argv = ["--dataset", "x.jsonl", *tree.flags(), "--model_name_or_path", str(base)]
    assert LORA_REHEARSAL_FRACTION > full_fraction
    assert parse_args([*argv, "--use_peft=true"]).replay.base_rehearsal_fraction == LORA_REHEARSAL_FRACTION
    assert parse_args(argv).replay.base_rehearsal_fraction == full_fraction
    given = parse_args([*argv, "--use_peft=true", "--base_rehearsal_fraction", "0.1"])
    assert given.replay.base_rehearsal_fraction == 0.1


def test_merge_adapter_continues_in_full_fine_tuning_at_the_same_step(lora_tree, tmp_path):
    from transformers import AutoModelForCausalLM

    tree, _, (_, second) = _copy(lora_tree, tmp_path / "tree")
    end = second["end_step"]
    exported = AutoModelForCausalLM.from_pretrained(tree.output).state_dict()
    flags = {k: v for k, v in LORA.items() if not k.startswith(("use_peft", "lora_"))}
    row = train(tree, _text_file(tree.root / "e.jsonl", 6, 30), merge_adapter=True, **flags)
    assert row["start_step"] == end and history_violations(tree.history()) == []
    merged_start = tree.output / f"checkpoint-{end}"
    assert (merged_start / "model.safetensors").is_file() and not (merged_start / "adapter_config.json").exists()
    assert (tree.output / f"merged-lora-checkpoint-{end}" / "adapter_model.safetensors").is_file()
    start_weights = load_file(merged_start / "model.safetensors")
    assert all(torch.allclose(start_weights[n], exported[n], atol=1e-6) for n in start_weights)  # base + adapter
    assert not (tree.output / "adapter").exists()
    after = tree.output / f"checkpoint-{row['end_step']}"
    assert (after / "model.safetensors").is_file() and not (after / "adapter_config.json").exists()
    plain = parse_args(["--dataset", "x.jsonl", *tree.flags()])  # the line is full fine-tuning now
    assert plain.peft.use_peft is False
    again = parse_args(["--dataset", "x.jsonl", *tree.flags(), "--merge_adapter"])  # a daemon gives it to every file
    assert again.peft.use_peft is False


def test_the_daemon_trains_a_stream_of_drops_on_one_adapter_with_replay_and_the_quality_gate(tree):
    from helpers import daemon_argv

    base = export_tiny(tree.root / "base")
    for i, name in enumerate(("1-a.jsonl", "2-b.jsonl")):
        _text_file(tree.inbox / name, 8, 8 * i)
    gate = ["--use_peft", "--model_name_or_path", str(base), "--max_regression", "5", "--on_regression", "rollback"]
    result = run_cli(daemon_argv(tree, "--once", *gate, replay_fraction=0.2), cwd=tree.root)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = tree.history()
    assert (first["outcome"], second["outcome"]) == ("done", "done") and second["start_step"] == first["end_step"]
    assert second["replayed_examples"] > 0 and history_violations(tree.history()) == []
    assert (tree.output / f"checkpoint-{second['end_step']}" / "adapter_config.json").is_file()
    assert (tree.output / "adapter" / "adapter_model.safetensors").is_file()


def test_a_cooldown_branch_trains_a_copy_of_the_adapter_and_the_main_line_continues_unchanged(lora_tree, tmp_path):
    tree, _, (_, second) = _copy(lora_tree, tmp_path / "tree")
    row = train(tree, _text_file(tree.root / "f.jsonl", 8, 30), cooldown_fraction=0.5, **LORA)
    assert row["start_step"] == second["end_step"] and history_violations(tree.history()) == []
    end = tree.output / f"checkpoint-{row['end_step']}" / "adapter_model.safetensors"
    exported = load_file(tree.output / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(exported[n], t) for n, t in load_file(end).items())  # the export is the cooled branch


def test_wrapping_a_model_in_an_adapter_prints_no_deprecation_of_peft_reading_transformers():
    """peft reads transformers 5's deprecated ``is_gradient_checkpointing`` in PeftModel's constructor: every LoRA
    file printed that FutureWarning into the daemon's log. Silenced there (only that message, only there)."""
    import warnings

    from helpers import tiny_model

    from daemon.training.adapters import attach_adapter
    from daemon.training.peft_flags import PeftArguments

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attach_adapter(tiny_model(320), PeftArguments(use_peft=True))
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_an_adapter_checkpoint_whose_config_is_torn_is_not_complete_and_the_line_stays_lora(lora_tree, tmp_path):
    """A save cut before its commit marker that lost ``adapter_config.json``'s content was taken as the latest
    complete checkpoint, called full fine-tuning, and train.py died reading it (JSONDecodeError)."""
    from daemon.store.checkpoints import latest_complete_checkpoint
    from daemon.training.peft_flags import running_kind

    tree, _, (first, second) = _copy(lora_tree, tmp_path / "tree")
    latest = tree.output / f"checkpoint-{second['end_step']}"
    (latest / "commit.json").unlink()  # cut between the Trainer's write and the marker
    (latest / "adapter_config.json").write_text("")  # ... and the config's content lost
    found = latest_complete_checkpoint(tree.output, set_aside=False)
    assert found is not None and found.global_step < second["end_step"]
    kind, config = running_kind(tree.output)
    assert kind == "lora" and config is not None and config["r"] == 4
    assert parse_args(["--dataset", "x.jsonl", *tree.flags()]).peft.use_peft is True
    (latest / "adapter_config.json").write_text("[]")  # JSON, but not peft's object
    assert latest_complete_checkpoint(tree.output, set_aside=False).global_step < second["end_step"]


def test_merge_adapter_inside_a_half_trained_file_is_refused_before_anything_changes(lora_tree, tmp_path, monkeypatch):
    """The merge inside a file was irreversible, and the file's plan (made under the adapter's rehearsal default)
    then refused every resume: the merge waits for the next file (docs/lora.md)."""
    from helpers import interrupt_at

    from daemon.exceptions import TrainingInterrupted
    from daemon.service.cli import check_training_flags, parse_daemon_args

    tree, _, (_, second) = _copy(lora_tree, tmp_path / "tree")
    data = _text_file(tree.root / "c.jsonl", 12, 20)
    with monkeypatch.context() as patch:
        interrupt_at(patch, second["end_step"] + 3)
        with pytest.raises(TrainingInterrupted):
            train(tree, data, **LORA)
    before = _everything(tree.output)
    plain = {k: v for k, v in LORA.items() if not k.startswith(("use_peft", "lora_"))}
    argv = ["--dataset", str(data), *tree.flags(**plain), "--merge_adapter"]
    with pytest.raises(ConfigError, match=r"--merge_adapter: c\.jsonl is half trained on the adapter .* resume it"):
        parse_args(argv)
    daemon_argv = [*tree.flags(**plain), "--merge_adapter"]  # a daemon checks its flags once, in a child
    with pytest.raises(ConfigError, match=r"--merge_adapter: c\.jsonl is half trained on the adapter"):
        check_training_flags(parse_daemon_args(daemon_argv)[0], daemon_argv)
    assert _everything(tree.output) == before and not list(tree.output.glob("merged-lora-*"))
    resumed = train(tree, data, **LORA)
    assert resumed["start_step"] == second["end_step"] and history_violations(tree.history()) == []
    row = train(tree, _text_file(tree.root / "d.jsonl", 6, 40), merge_adapter=True, **plain)  # the next file: merged
    assert (
        row["start_step"] == resumed["end_step"]
        and (tree.output / f"checkpoint-{row['end_step']}/model.safetensors").is_file()
    )


def _remote_code_base(base: Path, to: Path) -> Path:
    """A copy of ``base`` that needs its own code (``auto_map``): the tiny Llama under another model type."""
    shutil.copytree(base, to)
    (to / "configuration_tinyremote.py").write_text(
        "from transformers import LlamaConfig\n\n\n"
        "class TinyRemoteConfig(LlamaConfig):\n    model_type = 'tinyremote'\n"
    )
    (to / "modeling_tinyremote.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tinyremote import TinyRemoteConfig\n\n\n"
        "class TinyRemoteForCausalLM(LlamaForCausalLM):\n    config_class = TinyRemoteConfig\n"
    )
    config = json.loads((to / "config.json").read_text())
    config.update(
        model_type="tinyremote",
        architectures=["TinyRemoteForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_tinyremote.TinyRemoteConfig",
            "AutoModelForCausalLM": "modeling_tinyremote.TinyRemoteForCausalLM",
        },
    )
    (to / "config.json").write_text(json.dumps(config))
    return to


def test_a_rollback_rebuilds_the_export_on_a_base_with_its_own_code_when_the_line_trusts_it(lora_tree, tmp_path):
    """The rollback loaded the base without trust_remote_code: a traceback after the checkpoints were deleted, and
    every later start failed the same way. The line records the trust in origin.json; without it, one line."""
    import os
    import subprocess
    import sys

    tree, base, (first, _) = _copy(lora_tree, tmp_path / "tree")
    fresh = Tree(tmp_path / "fresh")  # a line started with --trust_remote_code records it
    train(fresh, _text_file(fresh.root / "a.jsonl", 4, 0), model_name_or_path=base, trust_remote_code=True)
    assert json.loads((fresh.output / "origin.json").read_text()) == {
        "base_model": str(base),
        "trust_remote_code": True,
    }
    remote = _remote_code_base(base, tmp_path / "remote-base")
    origin = tree.output / "origin.json"
    origin.write_text(json.dumps({"base_model": str(remote)}))  # a line from before origin.json recorded the trust
    rollback = ["-m", "daemon", "rollback", "--output_dir", str(tree.output), "--status_dir", str(tree.status)]
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": str(REPO)}  # not the home's

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *rollback, *argv], cwd=tree.root, env=env, capture_output=True, text=True
        )

    refused = run("--to_step", str(first["end_step"]))
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and "Traceback" not in refused.stderr and len(lines) == 1, refused.stderr[-2000:]
    assert f'add "trust_remote_code": true to {origin}' in lines[0]
    origin.write_text(json.dumps({"base_model": str(remote), "trust_remote_code": True}))
    finished = run("--to_step", str(first["end_step"]))  # finishes the interrupted rollback first
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert json.loads((tree.output / "export.json").read_text()) == {"global_step": first["end_step"]}
    kept = tree.output / f"checkpoint-{first['end_step']}" / "adapter_model.safetensors"
    assert _digest(tree.output / "adapter" / "adapter_model.safetensors") == _digest(kept)
    assert json.loads((tree.output / "config.json").read_text())["auto_map"]  # the merged base, its own code named


class _Killed(BaseException):
    """A SIGKILL at that point: nothing after it runs, no handler of the product catches it."""


def _plain(*drop: str) -> dict:
    """LORA's flags but the adapter's own (a file after --merge_adapter gives them, or one that lets them follow)."""
    return {k: v for k, v in LORA.items() if not k.startswith(("use_peft", "lora_")) and k not in drop}


def test_a_merge_killed_between_its_two_renames_continues_from_its_step_in_the_next_train_py(
    lora_tree, tmp_path, monkeypatch
):
    """The swap (checkpoint-N -> merged-lora-checkpoint-N, the stage -> checkpoint-N) killed between its renames
    left no checkpoint-N: the next run resumed from an earlier checkpoint inside a done file. The stage is committed
    before the swap and the next run finishes it before it reads a checkpoint: the merge stands."""
    from daemon.store.checkpoints import latest_complete_checkpoint
    from daemon.training import cli
    from daemon.training.adapters import merge_into_checkpoint

    tree, _, (_, second) = _copy(lora_tree, tmp_path / "tree")
    end, argv = second["end_step"], tree.flags(merge_adapter=True, **_plain())
    rename = Path.rename

    def killed_at_the_second(self: Path, target: Path) -> Path:
        if self.name.startswith(".merging-"):
            raise _Killed
        return rename(self, target)

    flags, latest = parse_args(["--dataset", "x.jsonl", *argv]), latest_complete_checkpoint(tree.output)
    with monkeypatch.context() as patch:
        patch.setattr(Path, "rename", killed_at_the_second)
        with pytest.raises(_Killed):
            merge_into_checkpoint(flags, latest)
    assert not (tree.output / f"checkpoint-{end}").exists()  # what the kill left
    monkeypatch.setattr(cli, "configure_logging", lambda: None)  # pytest keeps its log handlers
    assert cli.main(["--dataset", str(_text_file(tree.root / "e.jsonl", 6, 30)), *argv]) == 0
    rows = tree.history()
    assert [r["outcome"] for r in rows] == ["done"] * 3 and history_violations(rows) == []  # nothing reopened
    assert rows[-1]["start_step"] == end
    assert (tree.output / f"checkpoint-{end}" / "model.safetensors").is_file()  # the committed merge stands
    assert (tree.output / f"merged-lora-checkpoint-{end}" / "adapter_model.safetensors").is_file()
    assert not list(tree.output.glob(".merging-*"))
    assert (tree.output / f"checkpoint-{rows[-1]['end_step']}" / "model.safetensors").is_file()


def test_a_swap_cut_with_its_stage_not_committed_gives_the_adapter_back_and_rotation_leftovers_stay(tmp_path):
    """A stage without its commit marker (written by a version that committed it after the swap) is not trusted:
    the adapter checkpoint goes back. A merged-lora- folder whose checkpoint rotation removed is no interrupted swap."""
    from daemon.store.adapter_files import finish_interrupted_merge, interrupted_merges

    for name in ("merged-lora-checkpoint-5", ".merging-checkpoint-5", "checkpoint-3"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights").write_text(name)
    assert interrupted_merges(tmp_path) == [5] and finish_interrupted_merge(tmp_path) == [5]
    assert (tmp_path / "checkpoint-5" / "weights").read_text() == "merged-lora-checkpoint-5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-5"]
    later = tmp_path / "later"
    for name in ("merged-lora-checkpoint-5", ".merging-checkpoint-5", "checkpoint-9"):
        (later / name).mkdir(parents=True)
    assert interrupted_merges(later) == [] and finish_interrupted_merge(later) == []


def _rollback_across_a_merge_killed(lora_tree, to: Path, monkeypatch) -> tuple[Tree, dict, dict]:
    """A copy of the adapter line, merged by a third file, then rolled back to the first file's end (an adapter
    checkpoint) by a rollback killed right after its intent: ``(tree, the first file's row, later files' flags)``."""
    from daemon.store import rollback

    tree, _, (first, _) = _copy(lora_tree, to)
    plain = _plain("learning_rate")  # the defaults decide the rate
    train(tree, _text_file(tree.root / "c.jsonl", 6, 30), merge_adapter=True, **plain)

    def killed_after(stage: str) -> None:
        if stage == "intent":
            raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(rollback, "_reached", killed_after)
        with pytest.raises(_Killed):
            rollback.roll_back_to(tree.output, tree.status, first["end_step"])
    assert (tree.status / rollback.INTENT_FILE).is_file()
    return tree, first, plain


def test_train_py_finishes_a_rollback_across_a_merge_before_its_flags_follow_the_adapter(
    lora_tree, tmp_path, monkeypatch
):
    """A rollback from full checkpoints back to an adapter boundary, killed after its intent: train.py resolved
    --use_peft and the defaults (learning rate, rehearsal share) from the full checkpoints, then finished the
    rollback and trained the adapter with full fine-tuning's defaults."""
    from daemon.training import cli
    from daemon.training.peft_flags import LORA_LEARNING_RATE, LORA_REHEARSAL_FRACTION

    tree, first, plain = _rollback_across_a_merge_killed(lora_tree, tmp_path / "tree", monkeypatch)
    parsed, train_file = [], cli.train_file
    monkeypatch.setattr(cli, "train_file", lambda flags: parsed.append(flags) or train_file(flags))
    monkeypatch.setattr(cli, "configure_logging", lambda: None)  # pytest keeps its log handlers
    assert cli.main(["--dataset", str(_text_file(tree.root / "d.jsonl", 6, 40)), *tree.flags(**plain)]) == 0
    (flags,) = parsed
    assert flags.peft.use_peft is True and flags.training.learning_rate == LORA_LEARNING_RATE
    assert flags.replay.base_rehearsal_fraction == LORA_REHEARSAL_FRACTION
    row = tree.history()[-1]
    assert row["start_step"] == first["end_step"] and history_violations(tree.history()) == []
    assert (tree.output / f"checkpoint-{row['end_step']}" / "adapter_config.json").is_file()


def test_a_daemon_finishes_a_rollback_across_a_merge_before_it_checks_its_flags(lora_tree, tmp_path, monkeypatch):
    """The daemon checks its training flags once, in a child, and finished the rollback only after: --use_peft was
    refused against the full checkpoints the rollback takes away, and the daemon did not start."""
    from helpers import daemon_argv

    from daemon.store.rollback import INTENT_FILE

    tree, first, plain = _rollback_across_a_merge_killed(lora_tree, tmp_path / "tree", monkeypatch)
    result = run_cli(daemon_argv(tree, "--once", "--use_peft", **plain), cwd=tree.root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tree.status / INTENT_FILE).exists()
    assert sorted(p.name for p in tree.output.glob("checkpoint-*")) == [f"checkpoint-{first['end_step']}"]
