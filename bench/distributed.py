"""Benchmark: the step cost of DDP and FSDP against one process, on the same total batch (CPU).

    .venv/bin/python bench/distributed.py                 # 2 ranks, the embedded model and a 20M one
    .venv/bin/python bench/distributed.py --quick         # fewer steps, the embedded model only

Each configuration trains a freshly initialised Llama through the stock ``Trainer`` on random
token blocks, total batch 8 x 256 tokens a step: one process with batch 8, or 2 ranks of batch 4
each, DDP under ``torchrun`` (gloo) or FSDP2 under ``accelerate launch`` with examples/fsdp.yaml
(``use_cpu: true``, and tests/cpu_fsdp/sitecustomize.py on the ranks' path: accelerate 1.16 does
not shard a CPU group by itself, docs/distributed.md). The cores are shared out: one process gets
every core, each of 2 ranks half of them. The first steps are warmup and not timed. Reported:
tokens/s over the timed steps, and each rank's peak resident memory (``ru_maxrss``: the model, its
gradients and Adam state, the activations, and the libraries, about 0.4 GB of them). Printed only:
BENCHMARKS.md is not written.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BATCH, SEQ, VOCAB, RANKS = 8, 256, 4096, 2
MODELS = {
    "embedded default (4.2M)": {},
    "20M": {
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    },
}


def worker(model: str, per_device: int, steps: int, warmup: int, out: Path) -> None:
    """One rank (or the single process): train, then write tokens/s and peak memory to ``out``."""
    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from daemon.training.model import DEFAULT_LLAMA_CONFIG

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, **{**DEFAULT_LLAMA_CONFIG, **MODELS[model]})
    ids = torch.randint(0, VOCAB, (BATCH * (steps + warmup), SEQ))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            per_device_train_batch_size=per_device,
            max_steps=steps + warmup,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_drop_last=True,
        )
        trainer = Trainer(model=LlamaForCausalLM(config), args=args, train_dataset=data, callbacks=[Clock()])
        trainer.train()
        sharded = bool(getattr(trainer, "is_fsdp_enabled", False))
    seconds = stamps[-1] - stamps[warmup - 1]
    rank = int(os.environ.get("RANK", "0"))
    result = {
        "rank": rank,
        "tokens_per_second": BATCH * SEQ * steps / seconds,
        "fsdp": sharded,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def run(kind: str, model: str, steps: int, warmup: int, cores: int) -> list[dict]:
    """Run one configuration in fresh processes; each rank's result."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        ranks = 1 if kind == "one process" else RANKS
        me = [str(Path(__file__).resolve()), "--worker", model, str(BATCH // ranks), str(steps), str(warmup), folder]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // ranks)), "PYTHONPATH": str(REPO)}
        if kind == "one process":
            cmd = [sys.executable, *me]
        elif kind == "DDP":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *me]
        else:
            text = (REPO / "examples" / "fsdp.yaml").read_text().replace("use_cpu: false", "use_cpu: true")
            (out / "fsdp.yaml").write_text(text)
            env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests" / "cpu_fsdp"), str(REPO)])
            launch = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0"]
            cmd = [*launch, "--config_file", str(out / "fsdp.yaml"), *me]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
        results = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    if kind == "FSDP" and not all(r["fsdp"] for r in results):
        raise SystemExit("FSDP was not in effect")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, the embedded model only")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        model, per_device, steps, warmup, out = options.worker[0], *map(int, options.worker[1:4]), options.worker[4]
        worker(model, per_device, steps, warmup, Path(out))
        return
    steps, warmup = (6, 2) if options.quick else (20, 3)
    cores = os.cpu_count() or 1
    models = list(MODELS)[:1] if options.quick else list(MODELS)
    print(f"total batch {BATCH} x {SEQ} tokens, {cores} cores, {steps} timed steps after {warmup}")
    print("| model | run | tokens/s | vs one process | peak RSS per rank (MB) |\n|---|---|---:|---:|---|")
    for model in models:
        base = None
        for kind in ("one process", "DDP", "FSDP"):
            results = run(kind, model, steps, warmup, cores)
            rate = min(r["tokens_per_second"] for r in results)  # the slowest rank sets the pace
            base = base or rate
            memory = ", ".join(f"{r['peak_rss_mb']:.0f}" for r in results)
            print(f"| {model} | {kind} | {rate:.0f} | {rate / base:.2f}x | {memory} |", flush=True)


if __name__ == "__main__":
    main()
