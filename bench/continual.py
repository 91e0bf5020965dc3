"""Benchmark: forgetting over a stream of five different texts, each setting against the union of all files.

    .venv/bin/python bench/continual.py [--quick | --candidates_only] [--extra_setting NAME "FLAGS..."] [--out FILE]
    .venv/bin/python bench/continual.py --tune_rates 5e-4 1e-3 2e-3 --warmup_steps 10   # the union alone

**Data.** Five sources of clearly different real text on the machine (:data:`SOURCES`): Python
stdlib code, the docstrings of other stdlib modules (English prose about code; a module gives
its code or its docstrings, never both), man pages (roff source, ``/usr/share/man/man1``),
Debian changelogs (``/usr/share/doc/*/changelog.Debian.gz``) and C headers (``/usr/include``).
Each source *file* goes, by a hash of its path (:func:`bench.continual_stats.split_of`), to the
tokenizer sample (20 %), the held-out slice (20 %) or training (60 %), so no document is shared.
Files are cut into documents of at most 1,000 characters (``daemon.make_dataset.split_text``;
400 for held-out ones, to keep scoring cheap), at most 6 per training file and 2 per held-out
file; a held-out document more than 20 % of whose word 8-grams occur in any training document is
dropped (license headers, boilerplate); each slice keeps ``--heldout_docs`` (32), all scored after every file.

**Model.** One tokenizer (the product's ``train_tokenizer``, 4,096 tokens) trained on the
tokenizer sample of every source. Each stream starts the way the product starts a line: the
embedded model bootstrapped with ``--seed`` (``bootstrap_model``), the bench handing it the shared
tokenizer instead of one trained on the first file; so within a repeat every setting starts from
the same weights (checked: the first file, with nothing to replay, trains to the same loss).
Not ``--model_name_or_path``: the product takes that for a pretrained base (fine-tuning
defaults, and a base-model slice generated and scored after every file, which doubled the time).
Hyperparameters: the product's scratch defaults, given explicitly (``--learning_rate``,
``--warmup_steps`` change them for every setting; ``--tune_rates`` trains only the union at each
rate, the issue's other choice, "one learning rate tuned on the union"): learning rate 5e-4, 100 warmup steps,
``constant_with_warmup``; batch 4 x 128 tokens (8 would not fit the 15-minute budget), files
sized by tokens to ``--steps_per_file`` (24) optimizer steps each. The export is named too: the
latest weights (``--average_exports none``) unless a setting names an average, as the product's
default does (replay and the weights' moving average, the second row).

**Repeats.** ``--repeats`` (5), repeat ``r`` with ``--seed r`` and the files rotated by ``r``
(every file first once; ``--first_seed S``: repeats S to S + 4, the same five orders under new
seeds); within a repeat every setting has the same seed, data and start.
Each setting (:func:`settings`; ``--extra_setting`` adds rows) trains the five files in order
with the product's code path (``daemon.training.run.train_file``); held-out slices are
``--eval_files``, so the rows of ``status/evaluations.jsonl`` after each file are the
forgetting matrix (of the exported model: the cooldown branch's or the average's). The union:
all training documents shuffled (then reshuffled for the part past one pass) and cut where it
reaches 0.8, 0.9, 1.0, 1.1 and 1.25x the no-replay stream's tokens; the cuts are trained one
after another as files without replay, so the scores after each are the union trained to that
many steps (a constant learning rate after warmup does not depend on the run's length).

**Metrics** (:func:`aggregate`). Gap = the mean over slices of the held-out loss after the last
file minus the union's at 1.0x the no-replay steps (each repeat's union curve, interpolated),
in nats per token and bits per byte (the rows' ``bits_per_byte``: nats x tokens / bytes / ln
2), paired per repeat, mean and 95 % t-interval. Worst slice: the largest over slices of the
repeats' mean per-slice gap. Union-equivalent compute: where the repeats' mean union curve
reaches the setting's mean loss (no extrapolation: "< 0.8", "> 1.25"). Steps: every optimizer
step, cooldown branch included, over the no-replay setting's. Plasticity guard: the last file's
own slice is at most 0.02 nats worse than without replay (mean over repeats). Seed noise: the
standard deviation of the union's 1.0x loss over repeats. Decision rule
(:func:`bench.continual_stats.becomes_default`): a setting replaces the current default only if
the upper 95 % bound of its per-repeat loss minus the default's is below 0.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import logging
import os
import random
import shlex
import statistics
import sys
import sysconfig
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import continual_stats as cs  # noqa: E402
from bench.common import hardware_class, machine, write_section  # noqa: E402
from daemon.make_dataset import docstrings, iter_text_files, read_text, split_text  # noqa: E402

STDLIB, MAN = Path(sysconfig.get_paths()["stdlib"]), Path("/usr/share/man/man1")
SKIPPED = {"test", "tests", "idlelib", "site-packages", "lib2to3", "ensurepip", "tkinter", "turtledemo"}
MAX_CHARS, HELDOUT_CHARS, MIN_CHARS, BATCH, SEQ = 1000, 400, 200, 4, 128
PER_FILE = {"train": 6, "heldout": 2, "tokenizer": 6}
TOKENIZER_CHARS = 150_000  # per source
UNION_POINTS = (0.8, 0.9, 1.0, 1.1, 1.25)


def plot_path(out: Path) -> Path:
    """The forgetting matrices' figure of this machine's class (one per class, as the sections of BENCHMARKS.md).

    In ``bench/`` beside ``out``, the markdown file the section goes to: the repository's own for
    BENCHMARKS.md, elsewhere for ``--out`` elsewhere (a trial go leaves the committed figure as it is).
    """
    return out.resolve().parent / "bench" / f"continual_forgetting-{hardware_class()}.png"


def _gunzip(path: Path) -> str | None:
    try:
        return gzip.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None


def _doc(path: Path) -> str | None:
    text = read_text(path)
    return docstrings(text) if text else None


SOURCES: dict[str, tuple[Callable[[], list[Path]], Callable[[Path], str | None]]] = {
    "python-code": (lambda: _stdlib_half(0), read_text),
    "docstrings": (lambda: _stdlib_half(1), _doc),
    # less the 16,000 generated, all-alike pages of Google Cloud's CLI
    "man-pages": (lambda: sorted({p.resolve() for p in MAN.glob("*.gz") if not p.name.startswith("gcloud")}), _gunzip),
    "changelogs": (lambda: sorted(Path("/usr/share/doc").glob("*/changelog.Debian.gz")), _gunzip),
    "c-headers": (lambda: list(iter_text_files(Path("/usr/include"), "*.h")), read_text),
}


def _stdlib_half(half: int) -> list[Path]:
    """Stdlib modules split in two by a hash of their name: code from one half, docstrings from the other."""
    paths = [p for p in iter_text_files(STDLIB, "*.py") if not SKIPPED & set(p.relative_to(STDLIB).parts)]
    return [p for p in paths if cs.split_of(f"half:{p.relative_to(STDLIB)}", 0.5, 0.0) == ("tokenizer", "train")[half]]


@functools.cache
def _files(name: str) -> tuple[Path, ...]:
    return tuple(SOURCES[name][0]())


def _pieces(name: str, split: str) -> Iterator[str]:
    """Documents of ``name``'s files in ``split``, files in a seeded order (seed 0), at most PER_FILE each."""
    read = SOURCES[name][1]
    files = [p for p in _files(name) if cs.split_of(f"{name}:{'/'.join(p.parts[-2:])}") == split]
    random.Random(0).shuffle(files)
    for path in files:
        text = read(path)
        size = HELDOUT_CHARS if split == "heldout" else MAX_CHARS
        docs = [d for d in split_text(text, size) if len(d.strip()) >= MIN_CHARS] if text else []
        yield from docs[: PER_FILE[split]]


def make_data(work: Path, steps_per_file: int, heldout_docs: int) -> dict:
    """Tokenizer, training and held-out files of every source: ``{"tokenizer", "train", "tokens", "paths"}``."""
    from daemon.training.model import train_tokenizer

    sample = []
    for name in SOURCES:
        size = 0
        for doc in _pieces(name, "tokenizer"):
            sample.append(doc)
            size += len(doc)
            if size >= TOKENIZER_CHARS:
                break
    tokenizer = train_tokenizer(sample, 4096)
    tokenizer.save_pretrained(work / "tokenizer")
    train, tokens, seen = {}, {}, set()
    for name in SOURCES:
        docs, counts = [], []
        for doc in _pieces(name, "train"):
            docs.append(doc)
            counts.append(len(tokenizer(doc)["input_ids"]) + 1)  # + EOS
            if sum(counts) >= steps_per_file * BATCH * SEQ:
                break
        train[name], tokens[name] = docs, counts
        seen |= set().union(*map(cs.shingles, docs))
    heldout = {}
    for name in SOURCES:
        kept = []
        for doc in _pieces(name, "heldout"):
            if not cs.near_duplicate(doc, seen):
                kept.append(doc)
            if len(kept) == heldout_docs:
                break
        heldout[name] = kept
        print(f"{name}: {len(train[name])} training documents ({sum(tokens[name]):,} tokens), {len(kept)} held out")
    paths = {}
    for name in SOURCES:
        for kind, docs in (("train", train[name]), ("heldout", heldout[name])):
            path = work / (f"{name}.jsonl" if kind == "train" else f"heldout-{name}.jsonl")
            path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
            paths[kind, name] = path
    return {"tokenizer": tokenizer, "train": train, "tokens": tokens, "paths": paths}


def settings(
    default: float,
    weight: float,
    distillation: tuple[float, float],
    decay: float,
    standard: bool,
    extra: list[list[str]],
) -> list[tuple[str, list[str]]]:
    """``(label, flags)`` per setting; the first is no replay, the second the current default (the embedded model's:
    replay ``default`` weighing ``weight`` in the loss, the replayed and the file's own examples distilled at
    ``distillation``, and its weights' moving average at ``decay``), then the standard settings if ``standard``
    (plain replay at ``default``, 25 %, and the default's replay under the other exports), then ``extra``.
    :func:`common_flags` export the latest weights (``--average_exports none``) where a setting names no average,
    and weigh every token alike and distil nothing where it names no weight or distillation."""
    d = ["--replay_fraction", str(default), "--replay_loss_weight", str(weight)]
    d += ["--replay_distillation", str(distillation[0]), "--file_distillation", str(distillation[1])]
    named = f"replay {default:.0%}" + (f" x{weight:g}" if weight != 1 else "")
    named += f" + distill {distillation[0]:g}" if distillation[0] else ""
    named += f" (own {distillation[1]:g})" if distillation[1] else ""
    ema = ["--average_exports", "ema", "--ema_decay", str(decay)]
    rows = [("no replay", ["--replay_fraction", "0"]), (f"{named} + EMA {decay:g} (default)", [*d, *ema])]
    if standard:
        rows += [
            (f"replay {default:.0%}", ["--replay_fraction", str(default)]),
            ("replay 25%", ["--replay_fraction", "0.25"]),
            (f"{named} + LAWA last 3", [*d, "--average_exports", "lawa", "--average_last", "3"]),
            (f"{named} + EMA 0.99", [*d, "--average_exports", "ema", "--ema_decay", "0.99"]),
            (f"{named} + cooldown 20% 1-sqrt", [*d, "--cooldown_fraction", "0.2", "--cooldown_shape", "1-sqrt"]),
        ]
    return rows + [(name, shlex.split(flags)) for name, flags in extra]


def common_flags(learning_rate: float, warmup_steps: int) -> list[str]:
    """Flags every run shares: learning rate and warmup given explicitly, the latest weights exported (a setting
    may name an average), every slice scored whole, tiny samples."""
    return [
        "--learning_rate", str(learning_rate), "--warmup_steps", str(warmup_steps), "--average_exports", "none",
        "--lr_scheduler_type", "constant_with_warmup", "--max_seq_length", str(SEQ),
        "--per_device_train_batch_size", str(BATCH), "--per_device_eval_batch_size", "32",
        "--eval_fraction", "0", "--eval_budget", "1000", "--replay_loss_weight", "1",
        "--replay_distillation", "0", "--file_distillation", "0",
        "--sample_max_new_tokens", "4", "--sample_prompts", "def ", "--save_steps", "100000",
    ]  # fmt: skip


def run_stream(work: Path, tag: str, files: list[Path], flags: list[str]) -> dict:
    """Train ``files`` in order in a fresh tree; its history rows, evaluation rows and wall seconds."""
    from daemon.quality.forgetting import read_rows
    from daemon.training.arguments import parse_args
    from daemon.training.run import train_file

    tree, started = work / tag, time.perf_counter()
    flags = ["--output_dir", str(tree / "model"), "--status_dir", str(tree / "status"), *flags]
    history = [train_file(parse_args(["--dataset", str(path), *flags])).as_dict() for path in files]
    return {"history": history, "rows": read_rows(tree / "status"), "wall": time.perf_counter() - started}


def scores(run: dict, names: list[str]) -> list[dict[str, tuple[float, float]]]:
    """After each file: ``{source: (loss nats/token, bits per byte)}`` of every held-out slice."""
    steps = [h["end_step"] for h in run["history"]]
    by = {(r["step"], r["slice"]): (r["loss"], r["bits_per_byte"]) for r in run["rows"]}
    return [{n: by[step, f"eval:heldout-{n}.jsonl"] for n in names} for step in steps]


def run_repeat(
    work: Path, data: dict, r: int, order: list[str], rows: list[tuple[str, list[str]]], base: list[str]
) -> dict:
    """One repeat: every setting, then the union; per setting its scores after each file and its steps."""
    names = list(SOURCES)
    flags = repeat_flags(work, data, r, base)
    out: dict = {"order": order, "seed": r, "settings": {}}
    for i, (label, extra) in enumerate(rows):
        run = run_stream(work, f"r{r}-s{i}", [data["paths"]["train", n] for n in order], [*flags, *extra])
        steps = sum(h["planned_steps"] + (h["cooldown_steps"] or 0) for h in run["history"])
        trained = sum(h["train_seconds"] + (h["cooldown_seconds"] or 0) for h in run["history"])
        out["settings"][label] = {"scores": scores(run, names), "steps": steps, "wall": run["wall"], "train_s": trained}
        first = run["history"][0]["train_loss"]
        if i == 0:
            start = first
        elif abs(first - start) > 1e-4:  # the first file has nothing to replay: the same run for every setting
            print(f"  warning: {label}'s first file trained to {first:.4f}, no replay's to {start:.4f}")
        print(f"  repeat {r} {label}: {steps} steps, {run['wall']:.0f} s", flush=True)
    out["union"] = run_union(work, data, r, out["settings"]["no replay"]["steps"], [*flags, "--replay_fraction", "0"])
    return out


def repeat_flags(work: Path, data: dict, r: int, base: list[str]) -> list[str]:
    """``base`` plus repeat ``r``'s seed and the held-out slices as eval files; the shared tokenizer installed."""
    from daemon.training import model

    # The product's own bootstrap of the embedded model (seed r), with the shared tokenizer instead of
    # one trained on the first file. Not --model_name_or_path: that is a pretrained base to the product
    # (its fine-tuning defaults, a base-model slice generated and scored after every file).
    model.train_tokenizer = lambda texts, vocab_size: data["tokenizer"]
    flags = [*base, "--seed", str(r), "--dataset_cache_dir", str(work / "cache")]
    return flags + ["--eval_files", *(str(data["paths"]["heldout", n]) for n in SOURCES), "--max_eval_examples", "1000"]


def tune_rates(work: Path, data: dict, rates: list[float], warmup_steps: int, repeats: int, steps: int) -> list[str]:
    """The union alone at each learning rate, ``repeats`` seeds each: its mean loss over the slices (markdown rows).

    The stream's no-replay steps are taken as ``steps`` x the five files (each file is sized to ``steps``).
    """
    lines = ["| learning rate | union loss at 0.8x | at 1.0x [95 % CI] | at 1.25x |", "|---|---|---|---|"]
    for rate in rates:
        at = {x: [] for x in (0.8, 1.0, 1.25)}
        for r in range(repeats):
            flags = repeat_flags(work, data, r, common_flags(rate, warmup_steps))
            flags += ["--replay_fraction", "0"]
            union = run_union(work, data, r, steps * len(SOURCES), flags, f"union-lr-{rate:g}")
            loss = [_mean([s[n][0] for n in SOURCES]) for s in union["scores"]]
            for x in at:
                at[x].append(cs.interpolate(union["x"], loss, x))
        mean, low, high = cs.mean_ci(at[1.0])
        row = f"| {rate:g} | {_mean(at[0.8]):.3f} | {mean:.3f} [{low:.3f}, {high:.3f}] | {_mean(at[1.25]):.3f} |"
        lines.append(row)
        print(lines[-1], flush=True)
    return lines


def run_union(work: Path, data: dict, r: int, stream_steps: int, flags: list[str], tag: str = "union") -> dict:
    """The union trained in cuts at :data:`UNION_POINTS` x ``stream_steps``: ``{"x": [...], "scores": [...]}``.

    ``tag`` names its folder (``r<r>-<tag>``): a second union in the same folder would continue the first.
    """
    docs = [(d, t) for n in SOURCES for d, t in zip(data["train"][n], data["tokens"][n], strict=True)]
    rng = random.Random(1000 + r)
    first, again = rng.sample(docs, len(docs)), rng.sample(docs, len(docs))
    stream = first + again
    ends = cs.chunk_ends([t for _, t in stream], [round(p * stream_steps * BATCH * SEQ) for p in UNION_POINTS])
    files = []
    for k, (lo, hi) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        path = work / f"union-{r}-{k}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d, _ in stream[lo:hi]), encoding="utf-8")
        files.append(path)
    run = run_stream(work, f"r{r}-{tag}", files, flags)
    cumulative, total = [], 0
    for h in run["history"]:
        total += h["planned_steps"]
        cumulative.append(total / stream_steps)
    trained = sum(h["train_seconds"] for h in run["history"])
    print(f"  repeat {r} union: {total} steps, {run['wall']:.0f} s", flush=True)
    return {
        "x": cumulative,
        "scores": scores(run, list(SOURCES)),
        "wall": run["wall"],
        "train_s": trained,
        "steps": total,
    }


_mean = statistics.fmean


def aggregate(repeats: list[dict], labels: list[str]) -> tuple[list[dict], dict]:
    """Per setting: gap (nats, bits/byte) with its interval, worst slice, union-equivalent compute, steps and
    training seconds against no replay's (the first label; a step that distils also runs the teacher), plasticity
    and the decision rule against the default (the second label); and the union's summary."""
    names = list(SOURCES)
    curve_x = [_mean([rep["union"]["x"][k] for rep in repeats]) for k in range(len(UNION_POINTS))]
    union_loss = [[_mean([s[n][0] for n in names]) for s in rep["union"]["scores"]] for rep in repeats]
    at_one = [cs.interpolate(rep["union"]["x"], u, 1.0) for rep, u in zip(repeats, union_loss, strict=True)]
    union = {"x": curve_x, "loss": [_mean([u[k] for u in union_loss]) for k in range(len(curve_x))]}
    union["noise"] = statistics.stdev(at_one) if len(at_one) > 1 else float("nan")
    union["at_one"] = _mean(at_one)

    def union_at(rep: dict, n: str, kind: int) -> float:
        return cs.interpolate(rep["union"]["x"], [s[n][kind] for s in rep["union"]["scores"]], 1.0)

    def final(rep: dict, label: str, kind: int) -> float:
        return _mean([rep["settings"][label]["scores"][-1][n][kind] for n in names])

    def last_own(rep: dict, label: str) -> float:
        return rep["settings"][label]["scores"][-1][rep["order"][-1]][0]

    def ratio(key: str, label: str) -> float:  # steps or training seconds against no replay's, mean over repeats
        return _mean([rep["settings"][label][key] / rep["settings"][labels[0]][key] for rep in repeats])

    out = []
    for label in labels:
        gaps = [final(rep, label, 0) - _mean([union_at(rep, n, 0) for n in names]) for rep in repeats]
        bpb = [final(rep, label, 1) - _mean([union_at(rep, n, 1) for n in names]) for rep in repeats]
        per_slice = {
            n: _mean([rep["settings"][label]["scores"][-1][n][0] - union_at(rep, n, 0) for rep in repeats])
            for n in names
        }
        worst = max(per_slice, key=per_slice.__getitem__)
        vs_default = [final(rep, label, 0) - final(rep, labels[1], 0) for rep in repeats]
        plastic = _mean([last_own(rep, label) - last_own(rep, labels[0]) for rep in repeats])
        grid = [[[_pos(rep, label, i, j) for rep in repeats] for j in range(len(names))] for i in range(len(names))]
        out.append({
            "label": label, "gap": cs.mean_ci(gaps), "gap_bpb": _mean(bpb), "worst": (worst, per_slice[worst]),
            "uec": cs.union_equivalent(union["x"], union["loss"], _mean([final(rep, label, 0) for rep in repeats])),
            "steps": ratio("steps", label), "time": ratio("train_s", label),
            "plasticity": plastic, "vs_default": cs.mean_ci(vs_default), "better": cs.becomes_default(vs_default),
            "grid": [[None if i < j else _mean(cell) for j, cell in enumerate(row)] for i, row in enumerate(grid)],
        })  # fmt: skip
    return out, union


def _pos(rep: dict, label: str, i: int, j: int) -> float:
    """Loss of the slice of the ``j``-th file trained, after the ``i``-th file."""
    return rep["settings"][label]["scores"][i][rep["order"][j]][0]


def plot(results: list[dict], path: Path) -> None:
    """One heatmap per setting: mean loss of the j-th file's slice (columns) after the i-th file (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.4 * len(results), 4.2), squeeze=False, layout="constrained")
    values = [v for s in results for row in s["grid"] for v in row if v is not None]
    for ax, s in zip(axes[0], results, strict=True):
        grid = [[float("nan") if v is None else v for v in row] for row in s["grid"]]
        ax.imshow(grid, cmap="viridis_r", vmin=min(values), vmax=max(values))
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white")
        ax.set_title(textwrap.fill(s["label"], 34), fontsize=8)  # a long label stays over its own panel
        ticks = [str(k + 1) for k in range(len(grid))]
        ax.set_xticks(range(len(grid)), ticks, fontsize=7)
        ax.set_yticks(range(len(grid)), ticks, fontsize=7)
        ax.set_xlabel("slice of the k-th file", fontsize=7)
        ax.set_ylabel("after the k-th file", fontsize=7)
    fig.suptitle("Mean held-out loss (nats/token) over repeats, files by position in each repeat's order", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> int:
    from daemon.training.starting_defaults import SCRATCH_DEFAULTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats, 8 steps a file, 2 settings: a check.")
    parser.add_argument(
        "--candidates_only",
        action="store_true",
        help="Only no replay, the default and the --extra_setting ones (5 repeats, the section written): "
        "candidates against the default in fewer minutes.",
    )
    parser.add_argument("--repeats", type=int, default=None, help="Repeats (5; --quick 2).")
    parser.add_argument(
        "--first_seed",
        type=int,
        default=0,
        help="Seed of the first repeat (0): repeat r has seed first_seed + r and the files rotated by it, so 5 "
        "confirms on the same five orders with new seeds what a go at 0 chose.",
    )
    parser.add_argument("--steps_per_file", type=int, default=None, help="Optimizer steps per file (24; --quick 8).")
    parser.add_argument("--learning_rate", type=float, default=SCRATCH_DEFAULTS["learning_rate"])
    parser.add_argument("--warmup_steps", type=int, default=SCRATCH_DEFAULTS["warmup_steps"])
    parser.add_argument("--heldout_docs", type=int, default=32, help="Held-out documents per slice.")
    parser.add_argument("--extra_setting", nargs=2, action="append", default=[], metavar=("NAME", "FLAGS"))
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="Markdown file to update.")
    parser.add_argument(
        "--tune_rates", type=float, nargs="+", help="Only the union, at these learning rates (section 'continual lr')."
    )
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    steps = args.steps_per_file or (8 if args.quick else 24)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("daemon.training.model").setLevel(logging.ERROR)  # "--model_name_or_path is ignored"
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    from daemon.training.averaging_flags import AveragingArguments

    decay = AveragingArguments(average_exports="ema").ema_decay
    standard = not (args.quick or args.candidates_only)
    replay, weight = SCRATCH_DEFAULTS["replay_fraction"], SCRATCH_DEFAULTS["replay_loss_weight"]
    distilled = SCRATCH_DEFAULTS["replay_distillation"], SCRATCH_DEFAULTS["file_distillation"]
    rows = settings(replay, weight, distilled, decay, standard, args.extra_setting)
    started, names = time.perf_counter(), list(SOURCES)
    base = common_flags(args.learning_rate, args.warmup_steps)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_data(work, steps, args.heldout_docs)
        if args.tune_rates:
            lines = tune_rates(work, data, args.tune_rates, args.warmup_steps, repeats, steps)
            write_section(args.out, "continual lr", "\n".join([
                f"Machine: {machine()}. Run on {time.strftime('%Y-%m-%d')} in "
                f"{(time.perf_counter() - started) / 60:.1f} min. `bench/continual.py --tune_rates`: the union alone "
                f"(no replay), {args.warmup_steps} warmup steps, `constant_with_warmup`, {repeats} seeds; mean "
                "held-out loss over the five slices (nats), at the stream's no-replay steps x 0.8, 1.0 and 1.25.",
                "", *lines,
            ]))  # fmt: skip
            return 0
        reps = []
        orders = cs.file_orders(len(names), args.first_seed + repeats)[args.first_seed :]
        for r, order in enumerate(orders, start=args.first_seed):
            reps.append(run_repeat(work, data, r, [names[k] for k in order], rows, base))
            estimate(reps, rows, repeats, steps, time.perf_counter() - started)
    results, union = aggregate(reps, [label for label, _ in rows])
    lines = cs.table(results)
    print("\n".join(lines), flush=True)
    print("\n".join(cs.verdict(results)))
    if args.quick:
        print("--quick: BENCHMARKS.md left as it is")
        return 0
    write_report(args.out, lines, results, union, rows, reps, time.perf_counter() - started, base)
    plot(results, plot_path(args.out))
    print(f"updated {args.out} and {plot_path(args.out)}")
    return 0


def seeds_from(first_seed: int) -> str:
    """What the report says of ``--first_seed``: nothing at 0."""
    return f"; r from {first_seed}" if first_seed else ""


def estimate(reps: list[dict], rows: list, repeats: int, steps: int, elapsed: float) -> None:
    """Print the measured seconds per optimizer step and per file, and the full default run's minutes."""
    runs = [s for rep in reps for s in [*rep["settings"].values(), rep["union"]]]
    n_steps, n_files = sum(s["steps"] for s in runs), len(runs) * len(SOURCES)
    per_step = sum(s["train_s"] for s in runs) / n_steps
    per_file = (sum(s["wall"] for s in runs) - per_step * n_steps) / n_files
    # The full run: 5 repeats of 7 settings (1.00 + 1.10 + 1.10 + 1.33 + 1.10 + 1.10 + 1.32 x the no-replay
    # steps) and the union (1.25x), 24 steps a file; 40 train_file calls a repeat.
    full = 5 * (9.3 * 24 * len(SOURCES) * per_step + 40 * per_file)
    print(f"  {per_step:.2f} s/step, {per_file:.1f} s/file besides training; full run ~{full / 60:.0f} min "
          f"(this run {elapsed / 60:.1f} min so far)", flush=True)  # fmt: skip


def write_report(
    out: Path,
    lines: list[str],
    results: list[dict],
    union: dict,
    rows: list,
    reps: list,
    seconds: float,
    base: list[str],
) -> None:
    """The ``continual`` section of BENCHMARKS.md for this hardware class."""
    steps = _mean([rep["settings"]["no replay"]["steps"] for rep in reps]) / len(SOURCES)
    flags = "; ".join(f"{label}: `{' '.join(extra)}`" for label, extra in rows)
    union_curve = ", ".join(f"{x:.2f}x {y:.3f}" for x, y in zip(union["x"], union["loss"], strict=True))
    body = "\n".join([
        "## Replay, averaging and cooldown over a stream of five texts (`bench/continual.py`)",
        "",
        f"Machine: {machine()}. Run on {time.strftime('%Y-%m-%d')} in {seconds / 60:.1f} min. The embedded model, "
        f"`{' '.join(base)}`; five sources ({', '.join(SOURCES)}), {steps:.0f} steps a file (no replay), "
        f"{len(reps)} repeats (seed r, files rotated by r{seeds_from(reps[0]['seed'])}). Held-out slices split by "
        "source file; one tokenizer on "
        "a held-aside sample of every source (module docstring). Settings: " + flags + ".",
        "",
        *lines,
        "",
        f"Union (mean loss over slices vs steps / no-replay steps): {union_curve}. Seed noise (standard deviation "
        f"of the union's 1.0x loss over repeats): {union['noise']:.3f} nats.",
        "",
        "\n\n".join(cs.verdict(results)),
        "",
        f"![forgetting matrices]({plot_path(out).relative_to(out.resolve().parent)})",
    ])  # fmt: skip
    write_section(out, "continual", body)


if __name__ == "__main__":
    sys.exit(main())
