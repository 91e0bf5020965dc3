"""``--cooldown_mix``, ``--replay_weighting``, ``--replay_loss_weight``, ``--replay_distillation``,
``--file_distillation`` and ``--wise_ft``: options against forgetting (docs/data.md).

The stream benchmark decides whether one becomes a default (the starting model's,
:mod:`daemon.training.starting_defaults`). Standard library only, like :mod:`daemon.config`: the flags are
parsed with the others by ``HfArgumentParser`` (:mod:`daemon.training.arguments`); :func:`technique_problems`
checks them against the flags of other groups once every group is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.exceptions import ConfigError

COOLDOWN_MIXES = ("file", "balanced")
REPLAY_WEIGHTINGS = ("even", "forgetting")
# The weights of a distillation term (daemon.training.distillation): each keeps a frozen copy of the whole model.
DISTILLATION_FLAGS = ("replay_distillation", "file_distillation")


@dataclass
class TechniqueArguments:
    """How replay is drawn and weighed, what the cooldown branch trains on, and the WiSE-FT export (docs/data.md)."""

    cooldown_mix: str = field(
        default="file",
        metadata={
            "help": "What the cooldown branch (--cooldown_fraction) trains on. 'file' (default): a seeded sample of "
            "the file's training examples (its own and replayed ones). 'balanced': as many examples from each "
            "done file's replay share as from the file's own examples (Blakeney et al. 2024: the end of "
            "training sets what the model keeps); the file's own examples alone while the store is empty.",
            "choices": list(COOLDOWN_MIXES),
        },
    )
    replay_weighting: str = field(
        default="even",
        metadata={
            "help": "How the --replay_fraction examples are drawn over the earlier files. 'even' (default): "
            "uniformly from the whole store. 'forgetting': each file's number in proportion to its current "
            "forgetting on its held-out slice (evaluations.jsonl; at least a tenth of the largest), the same "
            "total (after maximally interfered retrieval, Aljundi et al. 2019).",
            "choices": list(REPLAY_WEIGHTINGS),
        },
    )
    replay_loss_weight: float = field(  # type: ignore[assignment]
        default=None,
        metadata={
            "help": "The weight of a replayed (or rehearsed) example's tokens in the loss, against 1 for the file's "
            "own: the loss stays a weighted mean over the step's tokens, so replay weighs more without more "
            "steps (docs/data.md). Default: 2 for the embedded model (measured with --replay_fraction 0.11: "
            'BENCHMARKS.md "continual"), 1 (every token alike) for a pretrained base, where it was not measured.'
        },
    )
    replay_distillation: float = field(  # type: ignore[assignment]
        default=None,
        metadata={
            "help": "Weight of a distillation term on the replayed (and rehearsed) examples: at each of their learned "
            "tokens, the KL divergence from the next-token distribution of the model the file started from to the "
            "model's, added to the loss with this weight against each token's 1 (Learning without Forgetting, Li "
            "and Hoiem 2016; dark experience replay, Buzzega et al. 2020; docs/data.md). 0: none. Default: 1 for "
            'the embedded model (BENCHMARKS.md "continual"), 0 for a pretrained base, a LoRA line or FSDP.'
        },
    )
    file_distillation: float = field(  # type: ignore[assignment]
        default=None,
        metadata={
            "help": "Weight of the same term on the file's own examples: their learned tokens are pulled toward the "
            "next-token distributions of the model the file started from (Learning without Forgetting's term on the "
            "new data, Li and Hoiem 2016; docs/data.md). Never in a line's first file from scratch, whose starting "
            "model is a random initialisation. It costs the teacher's forward pass over every row. 0: none. "
            'Default: 0.7 for the embedded model (BENCHMARKS.md "continual"), 0 for a pretrained base, a LoRA line '
            "or FSDP."
        },
    )
    wise_ft: bool = field(
        default=False,
        metadata={
            "help": "For a line started from --model_name_or_path: export (1 - a) x base + a x trained weights "
            "instead of the trained ones, a in {0.25, 0.5, 0.75, 1} chosen by the lowest mean loss over the "
            "evaluation suite (WiSE-FT, Wortsman et al. 2022). The next file still trains from the checkpoint."
        },
    )

    def __post_init__(self) -> None:
        problems = []
        if self.cooldown_mix not in COOLDOWN_MIXES:
            problems.append(f"--cooldown_mix must be one of {', '.join(COOLDOWN_MIXES)}")
        if self.replay_weighting not in REPLAY_WEIGHTINGS:
            problems.append(f"--replay_weighting must be one of {', '.join(REPLAY_WEIGHTINGS)}")
        if self.replay_loss_weight is not None and not 0.0 < self.replay_loss_weight < float("inf"):
            problems.append("--replay_loss_weight must be a number > 0")
        for name in DISTILLATION_FLAGS:
            weight = getattr(self, name)
            if weight is not None and not 0.0 <= weight < float("inf"):
                problems.append(f"--{name} must be a number >= 0")
        if problems:
            raise ConfigError("; ".join(problems))


def technique_problems(
    techniques: TechniqueArguments,
    replay_fraction: float,
    cooldown_fraction: float,
    average_exports: str,
    peft: Any,
    base_model: str | None,
    output_dir: str,
) -> list[str]:
    """What the options cannot be combined with: one message per problem, naming the flags.

    Args:
        techniques: these flags.
        replay_fraction: ``--replay_fraction``.
        cooldown_fraction: ``--cooldown_fraction``.
        average_exports: ``--average_exports``.
        peft: ``--use_peft``.
        base_model: the line's pretrained base (:func:`daemon.store.origin.base_model_of`), None for the
            embedded model trained from scratch.
        output_dir: the running model's folder (a base there would be overwritten by the first export).
    """
    problems = []
    if techniques.cooldown_mix != "file" and cooldown_fraction <= 0:
        problems.append("--cooldown_mix balanced mixes the cooldown branch: it needs --cooldown_fraction > 0")
    if techniques.replay_weighting != "even" and replay_fraction <= 0:
        problems.append("--replay_weighting forgetting weights the replay: it needs --replay_fraction > 0")
    for name in DISTILLATION_FLAGS:
        if getattr(techniques, name) and peft:
            problems.append(f"--{name} keeps a copy of the whole model: it cannot be used with --use_peft")
    if techniques.wise_ft:
        if base_model is None:
            problems.append(
                "--wise_ft interpolates with the pretrained base: it needs a line started from --model_name_or_path"
            )
        elif Path(base_model).resolve() == Path(output_dir).resolve():
            problems.append(
                f"--wise_ft needs the base model's weights kept: start from a copy outside {output_dir} "
                "(--model_name_or_path), which every export overwrites"
            )
        if peft:
            problems.append("--wise_ft interpolates every weight: it cannot be used with --use_peft")
        if average_exports != "none" or cooldown_fraction > 0:
            problems.append("--wise_ft, --average_exports and --cooldown_fraction each replace the export: choose one")
    return problems
