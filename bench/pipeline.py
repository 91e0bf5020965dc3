"""Benchmark: the data pipeline of ``train.py`` on a generated 1 GB JSONL file: MB/s and peak RSS.

    .venv/bin/python bench/pipeline.py [--megabytes 1024] [--long_line_megabytes 100]

1. Generate: Python's standard library as ``{"text"}`` lines (``daemon.make_dataset``),
   repeated, each copy's documents headed by a different comment line, up to the size.
2. Run ``train.py --dataset big.jsonl`` in a child process as a user would (fresh
   model: the tokenizer is trained on the file's first megabytes), read its log as it
   comes, and stop it with SIGTERM at its first optimizer step: the product
   checkpoints and exits with code 3.
3. Report the seconds from start to the plan line (scan and hash, parse to Arrow,
   tokenize and pack, held-out split: the whole data pipeline), the file's MB per
   second of that time, the seconds to the first optimizer step, and the child's peak
   resident memory (``VmHWM``, sampled until it exits). The target is a peak RSS under 2 GB:
   the file goes through the Arrow cache in ``map`` batches and is never held whole.
   Also: the progress updates the log showed while tokenizing and the longest silence
   between two of them, and the size of the dataset cache on disk.
4. The same run on a file of one line: one document of ``--long_line_megabytes`` MB of the
   standard library's text, whose peak anonymous memory must stay under 2 GB too (the
   tokenizer's memory grows with the text it is given at once: ``daemon.store.documents``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, write_section  # noqa: E402

MB = 1024 * 1024


def generate(path: Path, megabytes: int) -> tuple[int, int]:
    """Write about ``megabytes`` MB of JSON lines to ``path``; returns ``(bytes, lines)``."""
    base = path.with_suffix(".base.jsonl")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    subprocess.run([sys.executable, "-m", "daemon.make_dataset", str(stdlib), str(base)], cwd=ROOT, check=True)
    lines = base.read_text(encoding="utf-8").splitlines()
    base.unlink()
    target, written, copy, rows = megabytes * MB, 0, 0, 0
    prefix = '{"text": "'
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            for line in lines:
                assert line.startswith(prefix)
                row = f"{prefix}# copy {copy}\\n{line[len(prefix) :]}\n"
                out.write(row)
                written += len(row.encode("utf-8"))
                rows += 1
                if written >= target:
                    break
            copy += 1
    return path.stat().st_size, rows


def generate_long_line(path: Path, megabytes: int) -> int:
    """Write one ``{"text"}`` line of about ``megabytes`` MB of text (the documents of :func:`generate`); its bytes."""
    many = path.with_suffix(".many.jsonl")
    generate(many, megabytes)
    with open(many, encoding="utf-8") as f:
        text = "\n".join(json.loads(line)["text"] for line in f)
    many.unlink()
    path.write_text(json.dumps({"text": text[: megabytes * MB]}) + "\n", encoding="utf-8")
    return path.stat().st_size


class PeakWatch:
    """Samples a process's memory every 20 ms on a thread until it exits.

    ``peak`` is ``VmHWM``, the kernel's own high-water mark of the resident set (not
    ``wait4``'s ``ru_maxrss``: Linux carries the *parent's* peak into a child across
    fork and exec). ``peak_anon`` is the highest ``RssAnon`` sampled: the resident set
    without file-backed pages, i.e. without the memory-mapped Arrow cache, which the
    kernel can drop and read again at will.
    """

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.peak_anon = pid, 0.0, 0.0
        self.samples: list[tuple[float, float]] = []  # (time.perf_counter(), RssAnon MB)
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while True:
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            fields = {line.split(":")[0]: line.split()[1:2] for line in status.splitlines()}
            if not fields.get("VmHWM"):  # a zombie: exited, not yet reaped
                return
            self.peak = max(self.peak, int(fields["VmHWM"][0]) / 1024)
            self.samples.append((time.perf_counter(), int(fields["RssAnon"][0]) / 1024))
            self.peak_anon = max(self.peak_anon, self.samples[-1][1])
            time.sleep(0.02)

    def result(self) -> tuple[float, float]:
        """``(peak RSS MB, peak anonymous RSS MB)``."""
        self.thread.join(timeout=5)
        return self.peak, self.peak_anon

    def peak_anon_between(self, start: float, end: float) -> float:
        """The highest anonymous RSS (MB) sampled between two ``time.perf_counter()`` times."""
        return max((anon for t, anon in self.samples if start <= t <= end), default=0.0)


PHASES = ("parsed", "tokenizer", "planned", "first_step")  # the marks, in the order the log reaches them


def run_until_first_step(work: Path, data: Path) -> dict[str, float]:
    """Run ``train.py`` on ``data``; SIGTERM at the first step. Seconds to each phase and peak RSS (MB)."""
    cmd = [
        sys.executable, str(ROOT / "train.py"), "--dataset", str(data), "--output_dir", str(work / "model"),
        "--status_dir", str(work / "status"), "--dataset_cache_dir", str(work / "cache"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert child.stdout is not None
    marks: dict[str, float] = {"progress_updates": 0, "longest_silence": 0.0}
    tail: list[str] = []
    peak = PeakWatch(child.pid)
    last = 0.0
    for line in child.stdout:  # text mode: a progress bar's carriage returns end lines too
        tail = [*tail[-40:], line]
        now = time.perf_counter() - started
        if "tokenizer" in marks and "planned" not in marks:
            marks["longest_silence"] = max(marks["longest_silence"], now - last)
            marks["progress_updates"] += "tokenizing" in line
        if "daemon.store.status:" in line:
            print(
                f"{now:7.0f} s  {line.split('daemon.store.status: ')[-1]}", end="", flush=True
            )  # the phases' progress
        last = now
        if "bootstrapping the embedded model" in line:
            marks["parsed"] = now  # scanned, hashed and written to Arrow
        if "bootstrapped a" in line:
            marks["tokenizer"] = now
        if "effective batch" in line and "planned" not in marks:
            marks["planned"] = now
        if " step 1/" in line and "first_step" not in marks:
            marks["first_step"] = now
            child.send_signal(signal.SIGTERM)
    child.wait()
    marks["peak_rss_mb"], marks["peak_anon_mb"] = peak.result()
    bounds = [0.0, *(marks.get(k, 0.0) for k in PHASES), time.perf_counter() - started]
    for name, start, end in zip(["start", *PHASES], bounds, bounds[1:], strict=False):
        marks[f"anon_mb_to_{name}"] = peak.peak_anon_between(started + start, started + end)
    if "first_step" not in marks or child.returncode != 3:
        raise SystemExit(f"train.py did not reach its first step (exit {child.returncode}):\n{''.join(tail)}")
    return marks


def tokenizer_alone(model_dir: Path, data: Path, megabytes: int = 64) -> tuple[float, float]:
    """``(MB/s, MB)`` of the run's own tokenizer alone on the file's first ``megabytes`` MB (JSONL bytes).

    The same fast tokenizer the run trained, called as the pipeline calls it
    (``encode_batch_fast``, 1,000 texts a call, in one process on every core through the
    tokenizers library's own threads), with the JSON already parsed: the ceiling the data
    pipeline's tokenization is compared with.
    """
    from transformers import AutoTokenizer

    folder = max(model_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    backend = AutoTokenizer.from_pretrained(folder).backend_tokenizer
    texts, size = [], 0
    with open(data, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(line.encode("utf-8"))
            if size >= megabytes * MB:
                break
    started = time.perf_counter()
    for i in range(0, len(texts), 1000):
        backend.encode_batch_fast(texts[i : i + 1000], add_special_tokens=False)
    return size / MB / (time.perf_counter() - started), size / MB


def by_phase(marks: dict[str, float]) -> str:
    """The peak anonymous RSS of each phase of a run (:func:`run_until_first_step`), in words."""
    return (
        f"{marks['anon_mb_to_start']:,.0f} MB to the parse's end, {marks['anon_mb_to_parsed']:,.0f} MB "
        f"training the tokenizer, {marks['anon_mb_to_tokenizer']:,.0f} MB tokenizing, packing and splitting, "
        f"{marks['anon_mb_to_planned']:,.0f} MB to the first step, {marks['anon_mb_to_first_step']:,.0f} MB "
        "checkpointing and exiting"
    )


def long_line(megabytes: int) -> list[str]:
    """The table's rows for a run on a file of one line of ``megabytes`` MB (one document)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "line.jsonl"
        size = generate_long_line(data, megabytes) / MB
        marks = run_until_first_step(Path(tmp), data)
    return [
        f"| one line of {size:,.0f} MB (one document): start to plan | {marks['planned']:.0f} s, "
        f"{size / marks['planned']:.1f} MB/s |",
        f"| one line of {size:,.0f} MB: peak anonymous RSS (target < 2,048 MB) | **{marks['peak_anon_mb']:,.0f} MB**: "
        f"{by_phase(marks)} ({marks['peak_rss_mb']:,.0f} MB `VmHWM`) |",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=1024, help="Size of the generated file.")
    parser.add_argument("--long_line_megabytes", type=int, default=100, help="Size of the one-line file; 0: none.")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="Markdown file to update.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "big.jsonl"
        generated = time.perf_counter()
        size, rows = generate(data, args.megabytes)
        generated = time.perf_counter() - generated
        marks = run_until_first_step(work, data)
        cache_gb = sum(f.stat().st_size for f in (work / "cache").rglob("*") if f.is_file()) / 1024**3
        alone, alone_mb = tokenizer_alone(work / "model", data)
    long_rows = long_line(args.long_line_megabytes) if args.long_line_megabytes else []
    mb = size / MB
    then = (
        f"; then the same for a file of one line of {args.long_line_megabytes} MB of that text." if long_rows else "."
    )
    tokenizing = mb / (marks["planned"] - marks["tokenizer"])
    body = "\n".join(
        [
            "## Data pipeline on a big file (`bench/pipeline.py`)",
            "",
            f"Machine: {machine()}. Run on {time.strftime('%Y-%m-%d')}. A generated file of {mb:,.0f} MB "
            f"({rows:,} JSON lines of Python's standard library, repeated; written in {generated:.0f} s), "
            f"given to `train.py` with its defaults and a fresh model, stopped at the first optimizer step{then}",
            "",
            "| measure | result |",
            "|---|---|",
            f"| start-up, scan (validate, hash) and parse into the Arrow cache | {marks['parsed']:.0f} s |",
            f"| train the bootstrap tokenizer (first 16 MB) | {marks['tokenizer'] - marks['parsed']:.0f} s |",
            f"| tokenize, pack, split | {marks['planned'] - marks['tokenizer']:.0f} s, {tokenizing:.1f} MB/s |",
            f"| the same tokenizer alone on the file's first {alone_mb:.0f} MB (`encode_batch_fast`, one process, "
            f"{os.cpu_count()} cores) | {alone:.1f} MB/s: the pipeline's tokenization at "
            f"**{tokenizing / alone:.0%}** of it |",
            f"| progress while tokenizing | {marks['progress_updates']:,} updates in the log, at most "
            f"{marks['longest_silence']:.0f} s without a line |",
            f"| start to plan: the data pipeline | {marks['planned']:.0f} s, **{mb / marks['planned']:.1f} MB/s** |",
            f"| start to first optimizer step | {marks['first_step']:.0f} s |",
            f"| peak RSS of the process (`VmHWM`, with the mapped Arrow pages) | {marks['peak_rss_mb']:,.0f} MB |",
            f"| peak anonymous RSS (without the mapped Arrow cache; target < 2,048 MB) | "
            f"**{marks['peak_anon_mb']:,.0f} MB**: {by_phase(marks)} |",
            f"| dataset cache on disk (parsed records and tokens) | {cache_gb:.1f} GB |",
            *long_rows,
        ]
    )
    write_section(args.out, "pipeline", body)
    print(body)
    print(json.dumps(marks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
