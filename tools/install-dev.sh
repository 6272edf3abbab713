#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine, from this repo's files:
# system packages (Prometheus for the scrape test), the helm binary, and a virtual environment
# in .venv with the project and its [dev] extra. Safe to run again.
set -euo pipefail
# Never let the repo root shadow the standard library (operator/ is `tessera.operator`).
export PYTHONSAFEPATH=1
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! command -v prometheus >/dev/null || ! command -v openssl >/dev/null || ! command -v unzip >/dev/null || ! command -v npm >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      prometheus openssl unzip npm >/dev/null
  fi
fi
bash .ci/install-helm.sh

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch is pinned to the CPU build that pip finds on this workplace's disk; a bare `torch`
# requirement would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
