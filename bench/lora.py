"""Benchmark: LoRA adapters (``--use_peft``) against full fine-tuning on SmolLM2-135M-Instruct (issue 31).

    .venv/bin/python bench/lora.py sweep [--rates 2e-4 5e-4 1e-3 2e-3] [--lora_r 16]   # LoRA's default learning rate
    .venv/bin/python bench/lora.py compare                          # full vs LoRA r=8 and r=64

Both modes continue SmolLM2-135M-Instruct (``bench/smollm2.py``) on the stream of
``bench/real_model.py sweep``: the two halves of ``asyncio``'s docstrings, batch 8 x 256,
``--eval_fraction 0.2``, each setting with ``train.py`` (the daemon's code path) into its own
folder, and score the base model and the final export with the product's own scorer
(:func:`bench.real_model.outcome`): ``domain gain`` (the drops' held-out loss, base minus
final, nats) and ``general change`` (the base-model slice, final minus base, nats).

``sweep`` runs ``--use_peft`` (default r=16, alpha 32) at each rate with ``--warmup_steps 0``: the
largest rate whose general change stays within :data:`bench.real_model.GENERAL_LIMIT` becomes
:data:`daemon.training.peft_flags.LORA_LEARNING_RATE`, the rule that chose full fine-tuning's 5e-5.
``compare`` runs full fine-tuning and LoRA r=8 and r=64, each at its own default rate, and
reports tokens per training second (of the files' own tokens, and of every token the steps
trained: the history rows' ``tokens + replayed_tokens``, replayed and rehearsed examples
included), the latest checkpoint's bytes (the status's
``checkpoints.latest_bytes``), wall seconds per file, and the gradient workers that
``--grad_workers auto`` chose (from the training log).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, write_section  # noqa: E402
from bench.real_model import drops, halves, independent, outcome, train_stream  # noqa: E402
from bench.smollm2 import smollm2_folder  # noqa: E402

RATES = (2e-4, 5e-4, 1e-3, 2e-3)
SETTINGS = {  # name: extra flags; each at its own default learning rate
    "full": [],
    "lora-r8": ["--use_peft", "--lora_r", "8"],
    "lora-r64": ["--use_peft", "--lora_r", "64"],
}


def _stream(work: Path, name: str, files: list[Path], base: Path, flags: list[str], seed: Path | None) -> list[dict]:
    """:func:`bench.real_model.train_stream` with the base-model slice copied in from ``seed`` (a status folder).

    The slice is the base model's own greedy answers and their step-0 score: the same for every
    setting of one base and precision, and generating it is the first file's longest phase on a
    loaded CPU (506 s under a load of 13 on 2 cores), so it is generated once.
    """
    status = work / name / "status"
    if seed is not None and not status.exists():
        (status / "eval_suite").mkdir(parents=True)
        for piece in (seed / "eval_suite").glob("00000000-*.jsonl"):
            shutil.copy2(piece, status / "eval_suite" / piece.name)
        rows = [r for r in (seed / "evaluations.jsonl").read_text().splitlines() if json.loads(r)["step"] == 0]
        (status / "evaluations.jsonl").write_text("".join(r + "\n" for r in rows))
    return train_stream(work, name, files, base, flags)


def _workers(work: Path, name: str) -> str:
    """What ``--grad_workers auto`` chose in a setting's training logs ("stock" or "N threads"), per file."""
    chosen = []
    for log in sorted(work.glob(f"{name}-*.log")):
        text = log.read_text(errors="replace")
        found = re.search(r"gradient accumulation on (\d+) worker threads", text)
        chosen.append(f"{found.group(1)} threads" if found else "stock")
    return " / ".join(chosen)


def _row(work: Path, base: Path, name: str, rows: list[dict]) -> dict:
    got = outcome(base, work, name)
    status = json.loads((work / name / "status" / "training_status.json").read_text())
    return {
        **got,
        "tokens_per_s": sum(r["tokens"] for r in rows) / sum(r["train_seconds"] for r in rows),
        # every token the steps trained: the file's, the replayed and the rehearsed (one epoch a file here)
        "trained_tokens_per_s": sum(r["tokens"] + r["replayed_tokens"] for r in rows)
        / sum(r["train_seconds"] for r in rows),
        "checkpoint_bytes": status["checkpoints"]["latest_bytes"],
        "wall": [r["wall_seconds"] for r in rows],
        "steps": "+".join(str(r["planned_steps"]) for r in rows),
        "workers": _workers(work, name),
    }


def _adapter_bytes(work: Path, name: str) -> int:
    """Bytes of the adapter's weights (``adapter_model.safetensors``) in the setting's exported ``adapter/`` folder."""
    return (work / name / "model" / "adapter" / "adapter_model.safetensors").stat().st_size


def sweep(work: Path, base: Path, rates: list[float], rank: int, seed: Path | None) -> str:
    """LoRA's learning-rate sweep at rank ``rank`` (markdown table)."""
    first, second = halves(drops(work)["text"])
    lines = [
        "| learning rate | domain gain (nats) | general change (nats) | human answers | licenses | answers right "
        "| tokens/s | steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rate in rates:
        name = f"lora-r{rank}-lr-{rate:g}"
        flags = ["--use_peft", "--lora_r", str(rank), "--learning_rate", str(rate), "--warmup_steps", "0"]
        got = _row(work, base, name, _stream(work, name, [first, second], base, flags, seed))
        seed = seed or work / name / "status"
        lines.append(
            f"| {rate:g} | {got['domain_gain']:.3f} | {got['general_change']:+.3f} | {independent(got)} | "
            f"{got['tokens_per_s']:.0f} | {got['steps']} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines)


def compare(work: Path, base: Path, seed: Path | None, training_seed: int | None = None) -> str:
    """Full fine-tuning against LoRA r=8 and r=64 on the same stream (markdown table).

    ``training_seed``: ``--seed`` of every setting (the held-out split, the order, LoRA's initialisation); None
    leaves the product's default.
    """
    extra = [] if training_seed is None else ["--seed", str(training_seed)]
    first, second = halves(drops(work)["text"])
    base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    lines = [
        "| setting | domain gain (nats) | general change (nats) | human answers | licenses | answers right "
        "| tokens/s | trained tokens/s | checkpoint | wall s per file | grad workers | steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    results = {}
    for name, flags in SETTINGS.items():
        got = results[name] = _row(work, base, name, _stream(work, name, [first, second], base, flags + extra, seed))
        seed = seed or work / name / "status"
        lines.append(
            f"| {name} | {got['domain_gain']:.3f} | {got['general_change']:+.3f} | {independent(got)} | "
            f"{got['tokens_per_s']:.0f} | {got['trained_tokens_per_s']:.0f} | "
            f"{got['checkpoint_bytes'] / 1e6:.1f} MB ({got['checkpoint_bytes'] / base_bytes:.1%} of the model) | "
            f"{' + '.join(f'{w:.0f}' for w in got['wall'])} | {got['workers']} | {got['steps']} |"
        )
        print(lines[-1], flush=True)
    full, r8 = results["full"], results["lora-r8"]
    adapter = _adapter_bytes(work, "lora-r8")
    lines += [
        "",
        f"LoRA r=8 against full fine-tuning: {r8['domain_gain'] / full['domain_gain']:.0%} of its domain gain "
        f"(target >= 70 %), general change {r8['general_change']:+.3f} against {full['general_change']:+.3f} "
        f"(target: at most half the rise), checkpoint {r8['checkpoint_bytes'] / full['checkpoint_bytes']:.1%} of "
        f"full fine-tuning's (target < 5 %; the adapter's weights are {adapter / base_bytes:.1%} of the model's, "
        f"its checkpoint with AdamW state and tokenizer {r8['checkpoint_bytes'] / base_bytes:.1%}), "
        f"tokens/s {r8['tokens_per_s'] / full['tokens_per_s']:.2f}x of the files' own tokens and "
        f"{r8['trained_tokens_per_s'] / full['trained_tokens_per_s']:.2f}x of every token the steps trained "
        "(replayed and rehearsed ones too; target >= 1.2x).",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["sweep", "compare"])
    parser.add_argument("--rates", type=float, nargs="+", default=list(RATES))
    parser.add_argument("--lora_r", type=int, default=16, help="sweep: the adapter's rank.")
    parser.add_argument("--seed_status", type=Path, help="A status folder whose base-model slice every setting reuses.")
    parser.add_argument("--seed", type=int, help="compare: --seed of every setting (a section of its own).")
    parser.add_argument("--keep", type=Path, help="Work in this folder and keep it (default: a temporary one).")
    args = parser.parse_args()
    base = smollm2_folder()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.mode == "sweep":
            table = sweep(work, base, args.rates, args.lora_r, args.seed_status)
        else:
            table = compare(work, base, args.seed_status, args.seed)
    body = f"Measured {time.strftime('%Y-%m-%d')} on {machine()}.\n\n{table}\n"
    print(body)
    section = f"lora sweep r{args.lora_r}" if args.mode == "sweep" else "lora compare"  # one section a rank
    if args.mode == "compare" and args.seed is not None:
        section += f" seed {args.seed}"
    write_section(ROOT / "BENCHMARKS.md", section, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
