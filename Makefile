# The two set-up commands (as root): `make run` and `make test`. Each installs what is missing.
VENV ?= /opt/coroot-agent/venv
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup setup-test run test unit lint bench check

setup:
	@scripts/setup.sh

setup-test:
	@scripts/setup.sh --test

# The agent in the foreground, with the embedded store under /var/lib/coroot-agent.
run: setup
	coroot-agent run $(ARGS)

check: setup
	coroot-agent check $(ARGS)

# Unit and system tests together (system tests need root, the real kernel and BPF).
test: setup-test
	$(VENV)/bin/ruff check agent tests bench scripts deploy
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest --durations=30 $(PYTEST_ARGS)

unit: setup-test
	$(VENV)/bin/python -m pytest tests/unit $(PYTEST_ARGS)

# ruff, and mypy strict on agent/ (pyproject.toml [tool.mypy])
lint: setup-test
	$(VENV)/bin/ruff check agent tests bench scripts deploy
	$(VENV)/bin/mypy

bench: setup-test
	$(VENV)/bin/python bench/startup.py
	$(VENV)/bin/python bench/store.py
	$(VENV)/bin/python bench/remote_write.py
	$(VENV)/bin/python bench/tcp.py
	$(VENV)/bin/python bench/l7.py
	$(VENV)/bin/python bench/profiler.py
	$(VENV)/bin/python bench/logs.py
