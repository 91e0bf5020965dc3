"""WiSE-FT exports (--wise_ft): the trained weights interpolated with the base's, the weight chosen on the suite.

daemon.training.wise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import new_tree, read_status, text_file, train

from daemon.exceptions import ConfigError


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_the_wise_ft_export_interpolates_the_end_checkpoint_with_the_base_at_the_best_weight(
    tmp_path, monkeypatch, exported
):
    import hashlib

    import torch

    import daemon.training.wise as wise

    monkeypatch.setattr(wise, "ALPHAS", (0.5, 0.75))  # neither is the trained model itself
    digest = hashlib.sha256((exported / "model.safetensors").read_bytes()).hexdigest()
    tree = new_tree(tmp_path / "t")
    row = train(tree, text_file(tree.root / "f0.jsonl", 0), bf16=False, wise_ft=True, model_name_or_path=exported)
    recorded = read_status(tree)["evaluation"]["wise_ft"]
    assert set(recorded["losses"]) == {"0.5", "0.75"}
    alpha = recorded["alpha"]
    assert json.loads((tree.output / "export.json").read_text())["wise_ft"] == recorded
    assert recorded["losses"][str(alpha)] == min(recorded["losses"].values())
    base, end = _weights(exported), _weights(tree.output / f"checkpoint-{row['end_step']}")
    export = _weights(tree.output)
    for name, tensor in export.items():
        expected = (1 - alpha) * base[name].double() + alpha * end[name].double()
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6)
    assert not torch.equal(export["model.norm.weight"], end["model.norm.weight"])
    assert hashlib.sha256((exported / "model.safetensors").read_bytes()).hexdigest() == digest  # never written


def test_wise_ft_is_refused_with_peft_and_on_a_base_in_the_output_folder(tree, exported):
    import shutil

    from daemon.training.arguments import parse_args

    with pytest.raises(ConfigError, match="--wise_ft interpolates every weight"):
        parse_args(["--dataset", "x.jsonl", *tree.flags(wise_ft=True, model_name_or_path=exported, use_peft=True)])
    shutil.rmtree(tree.output)
    shutil.copytree(exported, tree.output)
    with pytest.raises(ConfigError, match="--wise_ft needs the base model's weights kept"):
        parse_args(["--dataset", "x.jsonl", *tree.flags(wise_ft=True)])
