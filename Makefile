.PHONY: setup lint test bench serve clean

PY := .venv/bin/python

setup:
	@scripts/setup.sh

# ruff (lint, format) and mypy over lmcache_sgl/, configured in pyproject.toml: seconds
lint: setup
	.venv/lint/bin/ruff check lmcache_sgl
	.venv/lint/bin/ruff format --check lmcache_sgl
	.venv/lint/bin/mypy --python-executable $(PY)

test: setup lint
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/tiers.py
	$(PY) bench/ttft.py

# The real SGLang server with --enable-lmcache on the built-in small model (built on
# first use), CPU and disk tiers from configs/serve.yaml; CPU development mode without a GPU.
serve: setup
	.venv/bin/lmcache-sgl serve --preset small --port $(or $(PORT),30000) -- \
		--enable-lmcache --lmcache-config-file configs/serve.yaml --max-total-tokens 65536

clean:
	rm -rf build lmcache_sgl/*.so
