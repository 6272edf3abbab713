#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine, from this repo's files:
# system packages (Prometheus for the scrape test), the helm binary, a real Kubernetes control
# plane (tools/install-kube.sh), and a virtual environment in .venv with the project and its
# [dev] extra. Safe to run again.
set -euo pipefail
# Never let the repo root shadow the standard library (operator/ is `tessera.operator`).
export PYTHONSAFEPATH=1
cd "$(dirname "$0")/.."

# Each system package is installed only when its own command is missing. npm comes with Node.js
# where the machine ships one (Debian's npm conflicts with it), so Debian's npm is installed only
# on a machine with neither.
missing=()
command -v prometheus >/dev/null || missing+=(prometheus)
command -v openssl >/dev/null || missing+=(openssl)
command -v npm >/dev/null || command -v node >/dev/null || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "install-dev: missing ${missing[*]}; install them (needs root and apt-get)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v npm >/dev/null; then
  echo "install-dev: node is installed without npm; install the npm that matches it" >&2
  exit 1
fi
bash .ci/install-helm.sh
bash tools/install-kube.sh >/dev/null

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch is pinned to the CPU build that pip finds on this workplace's disk; a bare `torch`
# requirement would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
