# mesh-llm tasks. `bundle/bootstrap.sh RECIPE` installs everything first on a fresh machine.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv/bin"

# Create .venv and install mesh-llm with its demo and dev extras.
setup:
    bash bundle/bootstrap.sh --version >/dev/null

# Run a solo node on the demo model smollm2-135m (first start: builds llama.cpp, fetches the model).
serve *ARGS:
    {{venv}}/mesh-llm --model smollm2-135m {{ARGS}}

# The whole test suite: unit, integration and end-to-end with real llama.cpp.
test *ARGS:
    {{venv}}/python -m pytest {{ARGS}}

# The tests marked slow (long multi-host scenarios), left out of `just test`.
test-slow *ARGS:
    {{venv}}/python -m pytest -m slow {{ARGS}}

fmt:
    {{venv}}/ruff format mesh_llm tests

lint:
    {{venv}}/ruff check mesh_llm tests

type:
    {{venv}}/mypy

# Format check, lint, types, tests.
check:
    {{venv}}/ruff format --check mesh_llm tests
    {{venv}}/ruff check mesh_llm tests
    {{venv}}/mypy
    {{venv}}/python -m pytest

# One benchmark table (every figure beside its same-run reference and its goal), also written
# to bench.json; ~15 min. `just bench --quick` is a smoke test. Each tests/bench/bench_*.py also
# runs alone (`python -m tests.bench.bench_solo`) with more detail.
bench *ARGS:
    {{venv}}/python -m tests.bench.run {{ARGS}}

# The load test for 30 minutes instead of 60 s: 200 concurrent streams through a client node
# (not in CI; prints requests/s, TTFB p50/p99 and the nodes' RSS before/after).
soak:
    MESH_LLM_SOAK_S=1800 {{venv}}/python -m pytest tests/e2e/test_load.py -s --timeout 2400

# Pack the offline release tarball dist/mesh-llm-<version>-linux-<arch>.tar.gz (--with-demo
# adds the demo model); reuses the cached llama.cpp build.
bundle *ARGS:
    {{venv}}/python bundle/make_bundle.py {{ARGS}}
