"""Evolution snapshots: how the model writes after each file (README "Folders and files").

``<status_dir>/evolution/<global_step:08d>-<file stem>/`` (a long stem cut, with a
hash: :func:`~daemon.names.fit_name`) holds ``snapshot.json``
(step, file, held-out eval loss and perplexity, generation settings and seed,
the samples, the evaluation suite's rows, forgetting and quality gate) and
``samples.md``. The folder is written under a temporary name
and renamed into place, so a snapshot is either whole or absent.

Callers must have stopped every training thread first: generation here is
inference on the same model object.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.names import NAME_MAX, fit_name, printable
from daemon.records import utc_now
from daemon.status import mark_progress, perplexity

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings recorded with every snapshot (``model.generate`` arguments)."""

    max_new_tokens: int
    temperature: float
    top_k: int
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "do_sample": True,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "seed": self.seed,
        }


def generate_samples(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], settings: GenerationSettings
) -> list[dict[str, str]]:
    """Sample one continuation per prompt, each from ``torch.manual_seed(settings.seed)``.

    Returns:
        ``[{"prompt": str, "completion": str}, ...]`` in prompt order; the completion
        excludes the prompt and special tokens.
    """
    import torch

    model.eval()
    samples = []
    with torch.inference_mode():
        for prompt in prompts:
            mark_progress()
            torch.manual_seed(settings.seed)
            enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            if enc["input_ids"].shape[1] == 0:  # an empty prompt starts from EOS, like a new document
                enc = {
                    "input_ids": torch.tensor([[tokenizer.eos_token_id]]),
                    "attention_mask": torch.ones(1, 1, dtype=torch.long),
                }
            enc = {k: v.to(model.device) for k, v in enc.items()}
            out = model.generate(  # type: ignore[operator]
                **enc,
                do_sample=True,
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_k=settings.top_k,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = out[0, enc["input_ids"].shape[1] :]
            completion = str(tokenizer.decode(new_tokens, skip_special_tokens=True))
            samples.append({"prompt": prompt, "completion": completion})
    return samples


def write_snapshot(
    status_dir: str | Path,
    step: int,
    file_name: str,
    eval_loss: float | None,
    eval_examples: int,
    settings: GenerationSettings,
    samples: list[dict[str, str]],
    evaluation: dict[str, Any] | None = None,
) -> Path:
    """Write ``snapshot.json`` and ``samples.md`` for one finished file.

    Args:
        status_dir: the status folder.
        step: ``global_step`` after the file.
        file_name: the trained file's name.
        eval_loss: mean held-out loss, or None when the file was too small to spare a held-out slice.
        eval_examples: held-out examples evaluated.
        settings: generation settings used for ``samples``.
        samples: from :func:`generate_samples`.
        evaluation: ``evaluations`` (the model's rows on every slice), ``forgetting``,
            ``quality_gate`` and ``evaluation`` (:meth:`daemon.evaluation.FileEvaluation.snapshot_fields`).

    Returns:
        The snapshot folder.
    """
    root = Path(status_dir) / "evolution"
    final = root / fit_name(f"{step:08d}-{Path(file_name).stem}", limit=NAME_MAX - len("..tmp"))  # room for tmp
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    doc = {
        "step": step,
        "file": printable(file_name),  # encodable, and one line in samples.md, whatever the name holds
        "created_at": utc_now(),
        "eval_loss": eval_loss,
        "perplexity": perplexity(eval_loss),
        "eval_examples": eval_examples,
        "eval_note": None if eval_loss is not None else "file too small to spare a held-out slice; no evaluation",
        "generation": settings.as_dict(),
        "samples": samples,
        **(evaluation or {}),
    }
    (tmp / "snapshot.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp / "samples.md").write_text(_markdown(doc), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def _markdown(doc: dict[str, Any]) -> str:
    ppl = doc["perplexity"]
    lines = [
        f"# Step {doc['step']}: after `{doc['file']}`",
        "",
        f"- held-out eval loss: {doc['eval_loss']:.4f}, perplexity: {ppl:.2f} ({doc['eval_examples']} examples)"
        if doc["eval_loss"] is not None
        else f"- {doc['eval_note']}",
        f"- generation: {json.dumps(doc['generation'])}",
        "",
    ]
    if doc.get("evaluations"):
        lines += ["| slice | examples | loss (nats) | perplexity | bits per byte |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['slice']} | {r['examples']} | {r['loss']:.4f} | {r['perplexity']:.2f} | {r['bits_per_byte']:.4f} |"
            for r in doc["evaluations"]
        ]
        lines.append("")
    for i, s in enumerate(doc["samples"], start=1):
        lines += [f"## Sample {i}: prompt `{s['prompt']!r}`", "", "```", s["prompt"] + s["completion"], "```", ""]
    return "\n".join(lines)
