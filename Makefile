# bigvis: `make test` and `make train` are the whole set-up on a fresh machine with Python 3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# An experiment name, with its argument if it takes one: EXP=clip_vitb16:tokenizer=/data/tok.model
EXP ?= vit_ti_digits
EXP_NAME := $(firstword $(subst :, ,$(EXP)))
WORKDIR ?= runs/$(EXP_NAME)
ARGS ?=
# Reuse the extras the venv was installed with (e.g. `make install EXTRAS=gpu`), else test.
EXTRAS ?= $(or $(patsubst $(VENV)/.installed-%,%,$(firstword $(wildcard $(VENV)/.installed-*))),test)
# `make test` needs pytest: it adds the test extra to whatever the venv was installed with.
comma := ,
TEST_EXTRAS := $(if $(filter test,$(subst $(comma), ,$(EXTRAS))),$(EXTRAS),$(EXTRAS)$(comma)test)
# Tests use 2 workers on a 2-core machine; override with `make test PYTEST_ARGS=...`.
PYTEST_ARGS ?= -n 2 --timeout 900

.PHONY: install train test clean-venv

# The stamp is rebuilt when pyproject.toml changes, so `make install` updates the venv.
$(VENV)/.installed-%: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$*]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

train: install
	$(BIN)/bigvis train --config '$(EXP)' --workdir '$(WORKDIR)' $(ARGS)

test: $(VENV)/.installed-$(TEST_EXTRAS)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
