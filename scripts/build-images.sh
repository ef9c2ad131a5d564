#!/usr/bin/env bash
# Build the project's two images without Docker, with Debian's buildah (root, native overlay, no daemon):
#
#   singularity-stack:$VERSION            images/Dockerfile (operator and the four services)
#   singularity-stack-postgres:$VERSION   images/postgres/Dockerfile (managed PostgreSQL with pgmq)
#
# No registry is needed: the Debian bookworm base is made here with debootstrap (cached outside the
# checkout) and committed as a local image, passed to both Dockerfiles as --build-arg BASE=...
#
#   scripts/build-images.sh              build (or rebuild from layer cache) both images
#   scripts/build-images.sh OUT_DIR      ... then write OUT_DIR/<name>_<version>.tar (docker-archive),
#                                        for `ctr images import` or `docker load` elsewhere
#
# Idempotent: packages are installed only when missing, the debootstrap tree and the base image are made
# once, and buildah's layer cache makes a rebuild of unchanged images quick. Environment:
#   SINGULARITY_IMAGE_CACHE   cache dir (default /var/cache/singularity-stack): debootstrap tree,
#                             buildah storage, build-time configuration
#   DEBIAN_MIRROR             Debian mirror (default: the one this machine's apt sources use)
#   DEBIAN_SECURITY_MIRROR    (default: the security mirror of this machine's apt sources)
#   REBUILD_BASE=1            debootstrap and commit the base image again
#   NO_CACHE=1                build every step again (e.g. for newer Debian packages), not from layer cache
#   BUILD_CA_BUNDLE           CA bundle mounted read-only into the builds (default: the host's), so pip
#                             and apt trust this machine's TLS; it is never part of an image
#
# Host configuration the builds need (the CA bundle, pip's index, apt's Valid-Until/proxy settings) is
# mounted read-only at /mnt into each RUN step and named by the build args PIP_CONFIG_FILE and APT_CONFIG;
# it is never baked into an image. RUN steps use buildah's chroot isolation (no OCI runtime needed). Smoke-test
# the images with `buildah from` + `buildah run --isolation chroot` using the same CONTAINERS_STORAGE_CONF
# (printed at the end).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."

CACHE_DIR=${SINGULARITY_IMAGE_CACHE:-/var/cache/singularity-stack}
ROOTFS=$CACHE_DIR/debootstrap-bookworm
STORAGE_DIR=$CACHE_DIR/containers
BUILD_CONF_DIR=$CACHE_DIR/build-conf
BUILD_MNT=/mnt
BASE_IMAGE=localhost/singularity-stack-base:bookworm
BUILD_CA_BUNDLE=${BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
SUITE=bookworm
# No OCI runtime (crun/runc): RUN steps use buildah's chroot isolation, which also works where crun refuses
# this machine's hybrid cgroup v1/v2 layout.
PACKAGES=(buildah debootstrap)
# What the base holds beyond debootstrap's minbase (both Dockerfiles install what they use anyway).
BASE_INCLUDE=python3,python3-venv,python3-pip,ca-certificates

log() { echo "build-images: $*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

elapsed() { echo "$((SECONDS - $1))s"; }

project_version() {
  sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1
}


# The first URI of this machine's apt sources whose path ends in $1 (/debian or /debian-security).
host_mirror() {
  local suffix=$1 uri
  uri=$(
    {
      cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs:[[:space:]]*//p' | tr ' ' '\n'
      cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\).*/\2/p'
    } | sed 's:/*$::' | grep -E "^https?://.*${suffix}\$" | head -n 1
  ) || true
  echo "${uri:-http://deb.debian.org${suffix}}"
}

storage_setup() {
  mkdir -p "$STORAGE_DIR"
  cat >"$STORAGE_DIR/storage.conf" <<EOF
# Written by scripts/build-images.sh: buildah's storage for the singularity-stack images.
[storage]
driver = "overlay"
graphroot = "$STORAGE_DIR/storage"
runroot = "$STORAGE_DIR/run"
EOF
  export CONTAINERS_STORAGE_CONF=$STORAGE_DIR/storage.conf
}

# A debuerreotype-like finish, so the base behaves as debian:bookworm-slim does for a Dockerfile: apt keeps
# no .deb files or caches, no docs/man pages/locales, and the same apt sources as the official image.
finish_rootfs() {
  local root=$1 mirror=$2 security_mirror=$3
  rm -f "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/archives/partial/*.deb "$root"/var/cache/apt/*.bin
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/log/bootstrap.log "$root"/var/log/apt/* "$root"/var/log/dpkg.log
  rm -rf "${root:?}"/dev/* "$root"/tmp/* "$root"/var/tmp/*
  rm -f "$root/etc/apt/sources.list"
  cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security_mirror
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
  echo 'Acquire::GzipIndexes "true";' >"$root/etc/apt/apt.conf.d/docker-gzip-indexes"
  echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
# The "slim" variant: files containers don't need are not installed.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
EOF
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$root"/usr/share/{groff,info,linda,locale,man}/* "$root"/usr/share/lintian/overrides/*
}

make_rootfs() {
  local mirror security_mirror start=$SECONDS tmp=$ROOTFS.tmp
  if [[ -f $ROOTFS/.complete && ${REBUILD_BASE:-0} != 1 ]]; then
    log "debootstrap tree: $ROOTFS (cached)"
    return 0
  fi
  mirror=${DEBIAN_MIRROR:-$(host_mirror /debian)}
  security_mirror=${DEBIAN_SECURITY_MIRROR:-$(host_mirror /debian-security)}
  log "debootstrap $SUITE (minbase + $BASE_INCLUDE) from $mirror into $ROOTFS ..."
  rm -rf "$tmp"
  debootstrap --variant=minbase --include="$BASE_INCLUDE" "$SUITE" "$tmp" "$mirror" >"$CACHE_DIR/debootstrap.log" 2>&1 ||
    die "debootstrap failed, see $CACHE_DIR/debootstrap.log"
  finish_rootfs "$tmp" "$mirror" "$security_mirror"
  rm -rf "$ROOTFS"
  mv "$tmp" "$ROOTFS"
  date -u +%Y-%m-%dT%H:%M:%SZ >"$ROOTFS/.complete"
  log "debootstrap tree done in $(elapsed "$start") ($(du -sh "$ROOTFS" | cut -f1))"
}

image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }

make_base_image() {
  local ctr mnt start=$SECONDS
  if image_exists "$BASE_IMAGE" && [[ ${REBUILD_BASE:-0} != 1 ]]; then
    log "base image: $BASE_IMAGE (exists)"
    return 0
  fi
  log "committing $ROOTFS as $BASE_IMAGE ..."
  ctr=$(buildah from --pull=never scratch)
  mnt=$(buildah mount "$ctr")
  # Everything but the cache marker, keeping owners, modes, links and hard links.
  tar -C "$ROOTFS" --exclude=./.complete -cf - . | tar -C "$mnt" -xpf -
  buildah unmount "$ctr" >/dev/null
  buildah config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd bash \
    --label org.opencontainers.image.description="Debian $SUITE minbase (debootstrap) + $BASE_INCLUDE" \
    --label org.opencontainers.image.created="$(cat "$ROOTFS/.complete")" \
    "$ctr"
  buildah commit --rm --quiet "$ctr" "$BASE_IMAGE" >/dev/null
  log "base image $BASE_IMAGE committed in $(elapsed "$start")"
}

# Build-time configuration from this machine, in one directory that every RUN step sees read-only at /mnt
# (an empty directory in Debian's images, so no mount point is left behind in a layer). The Dockerfiles
# read it only through the build args PIP_CONFIG_FILE and APT_CONFIG, which are not kept in the images.
build_conf() {
  local pip_lines=() key value
  rm -rf "$BUILD_CONF_DIR"
  mkdir -p "$BUILD_CONF_DIR"
  # This machine's CA bundle (its TLS to the package registries may present a local CA). Not mounted over
  # the image's /etc/ssl/certs/ca-certificates.crt: an upgrade of ca-certificates in a RUN step rewrites it.
  cp "$BUILD_CA_BUNDLE" "$BUILD_CONF_DIR/ca-certificates.crt"
  # apt: this machine's Valid-Until/Date checks and proxies (e.g. a mirror that serves a dated snapshot).
  {
    echo "Acquire::https::CAInfo \"$BUILD_MNT/ca-certificates.crt\";"
    apt-config dump | grep -E '^Acquire::(Check-Valid-Until|Check-Date|https?::Proxy) ' || true
  } >"$BUILD_CONF_DIR/apt.conf"
  # pip: the CA bundle, and this machine's index (local file:// indexes are not visible inside the build,
  # so they are left out).
  pip_lines=("[global]" "cert = $BUILD_MNT/ca-certificates.crt")
  if python3 -m pip --version >/dev/null 2>&1; then
    while IFS='=' read -r key value; do
      key=${key##*.}
      value=${value#\'}
      value=${value%\'}
      case $key in
        index-url | extra-index-url | trusted-host)
          value=$(tr ' ' '\n' <<<"$value" | { grep -v '^file:' || true; } | tr '\n' ' ' | sed 's/ *$//')
          if [[ -n $value ]]; then pip_lines+=("$key = $value"); fi
          ;;
      esac
    done < <(python3 -m pip config list 2>/dev/null)
  fi
  printf '%s\n' "${pip_lines[@]}" | awk '!seen[$1]++' >"$BUILD_CONF_DIR/pip.conf"
}

build_image() {
  local dockerfile=$1 tag=$2 start=$SECONDS cache=(--layers)
  [[ ${NO_CACHE:-0} != 1 ]] || cache+=(--no-cache)
  log "building $tag from $dockerfile ..."
  buildah bud \
    --pull=never \
    --isolation chroot \
    --network host \
    "${cache[@]}" \
    --build-arg "BASE=$BASE_IMAGE" \
    --build-arg "PIP_CONFIG_FILE=$BUILD_MNT/pip.conf" \
    --build-arg "APT_CONFIG=$BUILD_MNT/apt.conf" \
    -v "$BUILD_CONF_DIR:$BUILD_MNT:ro" \
    -f "$dockerfile" \
    -t "$tag" \
    . >"$CACHE_DIR/build-${tag%%:*}.log" 2>&1 || {
    tail -n 40 "$CACHE_DIR/build-${tag%%:*}.log" >&2
    die "building $tag failed, full log: $CACHE_DIR/build-${tag%%:*}.log"
  }
  log "$tag built in $(elapsed "$start") ($(image_size "$tag"))"
}

image_size() {
  buildah images --format '{{.Size}}' "$1" 2>/dev/null | head -n 1
}

export_image() {
  local tag=$1 out_dir=$2 archive
  archive=$out_dir/${tag//:/_}.tar
  rm -f "$archive"
  buildah push --quiet "$tag" "docker-archive:$archive:$tag" >/dev/null
  log "wrote $archive ($(du -h "$archive" | cut -f1)); load it with: ctr images import $archive"
}

main() {
  local out_dir=${1:-} version app postgres total=$SECONDS
  [[ $# -le 1 ]] || die "usage: $0 [OUTPUT_DIR]"
  [[ $(id -u) -eq 0 ]] || die "run as root (debootstrap and buildah's native overlay storage need it)"
  [[ -r $BUILD_CA_BUNDLE ]] || die "no CA bundle at $BUILD_CA_BUNDLE (set BUILD_CA_BUNDLE)"
  version=$(project_version)
  [[ -n $version ]] || die "no version in pyproject.toml"
  app=singularity-stack:$version
  postgres=singularity-stack-postgres:$version

  install_packages "${PACKAGES[@]}"
  mkdir -p "$CACHE_DIR"
  storage_setup
  make_rootfs
  make_base_image
  build_conf
  build_image images/Dockerfile "$app"
  build_image images/postgres/Dockerfile "$postgres"
  if [[ -n $out_dir ]]; then
    mkdir -p "$out_dir"
    export_image "$app" "$out_dir"
    export_image "$postgres" "$out_dir"
  fi
  log "done in $(elapsed "$total"); images: localhost/$app localhost/$postgres"
  log "try them with: export CONTAINERS_STORAGE_CONF=$CONTAINERS_STORAGE_CONF;" \
    "ctr=\$(buildah from $app); buildah run --isolation chroot \$ctr -- singularity-stack --help"
}

main "$@"
