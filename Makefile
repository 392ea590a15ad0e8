# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test install bench clean

# CPU torch is pinned (torch==2.13.0 in the `torch` extra); llama-cpp-python compiles once (~3 min)
# and pip caches the wheel. For CUDA see README "GPU setup".
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[llamacpp,torch,dev]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/aibox serve --config config.toml

test: install
	bash scripts/ensure-redis.sh
	$(PY) -m pytest

bench: install
	$(PY) bench/llamacpp.py && $(PY) bench/engine.py && $(PY) bench/audit.py && $(PY) bench/overhead.py

clean:
	rm -rf $(VENV) .aibox .pytest_cache
