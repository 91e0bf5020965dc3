"""The model card: ``README.md`` of the exported model (HuggingFace model-card conventions).

A YAML front matter (``library_name: transformers``, ``pipeline_tag: text-generation``,
``tags``) that the Hub and ``huggingface_hub.ModelCard`` read, then what the model is
(architecture, parameters, the model its line started from), its ``global_step``, the files whose
steps are in its weights with their held-out results, and how to load it: a chat model (a tokenizer
with a chat template of its own, :func:`daemon.store.origin.has_own_chat_template`) is shown asked a
question in its template, any other continuing a prompt.

The card is written into the export's staging folder (:func:`daemon.store.checkpoints.export_model`,
and the export a rollback restores), so it is moved in with the weights and never
describes another step than ``export.json``. The trained files are the standing done
rows of ``history.jsonl`` (:func:`daemon.store.status.standing_done_rows`: rolled-back files
are not listed) that ended at or before the exported step.

Standard library only: a rollback writes it from a process without torch.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.store.origin import has_own_chat_template, read_origin
from daemon.store.status import perplexity, read_history, standing_done_rows

CARD_FILE = "README.md"
TAGS = ("text-generation", "causal-lm", "continual-learning")


@dataclass(frozen=True)
class TrainedFile:
    """A file whose steps are in the exported weights (from its ``history.jsonl`` done row).

    Attributes:
        file: the file's name.
        start_step, end_step: ``global_step`` before and after the file.
        examples, tokens: training examples (after packing) and their tokens.
        eval_loss: mean token cross-entropy (nats) on the file's held-out slice after it, or None.
        finished_at: when it finished (ISO-8601 UTC).
    """

    file: str
    start_step: int
    end_step: int
    examples: int | None
    tokens: int | None
    eval_loss: float | None
    finished_at: str | None


@dataclass(frozen=True)
class ModelFacts:
    """What a saved model folder holds, read from ``config.json`` and the safetensors headers."""

    architecture: str
    model_type: str
    parameters: int | None
    layers: int | None
    hidden_size: int | None
    attention_heads: int | None
    vocab_size: int | None
    context_length: int | None
    dtype: str | None


def trained_files(
    status_dir: str | Path, global_step: int, finishing: dict[str, Any] | None = None
) -> list[TrainedFile]:
    """The files in a model at ``global_step``, oldest first.

    Args:
        status_dir: the status folder whose ``history.jsonl`` is read.
        global_step: the model's step; files that ended after it are not in it.
        finishing: the done history row of the file being saved, not yet appended
            (the export precedes the row); it replaces a row of the same file and start.

    Returns:
        One :class:`TrainedFile` per standing done row ending at or before ``global_step``.
    """
    rows = standing_done_rows(read_history(status_dir))
    if finishing is not None:
        key = (finishing.get("sha256"), finishing.get("start_step"))
        rows = [r for r in rows if (r.get("sha256"), r.get("start_step")) != key] + [finishing]
    files = [
        TrainedFile(
            r["file"],
            r["start_step"],
            r["end_step"],
            r.get("examples"),
            r.get("tokens"),
            r.get("eval_loss"),
            r.get("finished_at"),
        )
        for r in rows
        if r.get("end_step") is not None and r.get("start_step") is not None and r["end_step"] <= global_step
    ]
    return sorted(files, key=lambda f: f.end_step)


def describe_model(folder: str | Path) -> ModelFacts:
    """Architecture and size of the model saved in ``folder`` (reads headers, never tensors).

    Raises:
        OSError, ValueError: ``config.json`` is missing or not JSON.
    """
    root = Path(folder)
    config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or config
    shapes, dtypes = _tensor_shapes(root)
    return ModelFacts(
        architecture=(config.get("architectures") or ["unknown"])[0],
        model_type=str(config.get("model_type", "unknown")),
        parameters=sum(math.prod(s) for s in shapes) if shapes else None,
        layers=text.get("num_hidden_layers"),
        hidden_size=text.get("hidden_size"),
        attention_heads=text.get("num_attention_heads"),
        vocab_size=text.get("vocab_size"),
        context_length=text.get("max_position_embeddings"),
        dtype=", ".join(sorted(dtypes)) or config.get("dtype") or config.get("torch_dtype"),
    )


def _tensor_shapes(root: Path) -> tuple[list[list[int]], set[str]]:
    """The shapes and dtypes of every tensor in ``root``'s safetensors files (tied weights are saved once)."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = ["model.safetensors"] if (root / "model.safetensors").is_file() else []
    shapes, dtypes = [], set()
    for name in files:
        with open(root / name, "rb") as f:  # format: 8-byte little-endian header size, then the JSON header
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for key, tensor in header.items():
            if key != "__metadata__":
                shapes.append(tensor["shape"])
                dtypes.add(tensor["dtype"])
    return shapes, dtypes


def build_card(
    facts: ModelFacts,
    global_step: int,
    files: list[TrainedFile] | None,
    model_path: str,
    origin: dict[str, Any] | None = None,
    chat: bool = False,
) -> str:
    """The card's Markdown text.

    Args:
        facts: from :func:`describe_model`.
        global_step: the exported step.
        files: from :func:`trained_files`; None when no training history was given.
        model_path: the path users load the model from (the output folder's name).
        origin: the line's ``origin.json`` (:mod:`daemon.store.origin`); None leaves the starting model out.
        chat: the tokenizer has a chat template of its own: the usage asks it a question.
    """
    tags = "".join(f"- {t}\n" for t in (*TAGS, facts.model_type))
    lines = [
        f"---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n{tags}---",
        "",
        f"# {model_path}",
        "",
        f"A causal language model (`{facts.architecture}`) trained continuously, one JSONL file at a time, by the",
        "continuous training daemon. This card is written with every export and describes the weights beside it;",
        "`export.json` names the same step.",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `{facts.architecture}` (`{facts.model_type}`) |",
        f"| parameters | {_parameters(facts.parameters)} |",
        f"| layers / hidden size / attention heads | {_n(facts.layers)} / {_n(facts.hidden_size)} / "
        f"{_n(facts.attention_heads)} |",
        f"| vocabulary | {_n(facts.vocab_size)} tokens |",
        f"| context length | {_n(facts.context_length)} tokens |",
        f"| weights | safetensors, {facts.dtype or '?'} |",
        *_started_from(origin),
        f"| global_step | {global_step} |",
        "",
        *_training_data(files),
        *_usage(model_path, chat),
    ]
    return "\n".join(lines)


def _training_data(files: list[TrainedFile] | None) -> list[str]:
    lines = ["## Training data", ""]
    if files is None:
        return [*lines, "No training history was given with this export.", ""]
    if not files:
        return [*lines, "No finished file is in these weights.", ""]
    lines += [
        "The files whose steps are in these weights, oldest first; files rolled back are not listed.",
        "Held-out loss: mean token cross-entropy (nats) on the file's held-out slice, right after the file.",
        "",
        "| file | steps | examples | tokens | held-out loss | perplexity | finished |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in files:
        ppl = perplexity(f.eval_loss)
        loss = "-" if f.eval_loss is None else f"{f.eval_loss:.4f}"
        lines.append(
            f"| `{_cell(f.file)}` | {f.start_step} → {f.end_step} | {_n(f.examples)} | {_n(f.tokens)} | {loss} | "
            f"{'-' if ppl is None else f'{ppl:.2f}'} | {f.finished_at or '-'} |"
        )
    return [*lines, ""]


def _started_from(origin: dict[str, Any] | None) -> list[str]:
    if origin is None:
        return []
    base = origin.get("base_model")
    return [f"| started from | {f'`{_cell(str(base))}` (a pretrained base)' if base else 'the embedded model'} |"]


def _usage(model_path: str, chat: bool) -> list[str]:
    """ "How to use": a pipeline, then ``generate``, then the command line and ``transformers serve``; a chat model
    is asked a question in its chat template, another continues ``"def "``."""
    if chat:
        question = 'messages = [{"role": "user", "content": "What is the capital of France?"}]'
        intro = ["A chat model: ask it in its chat template (`chat_template.jinja`).", ""]
        pipeline = [
            f'chat = pipeline("text-generation", model="{model_path}")',
            question,
            'print(chat(messages, max_new_tokens=40)[0]["generated_text"][-1]["content"])',
        ]
        generate = [
            question,
            "inputs = tokenizer.apply_chat_template(",
            '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
            ")",
            "output = model.generate(**inputs, max_new_tokens=40)",
            'print(tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True))',
        ]
        elsewhere = [
            "From the command line, as a user turn in its template:",
            f'`python -m daemon generate "What is the capital of France?" --output_dir {model_path}`.',
            "As an OpenAI-compatible server (`/v1/chat/completions`), given this folder's absolute path:",
        ]
    else:
        intro = []
        pipeline = [
            f'generator = pipeline("text-generation", model="{model_path}")',
            'print(generator("def ", max_new_tokens=40, do_sample=True)[0]["generated_text"])',
        ]
        generate = [
            'inputs = tokenizer("def ", return_tensors="pt")',
            "output = model.generate(**inputs, max_new_tokens=40, do_sample=True)",
            "print(tokenizer.decode(output[0], skip_special_tokens=True))",
        ]
        elsewhere = [
            f'From the command line: `python -m daemon generate "def " --output_dir {model_path}`. As an',
            "OpenAI-compatible server (`/v1/completions`, `/v1/chat/completions`), given this folder's absolute path:",
        ]
    load = [
        f'tokenizer = AutoTokenizer.from_pretrained("{model_path}")',
        f'model = AutoModelForCausalLM.from_pretrained("{model_path}")',
    ]
    return [
        "## How to use",
        "",
        *intro,
        *_python(["from transformers import pipeline", "", *pipeline]),
        *_python(["from transformers import AutoModelForCausalLM, AutoTokenizer", "", *load, *generate]),
        *elsewhere,
        f"`HF_HUB_OFFLINE=1 transformers serve /abs/path/to/{model_path} --host 127.0.0.1 --port 8000`.",
        "",
    ]


def _python(lines: list[str]) -> list[str]:
    return ["```python", *lines, "```", ""]


def write_card(
    folder: str | Path,
    global_step: int,
    status_dir: str | Path | None,
    model_path: str,
    finishing: dict[str, Any] | None = None,
    output_dir: str | Path | None = None,
) -> Path:
    """Write ``README.md`` into ``folder``, a staged export (so a plain write: the stage is moved in whole).

    Args:
        folder: the staging folder holding the model's ``config.json``, weights and tokenizer.
        global_step: the step the export holds.
        status_dir: the status folder with the training history; None lists no files.
        model_path: the path users load the model from.
        finishing: see :func:`trained_files`.
        output_dir: the running model's folder, whose ``origin.json`` names the line's start; None leaves it out.

    Returns:
        The card's path.
    """
    files = None if status_dir is None else trained_files(status_dir, global_step, finishing)
    origin = read_origin(output_dir) if output_dir is not None else None
    card = build_card(describe_model(folder), global_step, files, model_path, origin, has_own_chat_template(folder))
    path = Path(folder) / CARD_FILE
    path.write_text(card, encoding="utf-8")
    return path


def _parameters(count: int | None) -> str:
    if count is None:
        return "?"
    return f"{count / 1e6:.2f}M ({count:,})" if count >= 1e6 else f"{count / 1e3:.1f}K ({count:,})"


def _n(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _cell(text: str) -> str:
    """A file name as one Markdown table cell: no line breaks, pipes or backticks that end it early."""
    return " ".join(text.split()).replace("|", "\\|").replace("`", "'")
