"""``--use_peft`` and the LoRA settings: their flags, their defaults, and resolving them once before parsing.

Flags not given follow the running adapter (:func:`resolve_peft`); a switch of kind or of the
adapter's settings on a used ``output_dir`` is refused in one line
(:func:`daemon.store.adapter_files.switch_problem`). docs/lora.md says how it behaves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.exceptions import ConfigError
from daemon.store.adapter_files import adapter_config, switch_problem
from daemon.store.checkpoints import latest_complete_checkpoint

# TRL's ModelConfig defaults (lora_r 16, lora_alpha 32), but dropout 0 where TRL has 0.05: the gradient worker
# threads draw dropout masks from the one CPU generator in no fixed order, so a resumed file would not repeat
# its steps exactly (docs/lora.md, "Why dropout 0 by default"). The targets are every linear projection of the
# attention and MLP blocks (peft's "all-linear" leaves the output head out).
DEFAULT_LORA_R = 16
DEFAULT_LORA_DROPOUT = 0.0
DEFAULT_TARGET_MODULES = ["all-linear"]


# The learning rate of a LoRA line when --learning_rate is not given: 1e-3, by the rule that chose full fine-tuning's
# 5e-5 (the largest rate whose base-model slice change stays within 0.05 nats; bench/lora.py sweep) at the default
# rank 16, under the defaults of a pretrained start, which rehearse the base model's answers. 2e-3 passed too and is
# not taken: one seed of ten steps, and rehearsal lowers that slice as the rate rises (BENCHMARKS.md, "lora sweep
# r16", with the readings that rehearsal cannot move). Before rehearsal the same rule gave 2e-4.
LORA_LEARNING_RATE = 1e-3

# The share of the base model's own answers a LoRA line rehearses when --base_rehearsal_fraction is not given (full
# fine-tuning: 0.2). At 0.2 and LoRA's rate, rank 8 moved the base-model slice +0.052 nats where full fine-tuning
# moved it -0.028, and answered fewer of the written questions right; 0.3 brought it below the base (BENCHMARKS.md,
# "lora sweep r16" and "lora compare").
LORA_REHEARSAL_FRACTION = 0.3


@dataclass
class PeftArguments:
    """LoRA adapters (TRL's names). None means "not given": it then follows the running model (docs/lora.md)."""

    # Typed bool (None until resolve_peft): HfArgumentParser then reads a bare --use_peft as True.
    use_peft: bool = field(  # type: ignore[assignment]
        default=None,
        metadata={
            "help": "Train a LoRA adapter (peft) on the base model instead of every weight. Default: what the "
            "output_dir's checkpoints hold (off for a new one). Switching on a used output_dir is refused."
        },
    )
    lora_r: int | None = field(
        default=None,
        metadata={"help": f"LoRA rank. Default: the running adapter's, {DEFAULT_LORA_R} for a new one."},
    )
    lora_alpha: int | None = field(
        default=None,
        metadata={"help": "LoRA scaling alpha. Default: the running adapter's, 2 x --lora_r for a new one."},
    )
    lora_dropout: float | None = field(
        default=None,
        metadata={"help": f"Dropout on the LoRA branch. Default: the running adapter's, {DEFAULT_LORA_DROPOUT} new."},
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names that get an adapter. Default: the running adapter's (others are refused); for a "
            "new one every linear projection of the attention and MLP blocks ('all-linear')."
        },
    )
    merge_adapter: bool = field(
        default=False,
        metadata={
            "help": "Merge the running LoRA adapter into the base weights, then continue in full fine-tuning at "
            "the same step (fresh optimizer). Only on an output_dir whose latest checkpoint is an adapter, and not "
            "while a file is half trained on it (resume that file first)."
        },
    )

    def __post_init__(self) -> None:
        problems = []
        if self.lora_r is not None and self.lora_r < 1:
            problems.append("--lora_r must be >= 1")
        if self.lora_dropout is not None and not 0 <= self.lora_dropout < 1:
            problems.append("--lora_dropout must be >= 0 and < 1")
        if self.merge_adapter and self.use_peft:
            problems.append("--merge_adapter continues in full fine-tuning: it cannot be given with --use_peft")
        if problems:
            raise ConfigError("; ".join(problems))

    def lora_settings(self) -> dict[str, Any]:
        """``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules`` of a new adapter (after :func:`resolve_peft`)."""
        r = self.lora_r or DEFAULT_LORA_R
        return {
            "r": r,
            "lora_alpha": self.lora_alpha if self.lora_alpha is not None else 2 * r,
            "lora_dropout": self.lora_dropout if self.lora_dropout is not None else DEFAULT_LORA_DROPOUT,
            "target_modules": list(self.lora_target_modules or DEFAULT_TARGET_MODULES),
        }


def resolve_peft(values: dict[str, Any]) -> None:
    """Fill ``use_peft`` and the LoRA settings not given from the running adapter (in place, before parsing).

    Refuses (one line, nothing written) a switch of kind or of the adapter's settings on a used ``output_dir``, and
    ``--merge_adapter`` inside a half-trained file (:func:`merge_problem`).

    Raises:
        ConfigError: a switch, ``--merge_adapter`` inside a file, or ``--use_peft`` without a base model
            folder outside ``output_dir``.
    """
    kind, config = running_kind(values["output_dir"])
    merging = bool(values.get("merge_adapter"))
    if values["use_peft"] is None:
        values["use_peft"] = kind == "lora" and not merging
    problem = switch_problem(kind, config, values) or (merge_problem(values) if merging and kind == "lora" else None)
    if problem:
        raise ConfigError(problem)
    if kind == "lora" and values["use_peft"] and config is not None:
        for flag, key in (
            ("lora_r", "r"),
            ("lora_alpha", "lora_alpha"),
            ("lora_dropout", "lora_dropout"),
            ("lora_target_modules", "target_modules"),
        ):
            if values[flag] is None:
                values[flag] = sorted(config[key]) if isinstance(config.get(key), list) else config.get(key)
    if values["use_peft"] and kind is None:
        from daemon.store.origin import base_model_of

        base = base_model_of(values["output_dir"], values["model_name_or_path"])
        if base is None or Path(base).resolve() == Path(values["output_dir"]).resolve():
            raise ConfigError(
                "--use_peft trains an adapter on a pretrained base: name its folder with --model_name_or_path "
                "(outside --output_dir, which every export replaces)"
            )


def merge_problem(values: dict[str, Any]) -> str | None:
    """The one line that refuses ``--merge_adapter`` while the latest adapter checkpoint is inside a file, or None.

    The merge is irreversible, and a half-trained file's plan (:func:`daemon.training.plan.recorded_plan`) was
    made under the adapter's defaults (``--base_rehearsal_fraction``): merged, it could not resume. Reads the
    ledger in ``status_dir`` only when it exists.
    """
    from daemon.store.ledger import Ledger
    from daemon.store.ledger_file import LEDGER_FILE
    from daemon.training.plan import half_trained_file

    latest = latest_complete_checkpoint(values["output_dir"], set_aside=False)
    if latest is None or not (Path(values["status_dir"]) / LEDGER_FILE).is_file():
        return None
    row = half_trained_file(Ledger(values["status_dir"]), latest.global_step)
    if row is None or row.start_step is None or row.planned_steps is None:
        return None
    return (
        f"--merge_adapter: {row.name} is half trained on the adapter (its plan {row.start_step} -> "
        f"{row.start_step + row.planned_steps}, the latest checkpoint at step {latest.global_step}): resume it "
        "without --merge_adapter, then give --merge_adapter to the next file"
    )


def running_kind(output_dir: str | Path) -> tuple[str | None, dict[str, Any] | None]:
    """``("lora", its adapter config)`` or ``("full", None)`` for the latest complete checkpoint; ``(None, None)``.

    Reads files only (no torch): the daemon asks it when it checks flags.
    """
    latest = latest_complete_checkpoint(output_dir, set_aside=False)
    if latest is None:
        return None, None
    config = adapter_config(latest.path)
    return ("lora", config) if config is not None else ("full", None)
