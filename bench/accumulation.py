"""Benchmark: tokens/s of N gradient worker threads against the stock Trainer step, same cores.

    .venv/bin/python bench/accumulation.py                  # full table into BENCHMARKS.md
    .venv/bin/python bench/accumulation.py --quick          # one repeat, fewer steps (a smoke run)

Each configuration trains a freshly initialised Llama model through the real
``ThreadedAccumulationTrainer`` (``grad_workers=0`` is the stock ``Trainer``
step) on random token blocks: batch 8 x 256 tokens, fp32 or bf16 autocast.
The first steps are warmup and not timed. Configurations alternate within each
repeat (0, 1, 2, 4 workers, then again), and the table reports medians and the
ratio to the stock path measured in the same go. In fp32 it also gives each configuration's
FLOP/s (``6 N + 12 L d T`` a token, Chowdhery et al. 2022, PaLM, Appendix B) over the
model-shape peak: the bare matmuls of one micro-batch at the model's own shapes, measured just
before and just after each run (:func:`model_shape_flops`), the training loop's physical limit.
The training process's allocator settings (:mod:`daemon.training.speed.allocator`) are applied here too.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.training.speed import allocator  # noqa: E402

if __name__ == "__main__":  # as in the training process, before torch is imported; not in the benches importing this
    allocator.keep_freed_memory()

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from bench.common import flops_per_token, machine, model_shape_flops, write_section  # noqa: E402
from daemon.training.arguments import default_bf16  # noqa: E402
from daemon.training.model import DEFAULT_LLAMA_CONFIG  # noqa: E402
from daemon.training.speed.accumulation import AUTO_MAX_PARAMETERS, AUTO_WORKERS, ThreadedAccumulationTrainer  # noqa: E402

BATCH, SEQ, VOCAB = 8, 256, 4096
MODELS = {
    "embedded default (4.2M)": DEFAULT_LLAMA_CONFIG,
    "20M": {
        **DEFAULT_LLAMA_CONFIG,
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    },
}
WORKERS = (0, 1, 2, 4)


def tokens_per_second(config: dict, workers: int, bf16: bool, steps: int, warmup: int) -> float:
    """Train ``warmup + steps`` optimizer steps; tokens/s over the last ``steps``."""
    import datasets
    from transformers import TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **config))
    ids = torch.randint(0, VOCAB, (BATCH * (warmup + steps), SEQ)).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=warmup + steps,
            per_device_train_batch_size=BATCH,
            bf16=bf16,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_pin_memory=False,
        )
        trainer = ThreadedAccumulationTrainer(
            model=model, args=args, train_dataset=data, callbacks=[Clock()], grad_workers=workers
        )
        trainer.remove_callback(PrinterCallback)
        try:
            trainer.train()
        finally:
            trainer.shutdown_workers()
    return steps * BATCH * SEQ / (stamps[-1] - stamps[warmup - 1])


def run(steps: int, warmup: int, repeats: int) -> list[str]:
    """The table's rows: each configuration's median tokens/s, its ratio to the stock step and, in
    fp32, its FLOP/s over the model-shape peak (:func:`model_shape_flops`) measured between runs.

    Each fp32 run's peak is the mean of the measurements just before and just after it (a few
    seconds apart), so a machine whose speed drifts over minutes moves both alike.
    """
    rows = [
        "| model | precision | workers | intra-op threads each | tokens/s (median) | vs stock "
        "| of the model-shape peak |",
        "|---|---|---|---|---|---|---|",
    ]
    cores = torch.get_num_threads()
    # bf16 only where the CPU computes it natively: elsewhere it is many times slower than fp32 and
    # never the default (daemon.training.arguments.default_bf16), so its rows would only cost minutes.
    precisions = (False, True) if default_bf16() else (False,)
    for name, config in MODELS.items():
        c = LlamaConfig(vocab_size=VOCAB, **config)
        shape = (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, VOCAB)
        per_token = flops_per_token(c, SEQ)[1]
        for bf16 in precisions:
            results: dict[int, list[float]] = {w: [] for w in WORKERS}
            of_peak: dict[int, list[float]] = {w: [] for w in WORKERS}
            peak = None if bf16 else model_shape_flops(*shape, repeats=3)
            for _ in range(repeats):
                for workers in WORKERS:
                    results[workers].append(tokens_per_second(config, workers, bf16, steps, warmup))
                    if peak is not None:
                        before, peak = peak, model_shape_flops(*shape, repeats=3)
                        of_peak[workers].append(results[workers][-1] * per_token / ((before + peak) / 2))
            stock = statistics.median(results[0])
            for workers in WORKERS:
                tps = statistics.median(results[workers])
                label = "stock Trainer step" if workers == 0 else str(workers)
                intra = cores if workers == 0 else max(1, cores // workers)
                fraction = f"{statistics.median(of_peak[workers]):.0%}" if of_peak[workers] else "n/a (bf16)"
                rows.append(
                    f"| {name} | {'bf16 autocast' if bf16 else 'fp32'} | {label} | {intra} | {tps:,.0f} | "
                    f"{tps / stock:.2f}x | {fraction} |"
                )
                print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="Timed optimizer steps per run.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed optimizer steps per run.")
    parser.add_argument("--repeats", type=int, default=3, help="Alternating repeats; the table shows medians.")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 3 steps: a smoke run.")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="Markdown file to update.")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps = 1, 3
    logging.basicConfig(level=logging.WARNING)
    started = time.strftime("%Y-%m-%d")
    rows = run(args.steps, args.warmup, args.repeats)
    body = "\n".join(
        [
            "## Multi-thread gradient accumulation (`bench/accumulation.py`)",
            "",
            f"Machine: {machine()}. Run on {started}: batch {BATCH} x {SEQ} tokens, {args.warmup} warmup + "
            f"{args.steps} timed optimizer steps per run, {args.repeats} alternating repeats, medians. "
            f"`--grad_workers auto` takes the stock step above {AUTO_MAX_PARAMETERS / 1e6:.0f}M parameters; up to "
            f"that, {AUTO_WORKERS} workers (capped at the core count) or the stock step, whichever a short "
            "measurement on the machine finds faster (`daemon/training/speed/autotune.py`)."
            + ("" if default_bf16() else " No bf16 rows: this CPU has no native bf16, so training is fp32."),
            "",
            *rows,
        ]
    )
    write_section(args.out, "accumulation", body)
    print(f"updated {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
