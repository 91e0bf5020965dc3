"""What a ``--model_name_or_path`` folder must hold, checked before anything is written (standard library only).

The daemon process parses the same flags and never imports torch or transformers' model
code, so these are checks of the folder's files, not a load: a model that passes them can
still fail to load (a torn weights file), and then the run fails with the loader's reason.
"""

from __future__ import annotations

import json
from pathlib import Path

# transformers' names for a causal LM's class: LlamaForCausalLM, GPT2LMHeadModel, ...
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# Any one of these makes a loadable tokenizer (fast, SentencePiece, BPE vocabulary, or a config naming one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def pretrained_problems(path: str | Path, trust_remote_code: bool) -> list[str]:
    """Why ``path`` cannot start a run, one message per problem (empty when none is found).

    Args:
        path: the ``--model_name_or_path`` folder.
        trust_remote_code: ``--trust_remote_code``.

    Returns:
        Messages naming the flag and what to do: not a folder, no or unreadable ``config.json``,
        a model class that is not a causal LM, custom modelling code without
        ``--trust_remote_code``, no tokenizer files.
    """
    folder = Path(path)
    flag = f"--model_name_or_path {path}"
    if not folder.is_dir():
        return [f"{flag}: not a local directory (nothing is downloaded)"]
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [f"{flag}: no readable config.json ({type(e).__name__}); it must be a HuggingFace model folder"]
    problems = []
    architectures = config.get("architectures") or []
    if architectures and not any(str(a).endswith(CAUSAL_LM_SUFFIXES) for a in architectures):
        problems.append(f"{flag}: {', '.join(map(str, architectures))} is not a causal language model")
    if "AutoModelForCausalLM" in (config.get("auto_map") or {}) and not trust_remote_code:
        problems.append(f"{flag}: the model needs its own code; pass --trust_remote_code if you trust it")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"{flag}: no tokenizer ({', '.join(TOKENIZER_FILES)}); save the tokenizer with the model")
    return problems
