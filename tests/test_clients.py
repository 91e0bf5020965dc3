"""The exported folder in the HuggingFace ecosystem: ``pipeline``, ``generate`` and ``transformers serve``.

The folder is the product's own export (:func:`helpers.export_tiny`) of a tiny model with the
bootstrap tokenizer. Everything runs offline: ``transformers serve`` is given the folder's
path and ``HF_HUB_OFFLINE=1``, and answers on loopback.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request

from helpers import wait_for

SERVER_START_SECONDS = 60  # importing torch, transformers and fastapi on a busy 2-core machine
REQUEST_SECONDS = 30


def test_the_text_generation_pipeline_continues_a_prompt(exported):
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(exported), device="cpu")
    (result,) = generator("def ", max_new_tokens=5, do_sample=False)
    assert result["generated_text"].startswith("def ") and len(result["generated_text"]) > len("def ")


def test_auto_model_for_causal_lm_generates_new_tokens(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True)
    inputs = tokenizer("import json", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert output.shape == (1, inputs["input_ids"].shape[1] + 5)
    assert tokenizer.decode(output[0], skip_special_tokens=True).startswith("import json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_transformers_serve_answers_openai_completion_and_chat_requests(exported, tmp_path):
    from openai import OpenAI

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(exported)]
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        wait_for(lambda: server.poll() is not None or _healthy(base), SERVER_START_SECONDS, "transformers serve")
        assert server.poll() is None, (tmp_path / "serve.log").read_text()
        client = OpenAI(base_url=f"{base}/v1", api_key="local", timeout=REQUEST_SECONDS, max_retries=0)
        completion = client.completions.create(model=str(exported), prompt="def ", max_tokens=8)
        assert completion.choices[0].text
        chat = client.chat.completions.create(
            model=str(exported), messages=[{"role": "user", "content": "import json"}], max_tokens=8
        )
        assert chat.choices[0].message.content
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        log.close()
