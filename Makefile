# Two commands do everything (see README.md):
#   make book    execute every chapter at the paper's settings and build the HTML site
#   make test    unit tests, and every chapter executed under the CI profile with nbval
# Both create the virtual environment .venv from requirements.txt when needed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: book test notebooks check-notebooks clean benchmarks

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

book: $(STAMP)
	BOOK_PROFILE=$${BOOK_PROFILE:-paper} $(BIN)/jupyter-book build . --all --warningiserror --keep-going
	@echo "open _build/html/index.html"

test: $(STAMP)
	BOOK_PROFILE=ci $(BIN)/python -m pytest

# Re-execute the chapters under the CI profile and rewrite their paired .ipynb
# (reference outputs for nbval). Run after editing a chapter's .md.
notebooks: $(STAMP)
	$(BIN)/python scripts/notebooks.py refresh

check-notebooks: $(STAMP)
	$(BIN)/python scripts/notebooks.py check

clean:
	rm -rf _build notebooks/figures

# Remeasure the performance page's numbers on this machine (several minutes).
benchmarks: $(STAMP)
	cd benchmarks && ../$(BIN)/python sweep.py && ../$(BIN)/python throughput.py && ../$(BIN)/python scaling.py
