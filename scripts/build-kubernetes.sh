#!/usr/bin/env bash
# Build Kubernetes 1.20.2 (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy) from
# Debian bookworm's own `kubernetes` source package, in one `make WHAT=...`, once per machine: the API-server
# tier of the operator tests (testing/singularity_stack_testing/kube/apiserver.py) uses the first two, the
# local single-node cluster of the e2e suite (kube/localnode.py beside it) all five. The binaries (about
# 430 MB) are cached outside the checkout:
#
#   ${SINGULARITY_KUBE_CACHE:-/var/cache/singularity-stack/kubernetes-1.20.2}/bin/
#
# Idempotent: when all binaries exist and answer --version, it only makes sure the runtime packages
# (etcd-server) are installed and prints where they are. Set KEEP_BUILD=1 to keep the source tree and Go
# build cache (under the cache dir's build/) after a successful build.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

KUBE_VERSION=1.20.2
CACHE_DIR=${SINGULARITY_KUBE_CACHE:-/var/cache/singularity-stack/kubernetes-$KUBE_VERSION}
BIN_DIR=$CACHE_DIR/bin
BUILD_DIR=$CACHE_DIR/build
PAUSE_VERSION=3.4
COMMANDS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)
# What the control plane needs at run time, and what the build needs on top.
RUNTIME_PACKAGES=(etcd-server openssl)
BUILD_PACKAGES=(dpkg-dev golang-go rsync jq gcc libc6-dev golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev)
DEB_SRC_FILE=/etc/apt/sources.list.d/singularity-stack-deb-src.sources

log() { echo "build-kubernetes: $*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}



# kubectl has no --version flag.
version_of() {
  if [[ $(basename "$1") == kubectl ]]; then "$1" version --client --short; else "$1" --version; fi
}

binaries_ok() {
  local cmd
  for cmd in "${COMMANDS[@]}"; do
    [[ -x $BIN_DIR/$cmd ]] && version_of "$BIN_DIR/$cmd" >/dev/null 2>&1 || return 1
  done
  [[ -x $BIN_DIR/pause ]] && "$BIN_DIR/pause" -v >/dev/null 2>&1
}

report() {
  local cmd
  for cmd in "${COMMANDS[@]}"; do
    log "$cmd: $BIN_DIR/$cmd ($(version_of "$BIN_DIR/$cmd"))"
  done
  log "pause: $BIN_DIR/pause ($("$BIN_DIR/pause" -v 2>&1))"
  echo "$BIN_DIR"
}

have_source_index() {
  apt-cache showsrc kubernetes 2>/dev/null | grep -q "^Version: .*$KUBE_VERSION"
}

# `apt-get source` needs a deb-src line. Rather than edit the system's sources, add our own file that
# mirrors the archive this machine already uses for its release's main component.
ensure_deb_src() {
  have_source_index && return 0
  local codename uri keyring
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  [[ -n $codename ]] || die "cannot tell the Debian release from /etc/os-release"
  uri=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' 'Created-By: Packages' |
    awk -v rel="$codename" '$2 == rel && $3 == "main" { print $1; exit }')
  uri=${uri:-http://deb.debian.org/debian/}
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  log "adding deb-src for $codename main from $uri ($DEB_SRC_FILE)"
  {
    echo "# Added by singularity-stack scripts/build-kubernetes.sh for 'apt-get source kubernetes'."
    echo "Types: deb-src"
    echo "URIs: $uri"
    echo "Suites: $codename"
    echo "Components: main"
    [[ -f $keyring ]] && echo "Signed-By: $keyring"
  } | as_root tee "$DEB_SRC_FILE" >/dev/null
  as_root apt-get update -qq
  have_source_index || die "no kubernetes $KUBE_VERSION source package in $uri $codename main"
}

fetch_source() {
  rm -rf "$BUILD_DIR"
  mkdir -p "$BUILD_DIR"
  log "fetching and unpacking Debian's kubernetes source into $BUILD_DIR"
  (cd "$BUILD_DIR" && apt-get source -qq kubernetes >/dev/null 2>"$BUILD_DIR/apt-get-source.log") ||
    {
      cat "$BUILD_DIR/apt-get-source.log" >&2
      die "apt-get source kubernetes failed"
    }
  local dirs=("$BUILD_DIR"/kubernetes-*/)
  [[ -d ${dirs[0]} ]] || die "no unpacked source tree in $BUILD_DIR"
  SRC_DIR=${dirs[0]%/}
}

# Kubernetes 1.20 vendors modern-go/reflect2 1.0.1 and json-iterator 1.1.10, which crash under Go >= 1.18
# (reflect2's unsafe map iteration) on the first custom-object POST. Debian ships fixed versions as -dev
# packages; swap them in. (Kubernetes 1.20 builds in GOPATH mode, so vendor/modules.txt is not consulted.)
fix_vendor() {
  local module path
  for module in github.com/modern-go/reflect2 github.com/json-iterator/go; do
    path=/usr/share/gocode/src/$module
    [[ -d $path ]] || die "$path missing (Debian golang-github-* -dev package not installed?)"
    log "vendoring $module $(dpkg-query -S "$path" | cut -d: -f1 | xargs dpkg-query -W -f='${Version}') from $path"
    rm -rf "${SRC_DIR:?}/vendor/$module"
    cp -a "$path" "$SRC_DIR/vendor/$module"
    # What `go mod vendor` would have copied: no tests.
    find "$SRC_DIR/vendor/$module" \( -name '*_test.go' -o -name testdata \) -prune -exec rm -rf {} +
  done
}

# Upstream's make, as debian/rules does: it runs the code generators (openapi-gen: the generated OpenAPI
# definitions are not in the source tarball) and stamps the version from the tarball's export-subst data.
build() {
  local cmd out=$CACHE_DIR/bin.new what=()
  for cmd in "${COMMANDS[@]}"; do what+=("cmd/$cmd"); done
  log "building ${COMMANDS[*]} with $(go version | cut -d' ' -f3) (about 5 minutes on a cold cache)"
  (cd "$SRC_DIR" && env CGO_ENABLED=0 HOME="$BUILD_DIR/home" GOCACHE="$BUILD_DIR/gocache" \
    make WHAT="${what[*]}" >"$BUILD_DIR/make.log" 2>&1) || {
    tail -n 60 "$BUILD_DIR/make.log" >&2
    die "make failed (full log: $BUILD_DIR/make.log)"
  }
  rm -rf "$out"
  mkdir -p "$out"
  for cmd in "${COMMANDS[@]}"; do
    cp "$SRC_DIR/_output/bin/$cmd" "$out/$cmd"
    version_of "$out/$cmd" >/dev/null || die "$out/$cmd does not run"
  done
  # The Pod sandbox's pause process, as upstream's build/pause/Makefile compiles it: no registry is needed.
  gcc -Os -Wall -Werror -static -DVERSION="v$PAUSE_VERSION-debian-$KUBE_VERSION" -o "$out/pause" \
    "$SRC_DIR/build/pause/linux/pause.c" || die "compiling the pause binary failed"
  rm -rf "$BIN_DIR"
  mv "$out" "$BIN_DIR"
}

# /var/cache needs root to create; the rest of the build then runs as whoever called us.
ensure_cache_dir() {
  mkdir -p "$CACHE_DIR" 2>/dev/null || as_root install -d -o "$(id -u)" -g "$(id -g)" "$CACHE_DIR"
  [[ -w $CACHE_DIR ]] || die "$CACHE_DIR is not writable (set SINGULARITY_KUBE_CACHE to another directory)"
}

main() {
  install_packages "${RUNTIME_PACKAGES[@]}"
  if binaries_ok; then
    log "already built, nothing to do"
    report
    return 0
  fi
  local started=$SECONDS
  install_packages "${BUILD_PACKAGES[@]}"
  ensure_cache_dir
  ensure_deb_src
  fetch_source
  fix_vendor
  build
  [[ ${KEEP_BUILD:-} == 1 ]] || rm -rf "$BUILD_DIR"
  log "built in $((SECONDS - started)) s"
  report
}

main "$@"
