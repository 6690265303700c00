# `make run` and `make test`: bootstrap .venv if needed (torch's CPU build first, then the locked rest), then act.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ORACLE_PACKAGES := transformers
ORACLES := $(VENV)/oracles
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PYTHONUNBUFFERED := 1

# The UI test drives headless Chromium; the team-stack test validates the compose file with docker-compose.
SYSTEM_TOOLS := chromium docker-compose

.PHONY: run test lint lock clean system-tools

run: $(STAMP)
	$(BIN)/gptpipe run

# Test modules run in parallel processes, one more than the cores (up to 4), each module whole in one; the
# processes share one Prefect server, each has its own S3 server. The end-to-end tests spend part of their time
# waiting on servers, workers and polls, so a third process on two cores keeps them busy. Modules go out in the
# order tests/conftest.py gives them (the long end-to-end ones first), not by their number of tests.
TEST_PROCESSES := $(shell echo $$(( $$(getconf _NPROCESSORS_ONLN) + 1 )))
test: $(STAMP) $(ORACLES)/.installed system-tools
	$(BIN)/pytest --numprocesses=$(TEST_PROCESSES) --maxprocesses=4 --dist=loadfile --no-loadscope-reorder

# Installed with apt-get where this runs as root on Debian/Ubuntu; elsewhere named, with the command to run.
system-tools:
	@missing=""; for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "make test: installing$$missing (Debian packages)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing >/dev/null; \
	  else \
	    echo "make test: needs$$missing; install them first, e.g. sudo apt-get install$$missing"; exit 1; \
	  fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check components flows tests benchmarks

# DVC's site cache (state and index databases) stays in the clone, named in .dvc/config.local by its absolute path:
# the committed relative one breaks `dvc exp run --queue`, whose copies of the repository resolve it elsewhere.
# torch is pinned apart from the lock: `pip install torch==2.13.0` takes the CPU build, while a resolver
# left to itself would pull the multi-GB CUDA one. uv then installs the exact locked versions in seconds, compiled
# to bytecode once: every stage is a new process, and with PYTHONDONTWRITEBYTECODE set (as in many containers) each
# would compile Lightning, Prefect and DVC from source again, doubling their import time.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 uv==0.13.9
	grep -v -E '^($(ORACLE_PACKAGES))==' requirements.lock > $(VENV)/requirements.txt
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -r $(VENV)/requirements.txt
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	$(BIN)/dvc config --local core.site_cache_dir $(CURDIR)/.dvc/site
	touch $@

# The test oracles (transformers, which reads what the pipeline imports and exports) live outside site-packages,
# on the test process' path only (tests/conftest.py): torchmetrics, under Lightning, imports transformers whenever
# it is installed, and that was 1.6 s of every training stage's start. Their versions and dependencies are locked.
$(ORACLES)/.installed: $(STAMP)
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python --no-deps --target $(ORACLES) \
	  $$(grep -E '^($(ORACLE_PACKAGES))==' requirements.lock)
	touch $@

# Re-resolve after changing dependencies in pyproject.toml; torch and the project itself stay out of the lock.
lock: $(STAMP)
	$(BIN)/uv pip install --python $(BIN)/python -e '.[test]'
	$(BIN)/uv pip freeze --python $(BIN)/python --exclude-editable | grep -v -E '^torch==' > requirements.lock
	$(BIN)/uv pip uninstall --python $(BIN)/python $(ORACLE_PACKAGES)

clean:
	rm -rf $(VENV) data models reports/*.json reports/*.png reports/*.md reports/curves dvc_plots .gptpipe
