"""The peer: the plain transformers Trainer script a user would write instead of this product.

    .venv/bin/python bench/plain_trainer.py --model_name_or_path DIR --dataset FILE.jsonl \
        --output_dir OUT [--max_seq_length 256] [any TrainingArguments flag]

It follows transformers' examples/pytorch/language-modeling/run_clm.py: load the JSON
lines with ``datasets``, tokenize, concatenate and cut into ``max_seq_length`` blocks
(the remainder dropped), train with ``Trainer`` and ``default_data_collator``, save.
Every TrainingArguments value keeps its default unless given on the command line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from itertools import chain

import datasets
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
)


@dataclass
class PeerArguments:
    model_name_or_path: str = field(metadata={"help": "Local model directory."})
    dataset: str = field(metadata={"help": "JSONL file with a 'text' field."})
    max_seq_length: int = field(default=256, metadata={"help": "Block size."})


def main() -> int:
    parser = HfArgumentParser((PeerArguments, TrainingArguments))  # type: ignore[arg-type]
    peer, args = parser.parse_args_into_dataclasses()
    tokenizer = AutoTokenizer.from_pretrained(peer.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(peer.model_name_or_path)
    raw = datasets.load_dataset("json", data_files=peer.dataset, split="train")
    tokenized = raw.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=raw.column_names)
    block = peer.max_seq_length

    def group_texts(examples):  # run_clm.py's group_texts
        joined = {k: list(chain(*examples[k])) for k in examples}
        total = (len(joined["input_ids"]) // block) * block
        result = {k: [t[i : i + block] for i in range(0, total, block)] for k, t in joined.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    lm = tokenized.map(group_texts, batched=True)
    trainer = Trainer(model=model, args=args, train_dataset=lm, data_collator=default_data_collator)
    result = trainer.train()
    trainer.save_model()
    print(f"peer trained {lm.num_rows * block * args.num_train_epochs:.0f} tokens; {result.metrics}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
