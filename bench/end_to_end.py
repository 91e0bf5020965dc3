"""Benchmark: ``python train.py`` against the plain Trainer script, whole processes, in the same go.

    .venv/bin/python bench/end_to_end.py [--repeats 2]

1. Data: Python's own ``json``, ``email``, ``http`` and ``logging`` packages as one
   ``{"text"}`` JSONL file (about 0.9 MB, about a minute of training on 2 cores).
2. Model: the embedded default model (4.2M parameters), bootstrapped once by
   ``train.py`` on a slice of that file and exported; both contenders start from it.
3. Runs alternate, ``repeats`` times: the product with its defaults, the peer
   (``bench/plain_trainer.py``) with its defaults, then both with identical settings
   (the product with ``--grad_workers 0``, i.e. the stock Trainer step, fp32 like the peer).
   Same model, data, batch size (8) and sequence length (256); one pass over the file.
4. Reported: medians of whole-process wall time and of trained tokens per second of
   wall time, the ratio product / peer, and the product's training FLOP/s against the
   best of several large-matmul measurements spread over the same go.

FLOPs per trained token: ``6 N + 12 L d T`` (N parameters, L layers, d hidden size,
T sequence length): the forward+backward matmuls plus the attention scores and values,
as in Chowdhery et al. 2022 (PaLM), Appendix B.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.accumulation import machine, write_section  # noqa: E402

SHARED = ["--max_seq_length", "256", "--per_device_train_batch_size", "8"]
PACKAGES = ("json", "email", "http", "logging")


def run(cmd: list[str], cwd: Path) -> float:
    """Run a whole process; its wall time in seconds (fails loudly on a non-zero exit)."""
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{result.stderr[-3000:]}")
    return wall


def matmul_flops(dtype_name: str, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an ``n x n`` matmul in this process (the machine's practical peak)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def product(work: Path, data: Path, base: Path, name: str, extra: list[str]) -> tuple[float, int, float]:
    """``(wall seconds, trained tokens, training-loop tokens/s)`` of one ``train.py`` run."""
    out = work / name
    wall = run(
        [sys.executable, str(ROOT / "train.py"), "--dataset", str(data), "--model_name_or_path", str(base),
         "--output_dir", str(out / "model"), "--status_dir", str(out / "status"), *SHARED, *extra],
        cwd=work,
    )  # fmt: skip
    row = json.loads((out / "status" / "history.jsonl").read_text().splitlines()[-1])
    status = json.loads((out / "status" / "training_status.json").read_text())
    return wall, row["tokens"], status["metrics"]["tokens_per_second"]


def peer(work: Path, data: Path, base: Path, name: str) -> float:
    """Wall seconds of one run of the plain Trainer script."""
    return run(
        [sys.executable, str(ROOT / "bench" / "plain_trainer.py"), "--model_name_or_path", str(base),
         "--dataset", str(data), "--output_dir", str(work / name), "--num_train_epochs", "1",
         "--report_to", "none", *SHARED],
        cwd=work,
    )  # fmt: skip


def peer_tokens(data: Path, base: Path) -> int:
    """Tokens the peer trains: the file tokenized and cut into whole 256-token blocks."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    total = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
    return (total // 256) * 256  # run_clm.py drops the remainder


def parameters_and_shape(base: Path) -> tuple[int, int, int]:
    """``(parameters, layers, hidden size)`` of the model in ``base``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    return model.num_parameters(), model.config.num_hidden_layers, model.config.hidden_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="Alternating repeats; the table shows medians.")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="Markdown file to update.")
    args = parser.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "stdlib.jsonl"
        subprocess.run(
            [sys.executable, "-m", "daemon.make_dataset", *(str(stdlib / p) for p in PACKAGES), str(data)],
            cwd=ROOT,
            check=True,
        )
        seed = work / "seed.jsonl"
        seed.write_text("".join(data.read_text().splitlines(keepends=True)[:200]))
        base = work / "base"
        run([sys.executable, str(ROOT / "train.py"), "--dataset", str(seed), "--output_dir", str(base),
             "--status_dir", str(work / "seed-status"), *SHARED], cwd=work)  # fmt: skip
        peer_trained = peer_tokens(data, base)
        n_params, layers, hidden = parameters_and_shape(base)
        results: dict[str, list[tuple[float, int]]] = {k: [] for k in ("product", "peer", "product-same", "peer-same")}
        loop_tps: list[float] = []
        # The peak is the best of measurements spread over the run: a shared machine's load only lowers it.
        peaks = {"float32": [matmul_flops("float32")], "bfloat16": [matmul_flops("bfloat16")]}
        for i in range(args.repeats):
            wall, tokens, tps = product(work, data, base, f"p{i}", [])
            results["product"].append((wall, tokens))
            loop_tps.append(tps)
            results["peer"].append((peer(work, data, base, f"q{i}"), peer_trained))
            wall, tokens, _ = product(work, data, base, f"ps{i}", ["--grad_workers", "0"])
            results["product-same"].append((wall, tokens))
            results["peer-same"].append((peer(work, data, base, f"qs{i}"), peer_trained))
            print({k: v[-1] for k, v in results.items()}, flush=True)
            for dtype, measured in peaks.items():
                measured.append(matmul_flops(dtype))
        fp32_peak, bf16_peak = max(peaks["float32"]), max(peaks["bfloat16"])
    flops_per_token = 6 * n_params + 12 * layers * hidden * 256
    train_flops = statistics.median(loop_tps) * flops_per_token

    def med(key: str) -> tuple[float, float]:
        walls = [w for w, _ in results[key]]
        tps = [t / w for w, t in results[key]]
        return statistics.median(walls), statistics.median(tps)

    rows = [
        "| run | settings | wall s (median) | trained tokens / wall s (median) | ratio to the peer |",
        "|---|---|---|---|---|",
    ]
    for key, peer_key, label in (
        ("product", "peer", "defaults of each"),
        ("product-same", "peer-same", "identical (fp32, stock Trainer step)"),
    ):
        (pw, pt), (qw, qt) = med(key), med(peer_key)
        rows.append(f"| `train.py` | {label} | {pw:.1f} | {pt:,.0f} | **{pt / qt:.2f}x** |")
        rows.append(f"| plain Trainer script | {label} | {qw:.1f} | {qt:,.0f} | 1.00x |")
    body = "\n".join(
        [
            "## `train.py` against a plain Trainer script (`bench/end_to_end.py`)",
            "",
            f"Machine: {machine()}. Run on {time.strftime('%Y-%m-%d')}, {args.repeats} alternating repeats, "
            "whole processes (start-up, tokenization, training, export; the product also evaluates, samples "
            "and writes its status and snapshot). Same embedded model (4.2M parameters), data (Python's json, "
            "email, http and logging packages), batch 8 x 256 tokens, one pass.",
            "",
            *rows,
            "",
            f"Training loop of `train.py` (defaults): {statistics.median(loop_tps):,.0f} tokens/s x "
            f"{flops_per_token / 1e6:.1f} MFLOP/token (6N + 12LdT, PaLM Appendix B; N = {n_params / 1e6:.2f}M) = "
            f"{train_flops / 1e9:.0f} GFLOP/s: **{train_flops / fp32_peak:.0%} of the fp32 matmul peak** "
            f"({fp32_peak / 1e9:.0f} GFLOP/s, best 2048x2048 matmul of the go) and "
            f"{train_flops / bf16_peak:.0%} of the "
            f"bf16 one ({bf16_peak / 1e9:.0f} GFLOP/s). The product trains in fp32 today.",
        ]
    )
    write_section(args.out, "end-to-end", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
