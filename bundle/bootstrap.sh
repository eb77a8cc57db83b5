#!/usr/bin/env bash
# Set up everything mesh-llm needs on a fresh machine, then run a justfile recipe.
#
#   bundle/bootstrap.sh serve   # install, then run a node on the demo model
#   bundle/bootstrap.sh test    # install, then run the whole test suite
#
# Needs only Python >= 3.11 with venv. Installs the package and its dev/demo extras into .venv
# (the `just` command comes from PyPI's rust-just), and with root on Debian, the build tools
# llama.cpp needs (cmake, g++), for the console tests chromium, and for the multi-host tests
# nftables. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v g++ >/dev/null || need_apt+=(g++)
command -v make >/dev/null || need_apt+=(make)
# patchelf only for `just bundle` (RUNPATH of the shipped libraries): never a reason to stop.
[ "$(id -u)" != 0 ] || command -v patchelf >/dev/null || need_apt+=(patchelf)
if [ "${#need_apt[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing ${need_apt[*]} with apt-get" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "bootstrap: please install ${need_apt[*]} (needed to build llama.cpp once)" >&2
    exit 1
  fi
fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v chromium >/dev/null; then
  echo "bootstrap: installing chromium (console browser tests) with apt-get" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

# nftables: loss, partitions and NAT of the multi-host tier (tests/multihost), run as root.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v nft >/dev/null; then
  echo "bootstrap: installing nftables (multi-host network tests) with apt-get" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.mesh-llm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing mesh-llm and its dependencies into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -e '.[demo,dev]'
  touch "$stamp"
fi

export PATH="$PWD/.venv/bin:$PATH"
exec just "${@:-serve}"
