#!/usr/bin/env bash
# Build apiextensions-apiserver 1.36 (the CustomResourceDefinition server of a current Kubernetes) from the
# Go libraries Debian sid packages (golang-k8s-apiextensions-apiserver-dev and what it depends on) with sid's
# Go, in GOPATH mode, once per machine: tests/test_crd_on_kubernetes_1_36.py serves the operator's CRD with
# it, so its CEL rules are checked by the code that enforces them. Nothing is installed on the system: sid's
# packages are downloaded with a private apt configuration and unpacked under the cache
# (about 320 packages: 310 MB to download, with the build's cache 4 GB on disk while it runs, removed after;
# about 7 to 10 minutes cold on 2 cores), and the binary (75 MB, static) is kept at
#
#   ${SINGULARITY_APIEXTENSIONS_CACHE:-/var/cache/singularity-stack/apiextensions-1.36}/bin/apiextensions-apiserver
#
# Idempotent: when the binary exists and runs (--help; it has no --version), it only prints where it is.
# Set KEEP_BUILD=1 to keep the unpacked packages and the Go build cache after a successful build.
set -euo pipefail

MINOR=1.36
CACHE_DIR=${SINGULARITY_APIEXTENSIONS_CACHE:-/var/cache/singularity-stack/apiextensions-$MINOR}
BIN=$CACHE_DIR/bin/apiextensions-apiserver
APT_DIR=$CACHE_DIR/sid-apt
ROOT=$CACHE_DIR/root
PACKAGE=golang-k8s-apiextensions-apiserver-dev

log() { echo "build-apiextensions-apiserver: $*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

if [[ -x $BIN ]] && "$BIN" --help >/dev/null 2>&1; then
  log "$BIN"
  echo "$BIN"
  exit 0
fi

# sid's package lists in a private apt state (the system's sources and status are left alone).
mkdir -p "$APT_DIR"/{lists/partial,archives/partial,cache}
touch "$APT_DIR/status"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main" \
  >"$APT_DIR/sources.list"
cat >"$APT_DIR/apt.conf" <<EOF
Dir::Etc::SourceList "$APT_DIR/sources.list";
Dir::Etc::SourceParts "/nonexistent";
Dir::State::Lists "$APT_DIR/lists";
Dir::State::status "$APT_DIR/status";
Dir::Cache "$APT_DIR/cache";
Dir::Cache::archives "$APT_DIR/archives";
EOF
export APT_CONFIG=$APT_DIR/apt.conf
log "reading Debian sid's package lists"
apt-get update -qq
version=$(apt-cache show --no-all-versions "$PACKAGE" | awk '/^Version:/ { print $2 }')
[[ $version == 0.${MINOR#1.}.* ]] || die "sid has $PACKAGE $version, not 0.${MINOR#1.}.x"

# Every Go library it needs (Debian's -dev packages hold the sources) and the Go toolchain; the C
# libraries in the dependency closure are not needed for a CGO_ENABLED=0 build.
mapfile -t packages < <(
  apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
    --no-enhances "$PACKAGE" golang-go | grep -E '^golang-' | sort -u
)
rm -rf "$CACHE_DIR/debs" "$ROOT"
mkdir -p "$CACHE_DIR/debs" "$ROOT"
log "downloading $PACKAGE $version and ${#packages[@]} packages it needs"
# (as root, apt cannot drop to _apt for a download into the cache: that warning is expected)
(cd "$CACHE_DIR/debs" && apt-get download -q=2 "${packages[@]}") 2>&1 | { grep -v '^W: Download is performed unsandboxed' >&2 || true; }
for deb in "$CACHE_DIR"/debs/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
gobins=("$ROOT"/usr/lib/go-*/bin/go)
gobin=$(printf '%s\n' "${gobins[@]}" | sort -V | tail -1)
[[ -x $gobin ]] || die "no Go toolchain among the packages"

log "building with $("$gobin" version) in GOPATH mode (about 10 minutes cold)"
mkdir -p "$CACHE_DIR/bin"
# What upstream's make stamps (hack/lib/version.sh), so that /version says 1.36: the library 0.36.x is 1.36.x.
stamp=k8s.io/component-base/version
kube_version=v1.${version#0.}
kube_version=${kube_version%%-*}
ldflags="-s -w -X $stamp.gitVersion=$kube_version -X $stamp.gitMajor=1 -X $stamp.gitMinor=${MINOR#1.}"
ldflags+=" -X $stamp.gitTreeState=clean -X $stamp.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
(
  cd "$CACHE_DIR"
  GOROOT=$(dirname "$(dirname "$gobin")") GOPATH=$ROOT/usr/share/gocode GO111MODULE=off CGO_ENABLED=0 \
    GOCACHE=$CACHE_DIR/gocache nice -n 10 "$gobin" build -trimpath -ldflags "$ldflags" -o "$BIN.new" \
    k8s.io/apiextensions-apiserver
)
"$BIN.new" --help >/dev/null 2>&1 || die "the built binary does not run"
mv "$BIN.new" "$BIN"
if [[ -z ${KEEP_BUILD:-} ]]; then rm -rf "$CACHE_DIR/debs" "$ROOT" "$CACHE_DIR/gocache"; fi
log "$BIN ($kube_version)"
echo "$BIN"
