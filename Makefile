.PHONY: setup test bench serve clean

PY := .venv/bin/python

setup:
	@scripts/setup.sh

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/tiers.py

clean:
	rm -rf build lmcache_sgl/*.so
