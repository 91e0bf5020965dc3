"""The defaults that follow the starting model: the embedded model learns from scratch, a pretrained base is
fine-tuned (docs/flags.md "Defaults that follow the starting model").

:mod:`daemon.training.arguments` sets each of these flags, where not given, to its value in the dictionary of
the line's start, as :mod:`daemon.store.origin` recorded it. Standard library only.
"""

from __future__ import annotations

from typing import Any

from daemon.store.origin import base_model_of

# The defaults that follow the starting model (daemon.store.origin): the embedded model learns from scratch; a
# pretrained base is fine-tuned. The pretrained rate is the largest of 2e-5, 5e-5, 1e-4 and 5e-4 that cost
# SmolLM2-135M-Instruct at most 0.05 nats on its own answers to neutral prompts over two drops of
# docstrings (bench/real_model.py sweep; BENCHMARKS.md "real-model sweep"); it is also transformers'
# own TrainingArguments default. No warmup: a warmup counted from the model's first step would leave
# a short first file at almost no learning rate, and Adam's bias correction already sizes the first steps.
# Rehearsal of the base model's own answers (daemon.training.rehearsal) is on for a pretrained base: on SmolLM2's
# stream of a text, a prompt-completion and a chat drop (bench/real_model.py stream; BENCHMARKS.md "real-model
# stream") the base-model slice rose about half a nat without it, most of it from the chat drop, and stayed
# within a few hundredths of a nat of the base with it at --base_rehearsal_fraction 0.2, the domain gain
# unchanged; what it costs the line's first file in speed is in "real-model speed". The embedded model has no
# base to keep.
# A LoRA line rehearses LORA_REHEARSAL_FRACTION instead; the scratch fraction counts only with --base_rehearsal true.
# The embedded model exports the moving average of its weights (daemon.training.ema, --ema_decay 0.9): over five
# different texts (bench/continual.py, 5 repeats; BENCHMARKS.md "continual") it was the first setting within
# 1.10x the steps to pass the bench's decision rule against plain replay (the upper 95 % bound of its gap to
# the union minus replay's below 0) and its plasticity guard (the newest file no worse than without replay).
# A pretrained base exports its own weights (on SmolLM2's stream, one seed, the average kept 99 % of the domain gain
# with the base-model slice at -0.019 against -0.003: no gain worth a default); so does a run that asks for another
# export (daemon.training.averaging_flags.default_average_exports).
# The embedded model replays 11 % of a file's examples, each weighing 2 in the loss (daemon.training.loss_weights):
# on the same bench, at the most steps within 1.10x the no-replay ones, it passed the decision rule against 9 %
# replay with the moving average over 10 repeats and the plasticity guard; weight 3 gained more but failed the guard
# (BENCHMARKS.md "continual"). A pretrained base keeps 9 %, every token alike: its rehearsal was measured so, and
# the weight would weigh the rehearsed answers too.
# The embedded model also distils its replayed examples toward the file's starting model at weight 1
# (daemon.training.distillation): over 10 repeats of the same bench it passed the decision rule against the weighted
# replay with the moving average, and the plasticity guard, at the same steps and 1.09x the stream's time (a weight
# of 2 failed the guard). Its file's own examples are distilled too, at 0.7 (--file_distillation): over 10 repeats
# it passed the decision rule against distilling the replay alone (-0.061 nats [-0.083, -0.040]) and the guard,
# and met every forgetting target of issue 32, which counts the budget in steps: the same steps, but the teacher's
# pass over every row costs training time (about 1.44x the no-replay training seconds against 1.22x; replaying
# 25 % forgets less in 1.16x to 1.24x the seconds but 1.26x the steps). A line's first file from scratch never
# distils (no teacher). A pretrained base distils nothing: on SmolLM2's stream (one seed, so no decision rule) both
# terms kept 97 % of the domain gain and moved every general measure down (the base-model slice -0.068 against
# -0.003) for 1.14x the training seconds of a row without them; its defaults already meet the target
# (BENCHMARKS.md "real-model stream", cpu-amx).
SCRATCH_DEFAULTS: dict[str, Any] = {
    "learning_rate": 5e-4,
    "warmup_steps": 100,
    "base_rehearsal": False,
    "base_rehearsal_fraction": 0.2,
    "average_exports": "ema",
    "replay_fraction": 0.11,
    "replay_loss_weight": 2.0,
    "replay_distillation": 1.0,
    "file_distillation": 0.7,
}
PRETRAINED_DEFAULTS: dict[str, Any] = {
    "learning_rate": 5e-5,
    "warmup_steps": 0,
    "base_rehearsal": True,
    "base_rehearsal_fraction": 0.2,
    "average_exports": "none",
    "replay_fraction": 0.09,
    "replay_loss_weight": 1.0,
    "replay_distillation": 0.0,
    "file_distillation": 0.0,
}


def starting_defaults(flags: dict[str, Any]) -> dict[str, Any]:
    """:data:`PRETRAINED_DEFAULTS` for a line started from a pretrained base, else :data:`SCRATCH_DEFAULTS`."""
    base = base_model_of(flags["output_dir"], flags["model_name_or_path"])
    return SCRATCH_DEFAULTS if base is None else PRETRAINED_DEFAULTS
