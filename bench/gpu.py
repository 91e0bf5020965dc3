"""Benchmark: ``python train.py`` against the plain Trainer script on a CUDA GPU, three Llama sizes.

    python bench/gpu.py [--megabytes 32] [--repeats 2]   # the table into BENCHMARKS.md (section gpu)
    python bench/gpu.py --model 1b --megabytes 4         # a 1.0B-parameter Llama (section gpu-1b)
    python bench/gpu.py --model smollm2 --architecture DIR   # SmolLM2-135M's shape (section gpu-smollm2)
    python bench/gpu.py --tiny                           # the same pipeline, a 2-layer model: runs anywhere

``--model smollm2`` takes the config and tokenizer of the folder ``--architecture`` names
(``bench/smollm2.py`` builds it) and initialises the weights at random: a step's cost depends on
the shapes, not the values, so the GPU needs neither the 538 MB of weights nor a download.

1. Data: every Python file of the standard library as ``{"text"}`` lines
   (``daemon.make_dataset``), repeated until the file holds ``--megabytes``.
2. Model: a Llama of about 110M parameters (12 layers, hidden 768, MLP 2048, 12 heads,
   tied embeddings, a 32,000-token byte-level BPE trained on the file's first 8 MB,
   SDPA attention), saved once; both contenders start from it. ``--model 1b``: Llama 3.2 1B's
   shape (16 layers, hidden 2048, MLP 8192, 32 heads, 8 key-value heads, tied) with that BPE;
   ``--model smollm2``: SmolLM2-135M-Instruct's config and tokenizer.
3. Runs: first the product with its defaults and inductor's cache empty (on a GPU: bf16
   autocast, the stock Trainer step, compiled, all chosen by itself: a model shape's first
   file). Then, alternating ``repeats`` times: the product with its defaults (the cache now
   filled: every later file), the peer (``bench/plain_trainer.py``) with ``--bf16 True``
   (its own default is fp32, which no one trains a GPU model in), and the product with
   ``--torch_compile False`` (eager). Same batch (16 x 1024 tokens), one pass over the file.
4. Reported: medians of whole-process wall time and trained tokens per wall second, the
   ratio product / peer, and for each training loop its tokens/s and model FLOPs
   utilisation: ``tokens/s x (6N + 12 L d T)`` (Chowdhery et al. 2022, PaLM, Appendix B)
   over the GPU's dense bf16 peak (the datasheet's, where the GPU is known, and the best
   8192^3 bf16 matmul measured in the same go).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import statistics
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import flops_per_token, write_section  # noqa: E402
from bench.end_to_end import run  # noqa: E402

MODEL = {  # about 110M parameters with the 32,000-token vocabulary (24.6M of them the tied embedding)
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
ONE_B = {  # Llama 3.2 1B's shape: 1.04B parameters with the 32,000-token vocabulary
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
TINY = {**MODEL, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4}  # fmt: skip
VOCAB = 32000
# Dense bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets (SXM parts; "with sparsity" halved).
DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


@dataclass
class Run:
    """One whole process: wall seconds, trained tokens and the seconds inside the training loop."""

    wall: float
    tokens: int
    train_seconds: float
    detail: str  # what the run decided (product: precision and workers) or reported


def corpus(work: Path, megabytes: float) -> Path:
    """The standard library's Python files as JSON lines, repeated up to ``megabytes`` MB."""
    from daemon.make_dataset import make_dataset

    lines_file, stdlib = work / "stdlib-all.jsonl", Path(sysconfig.get_paths()["stdlib"])
    packages = sorted(p for p in stdlib.iterdir() if p.is_dir() and p.name not in ("site-packages", "dist-packages"))
    make_dataset(packages, lines_file, max_chars=16000, pattern="*.py")
    lines = lines_file.read_bytes().splitlines(keepends=True)
    if not lines:
        raise SystemExit(f"no Python files under {stdlib}")
    data, size, target = work / "data.jsonl", 0, int(megabytes * 1e6)
    with data.open("wb") as out:
        while size < target:
            for line in lines:
                out.write(line)
                size += len(line)
                if size >= target:
                    break
    return data


def prefix(data: Path, out: Path, megabytes: float) -> Path:
    """The first whole lines of ``data`` up to ``megabytes`` MB, written to ``out``."""
    size, target = 0, int(megabytes * 1e6)
    with data.open("rb") as lines, out.open("wb") as sink:
        for line in lines:
            if size >= target:
                break
            sink.write(line)
            size += len(line)
    return out


def base_model(work: Path, data: Path, config: dict, architecture: Path | None = None) -> Path:
    """A freshly initialised Llama of ``config`` and a BPE tokenizer trained on ``data``'s first 8 MB.

    With ``architecture`` (a saved model's folder), its config and tokenizer instead, weights drawn anew.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from daemon.training.model import train_tokenizer

    base = work / "base"
    if architecture is not None:
        torch.manual_seed(0)
        LlamaForCausalLM(AutoConfig.from_pretrained(architecture)).save_pretrained(base)
        AutoTokenizer.from_pretrained(architecture).save_pretrained(base)
        return base

    def first_megabytes(limit: int = 8_000_000):
        seen = 0
        with data.open(encoding="utf-8") as lines:
            for line in lines:
                yield json.loads(line)["text"]
                seen += len(line)
                if seen >= limit:
                    return

    tokenizer = train_tokenizer(first_megabytes(), VOCAB)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            attn_implementation="sdpa",
            **config,
        )
    )
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base


def bf16_matmul_flops(n: int = 8192, repeats: int = 20) -> float:
    """FLOP/s of an ``n^3`` bf16 matmul on the GPU: the median of ``repeats`` event-timed products."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * n**3 / statistics.median(times)


def product(
    work: Path, data: Path, base: Path, name: str, shared: list[str], logs: Path, env: dict[str, str] | None = None
) -> Run:
    """One ``train.py`` run; ``detail`` says what its defaults decided and where its time went outside the loop."""
    out = work / name
    log = logs / f"{name}.log"
    launched = time.time()
    wall = run(
        [sys.executable, str(ROOT / "train.py"), "--dataset", str(data), "--model_name_or_path", str(base),
         "--output_dir", str(out / "model"), "--status_dir", str(out / "status"), *shared],
        cwd=work,
        log=log,
        env=env,
    )  # fmt: skip
    row = json.loads((out / "status" / "history.jsonl").read_text().splitlines()[-1])
    workers = json.loads((out / "status" / "training_status.json").read_text())["gradient_guard"]["workers"]
    lines = log.read_text().splitlines()
    precision = next((line.split("precision: ", 1)[1].split(" (")[0] for line in lines if "precision: " in line), "?")
    compiled = any("torch.compile: inductor's cache" in line for line in lines)
    stamped = [line for line in lines if line[:4].isdigit() and line[4:5] == "-"]
    first_log = datetime.strptime(stamped[0][:23], "%Y-%m-%d %H:%M:%S,%f").timestamp() if stamped else launched
    phases = next((line.rsplit("(", 1)[1].rstrip(")") for line in lines if "exported the model to" in line), "?")
    detail = (
        f"{precision}, {'compiled, ' if compiled else ''}{f'{workers} gradient workers' if workers else 'stock step'}; "
        f"start-up to the first log "
        f"line {first_log - launched:.1f} s, evaluation {row.get('eval_seconds') or 0:.1f} s, {phases}"
    )
    return Run(wall, row["tokens"], row["train_seconds"], detail)


def peer(work: Path, data: Path, base: Path, name: str, shared: list[str], logs: Path, bf16: bool) -> Run:
    """One run of the plain Trainer script (``--bf16 True`` where the GPU has bf16).

    ``USE_HUB_KERNELS=NO``: with the ``kernels`` package installed, transformers 5 fetches hub kernels
    at the first CUDA ``train()``, which fails offline; the product keeps them off by itself.
    """
    log = logs / f"{name}.log"
    wall = run(
        [sys.executable, str(ROOT / "bench" / "plain_trainer.py"), "--model_name_or_path", str(base),
         "--dataset", str(data), "--output_dir", str(work / name), "--num_train_epochs", "1",
         "--report_to", "none", *(["--bf16", "True"] if bf16 else []), *shared],
        cwd=work,
        log=log,
        env={**os.environ, "USE_HUB_KERNELS": "NO"},
    )  # fmt: skip
    line = next(line for line in log.read_text().splitlines() if line.startswith("peer trained "))
    tokens = int(line.split()[2])
    metrics = ast.literal_eval(line.split("; ", 1)[1])
    return Run(wall, tokens, float(metrics["train_runtime"]), "bf16 autocast" if bf16 else "fp32")


def gpu_line() -> str:
    """The GPU, its memory, the host's cores and the software versions."""
    import torch
    import transformers

    if not torch.cuda.is_available():
        return f"no GPU (CPU: {platform.processor() or platform.machine()}), torch {torch.__version__}"
    props = torch.cuda.get_device_properties(0)
    return (
        f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs; "
        f"{os.cpu_count()} CPU cores; torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"transformers {transformers.__version__}, Python {platform.python_version()}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=32, help="Size of the training file.")
    parser.add_argument("--repeats", type=int, default=2, help="Alternating repeats; the table shows medians.")
    parser.add_argument("--tiny", action="store_true", help="A 2-layer model, 1 MB, batch 4 x 128: a check anywhere.")
    parser.add_argument("--model", choices=["110m", "1b", "smollm2"], default="110m", help="The model's size.")
    parser.add_argument("--architecture", type=Path, default=None, help="--model smollm2: its config and tokenizer.")
    parser.add_argument("--no_eager", action="store_true", help="Skip the --torch_compile False runs.")
    parser.add_argument(
        "--warm_megabytes",
        type=float,
        default=None,
        help="Train the first run (the shape's first file, which fills inductor's cache) on this many MB of the "
        "file instead of all of it: a long file's measured runs without paying its length twice.",
    )
    parser.add_argument("--logs", type=Path, default=None, help="Keep every run's output in this folder.")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="Markdown file to update.")
    args = parser.parse_args()
    import torch
    from transformers import AutoConfig

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("bench/gpu.py: no CUDA GPU here, nothing to measure (--tiny checks the pipeline on any machine)")
        return 0
    if args.model == "smollm2" and args.architecture is None:
        parser.error("--model smollm2 needs --architecture (the folder bench/smollm2.py builds)")
    sizes = {"110m": MODEL, "1b": ONE_B, "smollm2": {}}
    config, seq, batch = (TINY, 128, 4) if args.tiny else (sizes[args.model], 1024, 16)
    section = "gpu" if args.model == "110m" else f"gpu-{args.model}"
    megabytes = 1.0 if args.tiny else args.megabytes
    shared = ["--max_seq_length", str(seq), "--per_device_train_batch_size", str(batch)]
    bf16 = cuda and torch.cuda.is_bf16_supported()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        logs = args.logs or work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        data = corpus(work, megabytes)
        base = base_model(work, data, config, args.architecture if args.model == "smollm2" else None)
        model_config = AutoConfig.from_pretrained(base)
        n_params, per_token = flops_per_token(model_config, seq)
        peaks = [bf16_matmul_flops()] if cuda else []
        env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache")}  # inductor's cache of this go only
        runs: dict[str, list[Run]] = {"first": [], "product": [], "peer": [], "eager": []}
        warm = data if args.warm_megabytes is None else prefix(data, work / "warm.jsonl", args.warm_megabytes)
        runs["first"].append(product(work, warm, base, "first", shared, logs, env))
        for i in range(args.repeats):
            runs["product"].append(product(work, data, base, f"product{i}", shared, logs, env))
            runs["peer"].append(peer(work, data, base, f"peer{i}", shared, logs, bf16))
            if not args.no_eager:
                runs["eager"].append(
                    product(work, data, base, f"eager{i}", [*shared, "--torch_compile", "False"], logs, env)
                )
            print({k: round(v[-1].wall, 1) for k, v in runs.items() if v}, flush=True)
            if cuda:
                peaks.append(bf16_matmul_flops())

    def median(key: str, of) -> float:
        return statistics.median(of(r) for r in runs[key])

    name = torch.cuda.get_device_properties(0).name if cuda else ""
    datasheet = next((tf * 1e12 for gpu, tf in DATASHEET_BF16_TFLOPS.items() if gpu in name), None)
    measured = max(peaks) if peaks else None
    rows = [
        "| run | settings | wall s | trained tokens | tokens / wall s | ratio to the peer | training loop tokens/s "
        "| loop TFLOP/s | MFU (datasheet) | of the measured matmul peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    peer_tps = median("peer", lambda r: r.tokens / r.wall)
    labels = {
        "first": "`train.py`, defaults, a model shape's first file (inductor's cache empty)",
        "product": "`train.py`, defaults, every later file",
        "eager": "`train.py --torch_compile False`",
        "peer": "plain Trainer script, `--bf16 True`",
    }
    if args.warm_megabytes is not None:
        labels["first"] = labels["first"][:-1] + f"; a {args.warm_megabytes:g} MB prefix of the file)"
    for key, label in labels.items():
        if not runs[key]:
            continue
        tps = median(key, lambda r: r.tokens / r.wall)
        shorter = key == "first" and args.warm_megabytes is not None  # another file: no ratio to the peer
        loop = median(key, lambda r: r.tokens / r.train_seconds)
        flops = loop * per_token
        rows.append(
            f"| {label} | {runs[key][0].detail} | {median(key, lambda r: r.wall):.1f} | {runs[key][0].tokens:,} "
            f"| {tps:,.0f} | {'n/a' if shorter else f'**{tps / peer_tps:.2f}x**'} | {loop:,.0f} | {flops / 1e12:.1f} "
            f"| {f'{flops / datasheet:.0%}' if datasheet else 'n/a'} "
            f"| {f'{flops / measured:.0%}' if measured else 'n/a'} |"
        )
    body = "\n".join(
        [
            f"## `train.py` against a plain Trainer script on a GPU (`bench/gpu.py --model {args.model}`)",
            "",
            f"Machine: {gpu_line()}. Run on {time.strftime('%Y-%m-%d')}, {args.repeats} alternating repeats "
            f"(medians), whole processes. A Llama of {n_params / 1e6:.0f}M parameters "
            f"({model_config.num_hidden_layers} layers, hidden {model_config.hidden_size}, SDPA attention, a "
            f"{model_config.vocab_size:,}-token vocabulary"
            + (f", {args.model}'s shape" if args.model != "110m" else "")
            + f"), batch {batch} x {seq} tokens, one pass over {megabytes:g} MB of the standard "
            "library's Python files. FLOPs per token 6N + 12LdT = "
            f"{per_token / 1e6:.0f} M (Chowdhery et al. 2022, PaLM, Appendix B). Peak: "
            + (f"the datasheet's dense bf16 {datasheet / 1e12:.0f} TFLOP/s; " if datasheet else "")
            + (f"measured 8192^3 bf16 matmul, best of the go, {measured / 1e12:.0f} TFLOP/s." if measured else "none."),
            "",
            *rows,
            "",
            "Per run: "
            + "; ".join(
                f"{key} {i}: {r.wall:.1f} s wall, {r.train_seconds:.1f} s in the loop ({r.detail})"
                for key, rs in runs.items()
                for i, r in enumerate(rs)
            )
            + ".",
        ]
    )
    if args.tiny:
        print(body)
        return 0
    write_section(args.out, section, body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
