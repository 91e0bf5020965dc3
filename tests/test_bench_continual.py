"""The pure helpers of bench/continual.py: intervals, the decision rule, interpolation, file orders, splits."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import continual_stats as cs  # noqa: E402


def test_mean_ci_is_the_t_interval() -> None:
    values = [0.10, 0.12, 0.08, 0.11, 0.09]
    mean, lo, hi = cs.mean_ci(values)
    half = 2.776 * statistics.stdev(values) / math.sqrt(5)  # t(0.975, 4), NIST table
    assert mean == pytest.approx(0.10)
    assert (lo, hi) == pytest.approx((0.10 - half, 0.10 + half))
    assert cs.mean_ci([0.3]) == (0.3, -math.inf, math.inf)


def test_t_table_against_known_values() -> None:
    assert cs.t_critical(1) == 12.706
    assert cs.t_critical(4) == 2.776
    assert cs.t_critical(30) == 1.960
    with pytest.raises(ValueError):
        cs.t_critical(0)


def test_decision_rule_needs_the_upper_bound_below_zero() -> None:
    assert cs.becomes_default([-0.05, -0.04, -0.06, -0.05, -0.05])
    # better on average, but one repeat the other way: the interval crosses 0
    assert not cs.becomes_default([-0.05, -0.04, 0.06, -0.05, -0.05])
    assert not cs.becomes_default([0.01, 0.02, 0.01, 0.02, 0.01])
    assert not cs.becomes_default([-0.5])  # one repeat decides nothing


def test_bits_per_byte() -> None:
    assert cs.bits_per_byte(math.log(2), 100, 100) == pytest.approx(1.0)
    assert cs.bits_per_byte(2.0, 250, 1000) == pytest.approx(0.5 / math.log(2))


def test_interpolate_inside_and_beyond() -> None:
    xs, ys = [0.8, 0.9, 1.0, 1.1, 1.25], [5.0, 4.8, 4.7, 4.6, 4.5]
    assert cs.interpolate(xs, ys, 0.95) == pytest.approx(4.75)
    assert cs.interpolate(xs, ys, 1.0) == pytest.approx(4.7)
    assert cs.interpolate(xs, ys, 0.7) == pytest.approx(5.2)  # first segment extended
    assert cs.interpolate(xs, ys, 1.4) == pytest.approx(4.4)  # last segment extended
    with pytest.raises(ValueError):
        cs.interpolate([1.0], [2.0], 1.0)


def test_union_equivalent_compute() -> None:
    xs, ys = [0.8, 0.9, 1.0, 1.1, 1.25], [5.0, 4.8, 4.7, 4.6, 4.5]
    assert cs.union_equivalent(xs, ys, 4.75) == pytest.approx(0.95)
    assert cs.union_equivalent(xs, ys, 4.7) == pytest.approx(1.0)
    assert cs.union_equivalent(xs, ys, 4.55) == pytest.approx(1.175)
    assert cs.union_equivalent(xs, ys, 5.1) == "< 0.8"
    assert cs.union_equivalent(xs, ys, 4.4) == "> 1.25"
    # a noisy bump: the first crossing counts
    assert cs.union_equivalent([0.8, 0.9, 1.0], [5.0, 4.6, 4.7], 4.8) == pytest.approx(0.85)


def test_file_orders_put_every_file_first_and_last_once() -> None:
    orders = cs.file_orders(5, 5)
    assert orders[0] == [0, 1, 2, 3, 4]
    assert orders[2] == [2, 3, 4, 0, 1]
    assert sorted(o[0] for o in orders) == list(range(5))
    assert sorted(o[-1] for o in orders) == list(range(5))
    assert all(sorted(o) == list(range(5)) for o in orders)
    assert cs.file_orders(5, 2) == orders[:2]


def test_split_of_is_stable_and_near_its_fractions() -> None:
    keys = [f"src:/usr/share/doc/pkg{i}/changelog.Debian.gz" for i in range(2000)]
    splits = [cs.split_of(k) for k in keys]
    assert splits == [cs.split_of(k) for k in keys]
    for name, share in (("tokenizer", 0.2), ("heldout", 0.2), ("train", 0.6)):
        assert abs(splits.count(name) / len(keys) - share) < 0.04


def test_near_duplicate_by_containment() -> None:
    boiler = "This file is part of the GNU C Library and is free software you can redistribute it " * 2
    seen = cs.shingles(boiler + "struct stat { int st_mode; };")
    assert cs.near_duplicate(boiler + "int open(const char *path, int flags);", seen)
    assert not cs.near_duplicate("def main():\n    return parse(sys.argv[1:]) or exit(2) when nothing matched", seen)


def test_chunk_ends_cut_at_cumulative_targets() -> None:
    counts = [100] * 10 + [100] * 10  # one pass, then the reshuffled second
    assert cs.chunk_ends(counts, [800, 900, 1000, 1100, 1260]) == [8, 9, 10, 11, 13]
    assert cs.chunk_ends(counts, [790, 840, 1000]) == [8, 9, 10]  # nearest, but never an empty cut
    assert cs.chunk_ends([100, 100], [10, 5000]) == [1, 2]


def _result(label: str, gap: float, steps: float, uec: float | str, better: bool, worst: float = 0.1) -> dict:
    return {
        "label": label, "gap": (gap, gap - 0.03, gap + 0.03), "gap_bpb": gap / 3, "worst": ("man-pages", worst),
        "uec": uec, "steps": steps, "time": steps * 1.2, "plasticity": 0.01,
        "vs_default": (-0.05, -0.08, -0.02 if better else 0.01),
        "better": better,
    }  # fmt: skip


def test_verdict_and_table() -> None:
    results = [
        _result("no replay", 0.4, 1.0, "< 0.8", False),
        _result("replay 9% (default)", 0.2, 1.1, 0.82, False),
        _result("replay 25%", 0.05, 1.33, 1.05, True),
        _result("new trick", 0.08, 1.08, 0.9, True),
    ]
    lines = cs.verdict(results)
    assert "below 0 for replay 25% (-0.020, 1.33x steps), new trick" in lines[0]
    assert lines[1:] == ["Targets met by new trick."]
    results[3]["plasticity"] = 0.03  # the newest file learned less than without replay
    assert cs.verdict(results)[1:] == ["Targets met by new trick, but not its plasticity guard (last file +0.030)."]
    results[3]["better"] = results[2]["better"] = False
    results[3]["worst"] = ("man-pages", 0.3)  # a slice left behind: targets missed
    lines = cs.verdict(results)
    assert "the default stays" in lines[0] and "met by no setting" in lines[1]
    rows = cs.table(results)
    assert len(rows) == 2 + len(results)
    assert "| no replay | 1.00x | 1.20x | +0.400 [+0.370, +0.430] |" in rows[2] and "< 0.8" in rows[2]
    assert "0.82x" in rows[3] and "+0.010 pass" in rows[3]


def test_aggregate_reads_gaps_compute_and_plasticity_off_fabricated_runs() -> None:
    from bench import continual

    names = list(continual.SOURCES)
    union_losses = [5.0, 4.8, 4.6, 4.5, 4.4]

    def run(loss: float, steps: int) -> dict:
        return {"scores": [{n: (loss, loss / 2) for n in names}] * len(names), "steps": steps, "train_s": steps / 5}

    repeats = []
    for r, own in enumerate((4.8, 4.9)):
        union = {"x": [0.8, 0.9, 1.0, 1.1, 1.25], "scores": [{n: (u, u / 2) for n in names} for u in union_losses]}
        order = [names[k] for k in cs.file_orders(len(names), 2)[r]]
        repeats.append({"order": order, "settings": {"none": run(5.0, 100), "default": run(own, 110)}, "union": union})
    results, union = continual.aggregate(repeats, ["none", "default"])
    none, default = results
    assert union["at_one"] == pytest.approx(4.6) and union["noise"] == pytest.approx(0.0)
    assert none["gap"][0] == pytest.approx(0.4) and none["gap_bpb"] == pytest.approx(0.2)
    assert default["gap"][0] == pytest.approx(0.25)
    assert default["gap"][2] == pytest.approx(0.25 + 12.706 * statistics.stdev([0.2, 0.3]) / math.sqrt(2))
    assert default["worst"][1] == pytest.approx(0.25)
    assert none["uec"] == pytest.approx(0.8) and default["uec"] == pytest.approx(0.875)
    assert default["steps"] == pytest.approx(1.1) and default["plasticity"] == pytest.approx(-0.15)
    assert default["time"] == pytest.approx(1.1) and none["time"] == pytest.approx(1.0)
    assert not default["better"]  # the default against itself
    assert default["grid"][0][1] is None and default["grid"][4][0] == pytest.approx(4.85)


def test_the_figure_goes_beside_the_markdown_file_it_is_linked_from(tmp_path: Path) -> None:
    from bench import continual

    repository = Path(continual.ROOT)
    assert continual.plot_path(repository / "BENCHMARKS.md").parent == repository / "bench"
    trial = continual.plot_path(tmp_path / "trial.md")  # --out elsewhere: the committed figure is left alone
    assert trial.parent == tmp_path / "bench" and trial.name == continual.plot_path(repository / "x.md").name
