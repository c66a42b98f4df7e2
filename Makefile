# netra: `make run` starts a server on its embedded defaults; `make test` runs the tests.
# Both create the virtual environment (.venv) on first use.

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
HOST    ?= 127.0.0.1
PORT    ?= 8000
PYTEST_ARGS ?=

.PHONY: run test test-fast bench chat chromium agui-js clean help

help:
	@echo "make run     - install (first time) and start netra on http://$(HOST):$(PORT)"
	@echo "make test    - install (first time) and run the whole test suite"
	@echo "make bench   - run the benchmarks (see bench/README.md)"
	@echo "make chat    - terminal chat against a running server (TOKEN=..., or a development token for NAME=alice)"
	@echo "make clean   - remove the virtual environment and local data"

$(STAMP): pyproject.toml
	@set -e; \
	if [ ! -x "$(PY)" ]; then \
		python=$$(sh .ci/find-python); \
		echo "creating $(VENV) with $$python"; \
		"$$python" -m venv "$(VENV)"; \
	fi; \
	"$(PY)" -m pip install --quiet --disable-pip-version-check --upgrade pip; \
	"$(PY)" -m pip install --quiet --disable-pip-version-check -e '.[test]'; \
	touch "$(STAMP)"

run: $(STAMP)
	$(VENV)/bin/netra serve --host $(HOST) --port $(PORT)

chromium:
	@sh .ci/install-chromium

# The official AG-UI client, for the /agui test (tests/agui_js; needs node and npm).
agui-js:
	@sh .ci/install-agui-js

test: $(STAMP) chromium agui-js
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not browser and not postgres" -x -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(PY) -m bench

# Without TOKEN, a token for NAME signed like `netra token` signs it (the
# development secret `make run` keeps in ./data, or NETRA_JWT_SECRET).
NAME    ?= alice
chat: $(STAMP)
	@token="$(TOKEN)"; \
	if [ -z "$$token" ]; then token=$$($(VENV)/bin/netra token --user "$(NAME)") || exit 2; fi; \
	$(VENV)/bin/netra chat --url ws://$(HOST):$(PORT)/ws --token "$$token"

clean:
	rm -rf $(VENV) data .pytest_cache tests/agui_js/node_modules
