"""Test helpers: real text, JSONL files, a temporary project tree, the tiny model, CLI and daemon runners.

Every model here is built from config (:data:`TINY_CONFIG`: 2 layers, hidden 32) with
a tokenizer trained locally on a few KB of text: offline, seconds per test.
Fixtures live in ``conftest.py``; tests import these with ``from helpers import ...``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The one tiny model of the suite: a 2-layer Llama, hidden 32.
TINY_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}
TINY_MODEL = ",".join(f"{k}={v}" for k, v in TINY_CONFIG.items())  # as --config_overrides


def tiny_model(vocab_size: int, seed: int = 0):
    """A freshly initialised :data:`TINY_CONFIG` Llama with tied embeddings."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=True, **TINY_CONFIG))


def export_tiny(output_dir: Path, global_step: int = 1) -> Path:
    """Export a fresh :data:`TINY_CONFIG` model the way a run does: the bootstrap tokenizer and model, ``export_model``.

    The tokenizer (vocabulary 320) is trained on :func:`stdlib_documents` and has the default
    chat template; the model's config names its EOS and PAD tokens. Returns ``output_dir``.
    """
    from daemon.checkpoints import export_model
    from daemon.config import ModelArguments
    from daemon.model import bootstrap_model, train_tokenizer

    tokenizer = train_tokenizer(stdlib_documents(), vocab_size=320)
    model = bootstrap_model(tokenizer, ModelArguments(config_overrides=TINY_MODEL), seed=0)
    output_dir.mkdir(parents=True, exist_ok=True)
    export_model(model, tokenizer, output_dir, global_step)
    return output_dir


# Real text that ships with Python: the json package's sources.
_JSON_PKG = Path(json.__file__).parent


def stdlib_documents(limit: int = 40, chars: int = 600) -> list[str]:
    """Pieces of the json package's source, ``chars`` characters each."""
    docs: list[str] = []
    for path in sorted(_JSON_PKG.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        docs.extend(text[i : i + chars] for i in range(0, len(text), chars))
    return docs[:limit]


def write_jsonl(path: Path, rows: list[object]) -> Path:
    """Write rows (objects are JSON-encoded, str rows are written verbatim) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class Tree:
    """A temporary project tree: inbox, status, output and a datasets cache."""

    root: Path

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def status(self) -> Path:
        return self.root / "status"

    @property
    def output(self) -> Path:
        return self.root / "current_model"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def flags(self, **overrides: object) -> list[str]:
        """Flags for a tiny, fast, deterministic run in this tree; ``overrides`` replace or add flags."""
        flags: dict[str, object] = {
            "output_dir": self.output,
            "status_dir": self.status,
            "dataset_cache_dir": self.cache,
            "config_overrides": TINY_MODEL,
            "tokenizer_vocab_size": 320,
            "max_seq_length": 32,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "warmup_steps": 0,
            "logging_steps": 1,
            "save_steps": 1000,
            "status_interval": 0.1,
            "sample_max_new_tokens": 4,
            "seed": 0,
        }
        flags.update(overrides)
        argv: list[str] = []
        for key, value in flags.items():
            argv += [f"--{key}"] + ([str(v) for v in value] if isinstance(value, list) else [str(value)])
        return argv

    def history(self) -> list[dict]:
        """The rows of ``status/history.jsonl`` (torn lines skipped, as the product reads them)."""
        from daemon.status import read_history

        return read_history(self.status)


def train(tree: Tree, dataset: Path, **overrides: object) -> dict:
    """Run the training code path in-process (as ``train.py`` does) and return the history row."""
    from daemon.arguments import parse_args
    from daemon.run import train_file

    return train_file(parse_args(["--dataset", str(dataset), *tree.flags(**overrides)])).as_dict()


def run_cli(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run ``python <args>`` from the repository's interpreter, unbuffered, with a timeout."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def daemon_argv(tree: Tree, *extra: str, **overrides: object) -> list[str]:
    """``python -m daemon`` arguments for this tree: its folders, tiny-model flags, fast pick-up."""
    return [
        "-m",
        "daemon",
        "--inbox_dir",
        str(tree.inbox),
        "--settle_seconds",
        "1",
        "--rescan_seconds",
        "0.5",
        *extra,
        *tree.flags(**overrides),
    ]


def start_daemon(tree: Tree, *extra: str, log_name: str = "daemon.log", **overrides: object) -> subprocess.Popen:
    """Start a daemon in its own process group, logging to ``<tree>/<log_name>``."""
    log = open(tree.root / log_name, "ab")  # noqa: SIM115 - closed by the OS when the process ends
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, *daemon_argv(tree, *extra, **overrides)],
        cwd=tree.root,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def read_status(tree: Tree) -> dict:
    path = tree.status / "training_status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def fake_checkpoint(
    root: Path, step: int, *, state: bool = True, weights: bool = True, optimizer: bool = True, torn_state: bool = False
) -> Path:
    """A ``checkpoint-<step>`` folder shaped as the Trainer writes one (headers only, tiny tensors)."""
    import struct
    import zipfile

    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if state:
        (folder / "trainer_state.json").write_text('{"global_st' if torn_state else json.dumps({"global_step": step}))
    if weights:
        header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    for name in ("optimizer.pt", "scheduler.pt") if optimizer else ("scheduler.pt",):
        with zipfile.ZipFile(folder / name, "w") as z:  # what torch.save writes
            z.writestr("archive/data.pkl", b"state")
    return folder
