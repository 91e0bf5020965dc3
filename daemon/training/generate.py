"""``python -m daemon generate "PROMPT"``: sample the exported model from the command line.

python -m daemon generate "def " [--output_dir current_model] [--max_new_tokens 48] [--temperature 0.8]
    [--top_k 50] [--seed 0]

Prints the prompt and its continuation on stdout. Sampling is the evolution snapshots'
(:func:`daemon.training.snapshots.generate_samples`): the same seed and settings give the same text,
and a prompt ending in a space continues with one space before the next word. It reads the
export (``from_pretrained`` of the output folder), so it runs beside a training daemon.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.config_file import command_parser, parse_command
from daemon.exceptions import CheckpointError, ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# How often a load is retried when an export is moved in meanwhile (export_model: milliseconds).
LOAD_ATTEMPTS = 3


def load_export(output_dir: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, int | None]:
    """Load the exported model and tokenizer of ``output_dir``, all of one step.

    ``export.json`` is read before and after loading; when an export was moved in meanwhile
    (the files may be of two steps), the load is repeated.

    Returns:
        ``(model, tokenizer, global_step)``; the step is None when ``export.json`` is missing.

    Raises:
        CheckpointError: there is no exported model, or it does not load.
    """
    from daemon.store.checkpoints import export_step
    from daemon.training.model import has_model, load_pretrained

    if not has_model(output_dir):
        raise CheckpointError(
            f"no exported model in {output_dir} (no config.json): train a file first "
            "(python train.py --dataset FILE.jsonl, or drop it into the daemon's inbox)"
        )
    for _ in range(LOAD_ATTEMPTS):
        before = export_step(output_dir)
        model, tokenizer = load_pretrained(output_dir)
        if export_step(output_dir) == before:
            break
    return model, tokenizer, before


def main(argv: list[str]) -> int:
    """Parse the arguments, sample once, print ``prompt + completion`` (a chat model: its answer).

    Returns:
        The exit code: 0 printed, 1 no loadable exported model (one line on stderr), 2 bad usage.
    """
    parser = command_parser("python -m daemon generate", "Sample a continuation of PROMPT from the exported model.")
    parser.add_argument("prompt", help="The text to continue.")
    parser.add_argument("--max_new_tokens", type=int, default=48, help="Tokens to sample (default: 48).")
    parser.add_argument("--temperature", type=float, default=0.8, help="Sampling temperature, > 0 (default: 0.8).")
    parser.add_argument("--top_k", type=int, default=50, help="Top-k sampling (default: 50).")
    parser.add_argument("--seed", type=int, default=0, help="Random seed: the same seed gives the same text.")
    try:
        args = parse_command(parser, argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    if args.max_new_tokens < 1:
        parser.error("--max_new_tokens must be >= 1")
    if args.temperature <= 0:
        parser.error("--temperature must be > 0")
    if args.top_k < 1:
        parser.error("--top_k must be >= 1")

    from transformers.utils import logging as hf_logging

    from daemon.training.snapshots import GenerationSettings, generate_samples

    hf_logging.disable_progress_bar()  # stdout and stderr keep only the text and real problems
    try:
        model, tokenizer, _ = load_export(args.output_dir)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_k, args.seed)
    (sample,) = generate_samples(model, tokenizer, [args.prompt], settings)
    print(sample["completion"] if sample.get("chat") else sample["prompt"] + sample["completion"], flush=True)
    return 0
