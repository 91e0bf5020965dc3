"""Benchmark: ``python train.py`` against the plain Trainer script on files of 1 to 16 batches.

    .venv/bin/python bench/small_files.py [--batches 1 4 16] [--repeats 3]

Issue 14 asks that the defaults never train fewer tokens per wall second than the peer "for any
file of at least one batch". On a small file the whole process is mostly start-up (importing
torch and transformers, loading the model) and the work each side does around training: the
peer saves its model; the product also checks the file, evaluates, samples, exports, writes its
status, snapshot and report. ``bench/end_to_end.py`` measures files of a minute of training
and longer; this one measures files of ``--batches`` batches.

1. Data: Python's own ``json`` and ``email`` packages cut into pieces of a few source lines;
   a file of ``b`` batches takes pieces until the peer's blocks fill ``b`` batches of 8 x 256
   tokens (the peer drops the remainder, under 256 tokens).
2. Model: the embedded default model, bootstrapped once by ``train.py`` and exported; both
   contenders start from it.
3. One untimed run of each first (the OS's file cache, the product's ``--grad_workers auto``
   measurement, cached per machine and model shape), then the product's defaults and the peer's
   alternate, ``repeats`` times per file size. One pass over each file.
4. Reported: median whole-process wall seconds, trained tokens (the product's history row; the
   peer's whole 256-token blocks), tokens per wall second and their ratio, and where the product's wall time
   went: outside the file (imports, the report, exit), training, and the rest of the file's work
   (reading and tokenizing it, loading the model, evaluating, sampling, exporting, the snapshot).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, write_section  # noqa: E402
from bench.end_to_end import ROWS, SEQ, ProductRun, peer, peer_tokens, product, stdlib_file_and_base  # noqa: E402

BATCH_TOKENS = ROWS * SEQ  # one micro-batch of both sides
PIECE_LINES = 4  # source lines per JSONL line: pieces well under 256 tokens, so a file overshoots by less than a block


def file_of_batches(work: Path, source: Path, base: Path, batches: int) -> Path:
    """A JSONL file whose text the peer cuts into exactly ``batches`` batches of 256-token blocks.

    Raises:
        SystemExit: ``source`` has too little text for ``batches`` batches.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    pieces, tokens = [], 0
    for line in source.read_text().splitlines():
        lines = json.loads(line)["text"].splitlines(keepends=True)
        for i in range(0, len(lines), PIECE_LINES):
            text = "".join(lines[i : i + PIECE_LINES])
            if not text.strip():
                continue
            pieces.append(json.dumps({"text": text}) + "\n")
            tokens += len(tokenizer(text)["input_ids"])  # as the peer tokenizes: one line at a time
            if tokens >= batches * BATCH_TOKENS:
                path = work / f"{batches}-batches.jsonl"
                path.write_text("".join(pieces))
                return path
    raise SystemExit(f"{source} holds fewer than {batches} batches")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="File sizes, in batches.")
    parser.add_argument("--repeats", type=int, default=3, help="Alternating repeats; the table shows medians.")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="Markdown file to update.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source, base = stdlib_file_and_base(work, ("json", "email"), seed_lines=20)
        files = {b: file_of_batches(work, source, base, b) for b in args.batches}
        trained = {b: peer_tokens(data, base) for b, data in files.items()}  # what the peer trains of each
        product(work, files[args.batches[0]], base, "warm-product", [])
        peer(work, files[args.batches[0]], base, "warm-peer")
        products: dict[int, list[ProductRun]] = {b: [] for b in files}
        peer_walls: dict[int, list[float]] = {b: [] for b in files}
        for i in range(args.repeats):
            for b, data in files.items():
                products[b].append(product(work, data, base, f"p{b}-{i}", []))
                peer_walls[b].append(peer(work, data, base, f"q{b}-{i}"))
                print(b, i, f"product {products[b][-1].wall:.1f} s, peer {peer_walls[b][-1]:.1f} s", flush=True)

    def median(b: int, of) -> float:
        return statistics.median(of(r) for r in products[b])

    rows = [
        "| file | run | wall s (median) | trained tokens | tokens / wall s (median) | ratio to the peer "
        "| product: outside the file (imports, report, exit) s, training s, the file's other work s |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in args.batches:
        size = f"{b} batch{'es' if b > 1 else ''}"
        rate = median(b, lambda r: r.tokens / r.wall)
        peer_rate = statistics.median(trained[b] / w for w in peer_walls[b])
        split = (
            f"{median(b, lambda r: r.wall - r.file_seconds):.1f}, {median(b, lambda r: r.train_seconds):.1f}, "
            f"{median(b, lambda r: r.file_seconds - r.train_seconds):.1f}"
        )
        rows += [
            f"| {size} | `train.py` defaults | {median(b, lambda r: r.wall):.1f} | {products[b][0].tokens:,} "
            f"| {rate:,.0f} | **{rate / peer_rate:.2f}x** | {split} |",
            f"| {size} | plain Trainer script | {statistics.median(peer_walls[b]):.1f} | {trained[b]:,} "
            f"| {peer_rate:,.0f} | 1.00x | |",
        ]
    body = "\n".join(
        [
            "## Small files: `train.py` against a plain Trainer script (`bench/small_files.py`)",
            "",
            f"Machine: {machine()}. Run on {time.strftime('%Y-%m-%d')}, {args.repeats} alternating repeats after "
            "one untimed run of each; whole processes. Same embedded model (4.2M parameters), batch 8 x 256 "
            "tokens, one pass; files cut from Python's json and email packages so that the peer trains exactly "
            "the named number of batches (the product packs the same text and trains what its history row says; "
            "a file under 16 examples keeps all of them for training, larger ones hold out a slice).",
            "",
            *rows,
        ]
    )
    write_section(args.out, "end-to-end-small", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
