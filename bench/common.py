"""What every benchmark shares: the machine's description, its hardware class, FLOPs, BENCHMARKS.md sections.

Imports torch (the hardware class asks for a GPU), not the training stack.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, PretrainedConfig  # noqa: E402

from daemon.training.arguments import cpu_info  # noqa: E402


def cpu_flags() -> str:
    """Which of avx2, avx512f, avx512_bf16 and the AMX flags this CPU has (``/proc/cpuinfo``)."""
    flags = cpu_info()[1]
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted) if flags else "unknown"


def hardware_class() -> str:
    """The class a result belongs to: a GPU, or a CPU by its native matmul precisions.

    Each benchmark keeps one section per class in BENCHMARKS.md (``<!-- name class:start -->``),
    so a run on one class of machine never overwrites another's figures.
    """
    if torch.cuda.is_available():
        return "gpu"
    flags = cpu_info()[1]
    if "amx_bf16" in flags:
        return "cpu-amx"
    if "avx512_bf16" in flags:
        return "cpu-avx512bf16"
    return "cpu-avx512" if "avx512f" in flags else "cpu-avx2" if "avx2" in flags else "cpu"


def machine() -> str:
    """CPU model line, core count, CPU flags and torch version."""
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        )
    except (StopIteration, OSError):
        model = platform.processor() or "unknown CPU"
    threads, version = torch.get_num_threads(), platform.python_version()
    return f"{model}, {threads} cores (CPU flags: {cpu_flags()}), torch {torch.__version__}, Python {version}"


def flops_per_token(config: PretrainedConfig, seq: int) -> tuple[int, float]:
    """``(parameters, 6N + 12 L d T)``: training FLOPs per token of a ``seq``-token sequence
    (Chowdhery et al. 2022, PaLM, Appendix B). The model is built on the meta device: shapes only.
    """
    with torch.device("meta"):
        n = AutoModelForCausalLM.from_config(config).num_parameters()
    return n, 6 * n + 12 * config.num_hidden_layers * config.hidden_size * seq


def model_shape_flops(
    layers: int, hidden: int, intermediate: int, heads: int, vocab: int, rows: int = 8, seq: int = 256, repeats: int = 5
) -> float:
    """FLOP/s of the matmuls of one fp32 micro-batch's forward and backward at the model's own shapes.

    The physical limit of the training loop for this model size: the same matrix products a
    Llama decoder computes for ``rows x seq`` tokens (q, k, v, o: ``d x d``; gate, up: ``d x ff``;
    down: ``ff x d``; the attention scores and values per head; the LM head ``d x V``), each
    forward product with its two backward ones (the input's and the weight's gradient), timed
    as bare ``torch.matmul`` calls with no other op between them. Small shapes can run below the
    2048x2048 peak, so this is the ceiling a loop of this model can be held to.
    """
    m, head = rows * seq, hidden // heads
    linear = [(hidden, hidden)] * 4 + [(hidden, intermediate)] * 2 + [(intermediate, hidden)]
    ops: list[tuple[torch.Tensor, torch.Tensor]] = []
    for k, n in linear * layers + [(hidden, vocab)]:
        x, w, g = torch.randn(m, k), torch.randn(k, n), torch.randn(m, n)
        ops += [(x, w), (g, w.T), (x.T, g)]  # forward, input gradient, weight gradient
    q = torch.randn(rows * heads, seq, head)
    scores = torch.randn(rows * heads, seq, seq)
    for _ in range(layers):  # scores = q k^T and out = p v, each with its two gradients
        ops += [(q, q.transpose(1, 2)), (scores, q), (q, q.transpose(1, 2))]
        ops += [(scores, q), (scores, q), (scores.transpose(1, 2), q)]
    flops = sum(2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1) for a, b in ops)
    for a, b in ops:  # warm-up
        torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for a, b in ops:
            torch.matmul(a, b)
        best = min(best, time.perf_counter() - started)
    return flops / best


def write_section(path: Path, marker: str, body: str) -> None:
    """Replace this hardware class's section of ``marker`` (append it if absent).

    The section is the text between ``<!-- marker class:start -->`` and ``<!-- marker class:end -->``,
    ``class`` being :func:`hardware_class`.
    """
    marker = f"{marker} {hardware_class()}"
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")
