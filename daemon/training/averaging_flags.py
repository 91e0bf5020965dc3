"""``--average_exports`` and ``--average_last``: what the export is averaged over (:mod:`daemon.training.averaging`).

Standard library only, like :mod:`daemon.config`: the flags are parsed with the others by
``HfArgumentParser`` (:mod:`daemon.training.arguments`); :func:`averaging_problems` checks them
against the flags of other groups once every group is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from daemon.config import sharding_requested
from daemon.exceptions import ConfigError

AVERAGE_CHOICES = ("none", "lawa", "ema")


@dataclass
class AveragingArguments:
    """Averaged exports (docs/data.md "Averaged exports"): the main line is trained and checkpointed as ever."""

    # None until resolve_defaults (daemon.training.arguments): the default follows the starting model.
    average_exports: str = field(  # type: ignore[assignment]
        default=None,
        metadata={
            "help": "'lawa' exports (and evaluates) the mean of the weights of the last --average_last file-end "
            "checkpoints instead of the file's end model (LAWA, Kaddour 2022); 'ema' an exponential moving "
            "average of the weights over every step (--ema_decay), kept in each checkpoint. The next file still "
            "continues from the end checkpoint. 'none' exports the main line's model. Default: 'ema' for the "
            "embedded model learning from scratch; 'none' for a pretrained base (so with --use_peft), and with "
            "--cooldown_fraction, --wise_ft or FSDP.",
            "choices": list(AVERAGE_CHOICES),
        },
    )
    average_last: int = field(
        default=3,
        metadata={
            "help": "File-end checkpoints averaged by --average_exports lawa, the file's own end included (fewer "
            "while the line has fewer kept file ends). Needs --keep_file_checkpoints >= this - 1."
        },
    )

    ema_decay: float = field(
        default=0.9,
        metadata={
            "help": "Decay of --average_exports ema per optimizer step: ema = decay x ema + (1 - decay) x weights, "
            "bias-corrected (a half-life of ln 0.5 / ln decay steps: 6.6 at 0.9). 0.9 passed the "
            "benchmark's plasticity guard, 0.95 and 0.99 did not (BENCHMARKS.md 'continual')."
        },
    )

    def __post_init__(self) -> None:
        problems = []
        if self.average_exports not in AVERAGE_CHOICES:
            problems.append(f"--average_exports must be one of {', '.join(AVERAGE_CHOICES)}")
        if self.average_last < 1:
            problems.append("--average_last must be >= 1 (checkpoints averaged)")
        if not 0.0 < self.ema_decay < 1.0:
            problems.append("--ema_decay must be in (0, 1)")
        if problems:
            raise ConfigError("; ".join(problems))


def default_average_exports(flags: dict[str, Any], starting_default: str) -> str:
    """``--average_exports`` not given: ``starting_default`` (the starting model's), or ``none`` where the run
    replaces the export another way (``--cooldown_fraction``, ``--wise_ft``) or shards the model (FSDP: no average
    is built for it yet), each of which an average cannot be combined with. A LoRA line always has a pretrained
    base, whose default is ``none``.

    Args:
        flags: every flag's parsed value by name (``cooldown_fraction``, ``wise_ft`` and ``fsdp`` as given).
        starting_default: the default of the starting model (:mod:`daemon.training.starting_defaults`).
    """
    if flags["cooldown_fraction"] > 0 or flags["wise_ft"] or sharding_requested(flags["fsdp"]):
        return "none"
    return starting_default


def averaging_problems(
    averaging: AveragingArguments, keep_file_checkpoints: int, cooldown: float, peft: Any
) -> list[str]:
    """What ``--average_exports`` cannot be combined with: one message per problem, naming the flags.

    Args:
        averaging: the averaging flags.
        keep_file_checkpoints: ``--keep_file_checkpoints``: the earlier file ends kept on disk.
        cooldown: ``--cooldown_fraction``.
        peft: ``--use_peft``.
    """
    if averaging.average_exports == "none":
        return []
    problems = []
    if averaging.average_exports == "lawa" and averaging.average_last - 1 > keep_file_checkpoints:
        problems.append(
            f"--average_last {averaging.average_last} needs --keep_file_checkpoints >= {averaging.average_last - 1} "
            "(the earlier file ends it averages must stay on disk)"
        )
    if cooldown > 0:
        problems.append("--average_exports and --cooldown_fraction both replace the export: choose one")
    if peft:
        problems.append("--average_exports averages every weight: it cannot be used with --use_peft")
    return problems
