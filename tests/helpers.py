"""Test helpers: real text, JSONL files, a temporary project tree, the tiny model, CLI and daemon runners.

Every model here is built from config (:data:`TINY_CONFIG`: 2 layers, hidden 32) with
a tokenizer trained locally on a few KB of text: offline, seconds per test.
Fixtures live in ``conftest.py``; tests import these with ``from helpers import ...``.
"""

from __future__ import annotations

import contextlib
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


def export_tiny(output_dir: Path, global_step: int = 1, seed: int = 0) -> Path:
    """Export a fresh :data:`TINY_CONFIG` model the way a run does: the bootstrap tokenizer and model, ``export_model``.

    The tokenizer (vocabulary 320) is trained on :func:`stdlib_documents` and has the default
    chat template; the model's config names its EOS and PAD tokens; ``seed`` draws its weights. Returns ``output_dir``.
    """
    from daemon.config import ModelArguments
    from daemon.store.checkpoints import export_model
    from daemon.training.model import bootstrap_model, train_tokenizer

    tokenizer = train_tokenizer(stdlib_documents(), vocab_size=320)
    model = bootstrap_model(tokenizer, ModelArguments(config_overrides=TINY_MODEL), seed=seed)
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


SHAPES = ("text", "prompt_completion", "messages")


def shape_rows(shape: str, docs: list[str]) -> list[dict]:
    """The same documents as records of ``shape``: the product's three data shapes (TRL's conventions)."""
    if shape == "text":
        return [{"text": d} for d in docs]
    if shape == "prompt_completion":
        return [{"prompt": d[:16], "completion": d[16:200]} for d in docs]
    return [
        {"messages": [{"role": "user", "content": d[:16]}, {"role": "assistant", "content": d[16:200]}]} for d in docs
    ]


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
        """Flags for a tiny, fast, deterministic run in this tree; ``overrides`` replace or add flags (None: leave it
        to the product's default)."""
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
            # Every --save_steps checkpoint, as the tests of mid-file checkpoints need (tiny steps are
            # shorter than a checkpoint); tests/test_training.py tests the default's rule.
            "max_save_overhead": 0,
            # The latest weights exported, as the tests of what a file's steps trained need; the embedded
            # model's average is tested in tests/test_averaging.py.
            "average_exports": "none",
            "status_interval": 0.1,
            "sample_max_new_tokens": 4,
            "seed": 0,
        }
        flags.update(overrides)
        argv: list[str] = []
        for key, value in flags.items():
            if value is None:
                continue
            argv += [f"--{key}"] + ([str(v) for v in value] if isinstance(value, list) else [str(value)])
        return argv

    def history(self) -> list[dict]:
        """The rows of ``status/history.jsonl`` (torn lines skipped, as the product reads them)."""
        from daemon.store.status import read_history

        return read_history(self.status)


def train(tree: Tree, dataset: Path, **overrides: object) -> dict:
    """Run the training code path in-process (as ``train.py`` does) and return the history row."""
    from daemon.training.arguments import parse_args
    from daemon.training.run import train_file

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


def interrupt_at(monkeypatch, step: int, crash: BaseException | None = None) -> None:
    """Stop a file's training at ``global_step == step``: as the SIGTERM handler does, or raising ``crash``.

    Patches ``PlanCallback.on_step_end`` through ``monkeypatch`` (use a ``monkeypatch.context()`` to undo it
    before the resumed run).
    """
    from daemon.training.callbacks import PlanCallback

    original = PlanCallback.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == step:
            if crash is not None:
                raise crash
            self.stop_requested.set()  # what the SIGTERM handler does
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(PlanCallback, "on_step_end", on_step_end)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def new_tree(root: Path) -> Tree:
    """A :class:`Tree` at ``root`` with its inbox, status and output folders made (the ``tree`` fixture's)."""
    tree = Tree(root)
    for folder in (tree.inbox, tree.status, tree.output):
        folder.mkdir(parents=True)
    return tree


def text_file(path: Path, first: int, count: int = 12) -> Path:
    """``path`` as a ``{"text"}`` JSONL file of ``count`` standard-library documents from the ``first``."""
    return write_jsonl(path, [{"text": d} for d in stdlib_documents(limit=first + count)[first:]])


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


def fake_status_folder(status_dir: Path, files: int = 3, steps_per_file: int = 40) -> Path:
    """A status folder as a daemon leaves it after ``files`` done files, one failed file and an eval file.

    Written with the product's own writers (history rows, loss points, evaluation rows, a
    snapshot), with made-up but plausible figures: the report and the live view read it
    without any training. The failed file's reason and a sample hold HTML to be escaped.
    """
    import math

    from daemon.quality.forgetting import write_rows
    from daemon.store.records import HistoryRow, Outcome
    from daemon.store.status import StatusFile, append_loss_points
    from daemon.training.snapshots import GenerationSettings, write_snapshot

    status = StatusFile(status_dir)
    names = [f"drop-2026-01-{day:02d}.jsonl" for day in range(1, files + 1)]
    rows: list[dict] = []
    for i, name in enumerate(names):
        start, end = i * steps_per_file, (i + 1) * steps_per_file
        points = [
            {
                "step": step,
                "file": name,
                "loss": 6.0 * math.exp(-step / 60) + 1.5 + 0.4 * (step == start + 1),
                "learning_rate": 5e-4,
                "grad_norm": 1.0,
                "tokens_per_second": 2000.0 + 150 * i,
            }
            for step in range(start + 1, end + 1, 2)
        ]
        append_loss_points(status_dir, points)
        slices = [f"{(j + 1) * steps_per_file:08d}-{Path(names[j]).stem}" for j in range(i + 1)]
        model_rows = [
            {
                "step": end,
                "after_file": name,
                "sha256": f"{i:064x}",
                "slice": s,
                "kind": "held_out",
                "examples": 16,
                "tokens": 512,
                "bytes": 2048,
                "loss": 2.4 + 0.1 * (i - j) - 0.05 * j,
                "perplexity": math.exp(2.4),
                "bits_per_byte": 0.9,
                "prefix_loss": {"16": 2.4 + 0.1 * (i - j) - 0.05 * j},
            }
            for j, s in enumerate(slices)
        ]
        model_rows.append({**model_rows[0], "slice": "eval:golden.jsonl", "kind": "eval_file", "loss": 3.0 - 0.2 * i})
        model_rows[-1]["prefix_loss"] = {"16": 3.0 - 0.2 * i}
        write_rows(status_dir, start, model_rows)
        rows += model_rows
        row = HistoryRow(
            file=name,
            sha256=f"{i:064x}",
            start_step=start,
            end_step=end,
            planned_steps=steps_per_file,
            examples=steps_per_file * 8,
            tokens=steps_per_file * 8 * 256,
            wall_seconds=60.0 + i,
            train_seconds=50.0,
            train_loss=points[-1]["loss"] + 0.1,
            eval_loss=model_rows[i]["loss"],
            outcome=Outcome.DONE,
            error=None,
            finished_at="2026-01-01T00:00:00Z",
        )
        status.record_outcome(row)
    status.record_outcome(HistoryRow.failed("bad<script>.jsonl", "no usable examples: <b>not JSON</b> & empty"))
    settings = GenerationSettings(max_new_tokens=16, temperature=0.8, top_k=50, seed=0)
    samples = [
        {"prompt": "def ", "completion": "parse(s):\n    return <tag> & 'x'"},
        {"prompt": "The ", "completion": " encoder returns a str."},
    ]
    end = files * steps_per_file
    write_snapshot(status_dir, end, names[-1], rows[-2]["loss"], 16, settings, samples)
    status.update(
        state="training",
        global_step=end + 7,
        max_steps=end + steps_per_file,
        queue=["drop-2026-01-09.jsonl", "drop-2026-01-10.jsonl"],
        current_file={
            "name": "drop-2026-01-08.jsonl",
            "sha256": "f" * 64,
            "examples": 320,
            "eval_examples": 16,
            "tokens": 81920,
            "skipped_lines": 0,
            "start_step": end,
            "planned_steps": steps_per_file,
            "steps_done": 7,
            "progress": round(7 / steps_per_file, 4),
            "eta_seconds": 41.5,
        },
        metrics={"loss": 2.31, "learning_rate": 5e-4, "grad_norm": 0.9, "tokens_per_second": 2410.5},
        forgetting={"mean": 0.1, "max": 0.2, "worst_slice": slices[0], "backward_transfer": -0.1, "slices": files - 1},
    )
    status.update(lambda doc: doc["files"].update(queued=2))
    return status_dir


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def missing_browser() -> str | None:
    """Why the headless browser cannot run here (one line); None when chromium, chromedriver and selenium are there."""
    import shutil

    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            return f"{path} not found (install Debian's chromium and chromium-driver; .ci/run does)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


def headless_chromium(user_data_dir: Path, width: int = 1000, height: int = 800):
    """A selenium driver for headless Debian chromium, offline, with a fresh profile in ``user_data_dir``.

    The caller quits it. Page loads time out after 20 s, so a test stays bounded.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--window-size={width},{height}",
        f"--user-data-dir={user_data_dir}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(20)
    return driver


@contextlib.contextmanager
def small_disk(folder: Path, size_kib: int):
    """Mount a tmpfs of ``size_kib`` KiB on ``folder`` (made if missing) for the block; skips the test unless root.

    A real filesystem that fills up: writes past it fail with ENOSPC as on a full disk.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (a real full disk)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(folder)], check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (a real full disk)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill_disk(folder: Path, leave: int) -> Path:
    """Fill ``folder``'s filesystem with ``folder/other/filler`` until ``leave`` bytes are free; returns the filler.

    In a subfolder: a file at the root of an output folder would count as the export's.
    """
    import shutil

    filler = folder / "other" / "filler"
    filler.parent.mkdir(exist_ok=True)
    with open(filler, "ab") as f:
        f.write(bytes(max(0, shutil.disk_usage(folder).free - leave)))
    return filler
