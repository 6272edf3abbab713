#!/usr/bin/env bash
# Builds a real Kubernetes control plane (kube-apiserver, kube-controller-manager, kube-scheduler)
# for the operator suite, and installs etcd.
#
# Why from source: no registry this project reaches ships these binaries, but Debian bookworm's
# source package `kubernetes` is upstream's full tree with vendor/, and Debian's golang-go (1.19)
# builds it after two fixes, both from Debian's own sources:
#   - vendor/github.com/modern-go/reflect2 1.0.1 panics on any map decode under Go 1.18+: its files
#     are replaced by those of golang-github-modern-go-reflect2-dev (1.0.2);
#   - the OpenAPI type validators treat "" as null under Go 1.19 (`default: ''` is rejected): their
#     null test becomes `data == nil` alone.
# The binaries are cached outside the clone, keyed by the source version and this recipe's
# revision, so CI on the same machine reuses them; a fresh machine builds once (about 8 minutes
# on 2 cores). Prints the folder holding the binaries on its last line; with --bin-dir it only
# prints that folder, or fails when nothing is built.
set -euo pipefail

KUBE_DEB_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
RECIPE_REVISION="1"
CACHE_ROOT="${TESSERA_KUBE_CACHE:-/var/cache/tessera}"
BIN_DIR="$CACHE_ROOT/kubernetes-$KUBE_DEB_VERSION-r$RECIPE_REVISION/bin"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler)

log() { echo "install-kube: $*" >&2; }

have_binaries() {
  for binary in "${BINARIES[@]}"; do
    [ -x "$BIN_DIR/$binary" ] || return 1
  done
}

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if [ "${1:-}" = "--bin-dir" ]; then
  # Only tells where the cached binaries are (for the tests); builds nothing.
  have_binaries || { log "no binaries in $BIN_DIR"; exit 1; }
  echo "$BIN_DIR"
  exit 0
fi

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  if have_binaries && command -v etcd >/dev/null; then
    echo "$BIN_DIR"
    exit 0
  fi
  log "needs root and apt-get to install etcd and build the control plane"
  exit 1
fi

if ! command -v etcd >/dev/null; then
  apt-get update -qq
  apt_install etcd-server
fi

if have_binaries; then
  log "control plane $KUBE_DEB_VERSION cached in $BIN_DIR"
  echo "$BIN_DIR"
  exit 0
fi

# deb-src entries derived from the machine's own Debian sources (deb822 or one-line format).
src_list=/etc/apt/sources.list.d/tessera-deb-src.sources
if [ ! -f "$src_list" ]; then
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources >"$src_list"
  elif [ -f /etc/apt/sources.list ]; then
    grep -E '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' >"${src_list%.sources}.list"
  else
    log "no Debian apt sources found to derive deb-src entries from"
    exit 1
  fi
fi
apt-get update -qq
apt_install dpkg-dev golang-go golang-github-modern-go-reflect2-dev rsync

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log "fetching Debian source package kubernetes=$KUBE_DEB_VERSION"
(cd "$work" && apt-get source -qq "kubernetes=$KUBE_DEB_VERSION" >/dev/null 2>&1)
tree="$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n 1)"
[ -n "$tree" ] || { log "apt-get source produced no tree"; exit 1; }

reflect2_src=/usr/share/gocode/src/github.com/modern-go/reflect2
[ -d "$reflect2_src" ] || { log "$reflect2_src missing"; exit 1; }
rm -rf "$tree/vendor/github.com/modern-go/reflect2"
cp -r "$reflect2_src" "$tree/vendor/github.com/modern-go/reflect2"
rm -rf "$tree/vendor/github.com/modern-go/reflect2/debian"

for validator in vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go \
  vendor/github.com/go-openapi/validate/type.go; do
  file="$tree/$validator"
  [ -f "$file" ] || continue
  before="$(sha256sum "$file")"
  sed -i 's/if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {/if data == nil {/' "$file"
  [ "$before" != "$(sha256sum "$file")" ] || { log "null test not found in $validator"; exit 1; }
done

log "building ${BINARIES[*]} with $(go version | cut -d' ' -f3) (several minutes)"
(
  cd "$tree"
  export CGO_ENABLED=0 GOFLAGS=-mod=vendor GOCACHE="$work/gocache" GOPATH="$work/gopath"
  make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" >"$work/build.log" 2>&1
) || { tail -n 40 "$work/build.log" >&2; log "build failed"; exit 1; }

mkdir -p "$BIN_DIR"
for binary in "${BINARIES[@]}"; do
  built="$(find "$tree/_output" -type f -name "$binary" | head -n 1)"
  [ -n "$built" ] || { log "$binary was not built"; exit 1; }
  install -m 0755 "$built" "$BIN_DIR/$binary"
done
log "installed control plane $KUBE_DEB_VERSION in $BIN_DIR"
echo "$BIN_DIR"
