# The two fresh-machine commands (README): `make quickstart` and `make test`.
# Both create .venv on first use with the pinned versions in constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

export RAY_USAGE_STATS_ENABLED ?= 0
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: install quickstart check test test-faults clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[train,dev,export]'
	touch $@

quickstart: install
	$(BIN)/raptor run jobs/quickstart.yaml

# the edit-test loop: every test not marked slow (unit tests of every module and one tiny end-to-end pipeline
# run: real Ray, DeepSpeed, S3); `make test` is the full suite
check: install
	bash scripts/test.sh -m "not slow and not faults"

test: install
	bash scripts/test.sh -m "not faults"

# faults injected into real runs on a 3-node local cluster (tests/test_faults.py); CI runs both
test-faults: install
	bash scripts/test.sh -m faults tests/test_faults.py

clean:
	rm -rf $(VENV) runs
