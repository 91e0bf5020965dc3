"""Pure helpers of ``bench/continual.py``: intervals, interpolation, the decision rule, file orders, data splits.

Standard library only, so ``tests/test_bench_continual.py`` checks them without training anything.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Sequence

# Two-sided 95 % critical values of Student's t, t(0.975, df), df = 1..10: NIST/SEMATECH
# e-Handbook of Statistical Methods, section 1.3.6.7.2 ("Critical values of the Student's t
# distribution"), column 0.975. Beyond 10 repeats the normal quantile 1.960 is used (an
# interval at most 14 % too narrow at df 11; no run of this bench has that many repeats).
PLASTICITY_TOLERANCE = 0.02  # nats: the last file's own slice may be this much worse than without replay

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_critical(df: int) -> float:
    """t(0.975, df) from :data:`T_975`; 1.960 above df 10. Raises ValueError for df < 1."""
    if df < 1:
        raise ValueError("a t-interval needs at least two values (df >= 1)")
    return T_975.get(df, 1.960)


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its 95 % t-interval, ``mean ± t(0.975, n-1) s / sqrt(n)``.

    ``s`` is the sample standard deviation (n - 1). With a single value the interval is
    ``(-inf, inf)``: one repeat decides nothing.
    """
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, -math.inf, math.inf
    half = t_critical(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def becomes_default(differences: Sequence[float]) -> bool:
    """The decision rule: a setting replaces the current default only if the upper bound of the
    95 % t-interval of its paired per-repeat differences (its gap minus the default's, nats) is below 0."""
    return mean_ci(differences)[2] < 0


def bits_per_byte(nats_per_token: float, tokens: int, n_bytes: int) -> float:
    """Bits per byte of a slice: ``nats/token x tokens / bytes / ln 2`` (the tokenizer cancels out)."""
    return nats_per_token * tokens / n_bytes / math.log(2)


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """``y`` at ``x`` on the piecewise-linear curve through ``(xs, ys)`` (``xs`` increasing), its end
    segments extended beyond the range."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("need at least two points, as many x as y")
    i = next((k for k in range(1, len(xs) - 1) if x <= xs[k]), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def union_equivalent(xs: Sequence[float], losses: Sequence[float], loss: float) -> float | str:
    """The compute (x, in multiples of the no-replay steps) at which the union's loss curve reaches ``loss``.

    The first crossing of the piecewise-linear curve ``(xs, losses)``, ``xs`` increasing. A loss
    above the curve's first point returns ``"< x0"``, below every point ``"> x_last"`` (no
    extrapolation).
    """
    if loss > losses[0]:
        return f"< {xs[0]:g}"
    for i in range(1, len(xs)):
        lo, hi = sorted((losses[i - 1], losses[i]))
        if lo <= loss <= hi:
            if losses[i] == losses[i - 1]:
                return xs[i - 1]
            return xs[i - 1] + (xs[i] - xs[i - 1]) * (losses[i - 1] - loss) / (losses[i - 1] - losses[i])
    return f"> {xs[-1]:g}"


def file_orders(n_files: int, repeats: int) -> list[list[int]]:
    """Repeat ``r`` trains the files rotated by ``r``: ``[r, r+1, ..., r-1] mod n``.

    With ``repeats == n_files`` every file is first once and last once (a cyclic Latin square).
    """
    return [[(r + k) % n_files for k in range(n_files)] for r in range(repeats)]


def split_of(key: str, tokenizer: float = 0.2, heldout: float = 0.2) -> str:
    """``"tokenizer"``, ``"heldout"`` or ``"train"`` for a source file, by a hash of its path (stable
    across runs and machines): the fractions ``tokenizer``, ``heldout`` and the rest."""
    u = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64
    return "tokenizer" if u < tokenizer else "heldout" if u < tokenizer + heldout else "train"


def shingles(text: str, n: int = 8) -> set[str]:
    """The word ``n``-grams of ``text`` (whitespace-split), each joined by one space."""
    words = text.split()
    return {" ".join(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))}


def near_duplicate(text: str, seen: set[str], threshold: float = 0.2) -> bool:
    """Whether more than ``threshold`` of ``text``'s word 8-grams occur in ``seen`` (containment,
    Broder 1997, "On the resemblance and containment of documents")."""
    own = shingles(text)
    return len(own & seen) > threshold * len(own)


def chunk_ends(token_counts: Sequence[int], targets: Sequence[int]) -> list[int]:
    """For each cumulative token target, how many leading documents come nearest to it.

    ``token_counts`` are the documents' tokens in training order. Each end takes at least one
    document more than the one before (no empty cut) and at most ``len(token_counts)``. Used to
    cut the union's stream where it is evaluated.
    """
    ends, total, k = [], 0, 0
    for target in targets:
        start = k
        while k < len(token_counts) and (k == start or abs(total + token_counts[k] - target) < abs(total - target)):
            total += token_counts[k]
            k += 1
        ends.append(k)
    return ends


def _fmt(v: float | str) -> str:
    return v if isinstance(v, str) else f"{v:.2f}x"


def table(results: list[dict]) -> list[str]:
    """The markdown table: one row per setting (the dicts of ``bench.continual.aggregate``)."""
    lines = [
        "| setting | steps vs no replay | training time vs no replay | gap to union at 1.0x, nats [95 % CI] "
        "| gap, bits/byte | worst slice gap | union-equivalent compute | last file vs no replay (plasticity) "
        "| minus default, nats [95 % CI] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in results:
        m, lo, hi = s["gap"]
        dm, dlo, dhi = s["vs_default"]
        guard = "pass" if s["plasticity"] <= PLASTICITY_TOLERANCE else "FAIL"
        lines.append(
            f"| {s['label']} | {s['steps']:.2f}x | {s['time']:.2f}x | {m:+.3f} [{lo:+.3f}, {hi:+.3f}] "
            f"| {s['gap_bpb']:+.4f} "
            f"| {s['worst'][1]:+.3f} ({s['worst'][0]}) | {_fmt(s['uec'])} | {s['plasticity']:+.3f} {guard} "
            f"| {dm:+.3f} [{dlo:+.3f}, {dhi:+.3f}] |"
        )
    return lines


def verdict(results: list[dict]) -> list[str]:
    """The decision rule's verdict against the default (``results[1]``) and the issue's targets, in words.

    Targets (issue 32): <= 1.10x the no-replay steps, mean gap <= 0.10 nats with its upper 95 % bound
    <= 0.15, worst slice <= 0.25 nats, union-equivalent compute >= 0.85.
    """
    default = results[1]["label"]
    better = [s for s in results[2:] if s["better"]]
    lines = [f"Decision rule against the current default ({default}): " + (
        "no setting's upper 95 % bound of its loss minus the default's is below 0: the default stays."
        if not better else "below 0 for " + ", ".join(
            f"{s['label']} ({s['vs_default'][2]:+.3f}, {s['steps']:.2f}x steps)" for s in better) + ".")]  # fmt: skip
    for s in results:
        m, _, hi = s["gap"]
        uec = s["uec"] if isinstance(s["uec"], float) else (2.0 if s["uec"].startswith(">") else 0.0)
        checks = [s["steps"] <= 1.10, m <= 0.10, hi <= 0.15, s["worst"][1] <= 0.25, uec >= 0.85]
        if all(checks):
            guard = s["plasticity"] <= PLASTICITY_TOLERANCE
            lines.append(
                f"Targets met by {s['label']}"
                + ("." if guard else f", but not its plasticity guard (last file {s['plasticity']:+.3f}).")
            )
    if len(lines) == 1:
        lines.append(
            "Targets (<= 1.10x steps, gap <= 0.10 nats with upper bound <= 0.15, worst slice <= 0.25, "
            "union-equivalent >= 0.85): met by no setting."
        )
    return lines
