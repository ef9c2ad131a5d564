#!/usr/bin/env bash
# Build kube-network-policies (Kubernetes SIGs' NetworkPolicy implementation, the one kind runs: a node
# process that queues pods' packets to itself with nfqueue and answers each from the NetworkPolicies), once
# per machine, for the local e2e node (singularity_stack_testing.kube.localnode), whose bridge CNI enforces
# no NetworkPolicy by itself. Built from its source with the Go libraries Debian sid packages and sid's Go,
# in GOPATH mode (as build-apiextensions-apiserver.sh); nothing is installed on the system. Kept at
#
#   ${SINGULARITY_NETWORK_POLICIES_CACHE:-/var/cache/singularity-stack/kube-network-policies-1.1.1}/bin/kube-network-policies
#
# The source: $SINGULARITY_NETWORK_POLICIES_SRC (a checkout of kubernetes-sigs/kube-network-policies at
# v1.1.1), else the Go module proxy (`go mod download`). Two changes are made to it, each checked to apply:
#  - packets are queued with xtables' NFQUEUE target through nft_compat instead of nftables' own `queue`
#    statement, which kernels built without CONFIG_NFT_QUEUE refuse ("Could not process rule: No such file
#    or directory"); the kernel's xt_NFQUEUE queues to the same nfqueue;
#  - Debian's go-nfqueue (2.0) cannot set a conntrack label with a verdict, by which upstream marks the
#    connections it accepted: every established or related connection is accepted instead (its first packet
#    was judged), as a stateful firewall does; run it with --strict-mode=false (a policy changed later does
#    not cut a connection it allowed before).
# Idempotent: when the binary exists and runs (--help), it only prints where it is. KEEP_BUILD=1 keeps the
# unpacked packages and the Go build cache.
set -euo pipefail

VERSION=1.1.1
CACHE_DIR=${SINGULARITY_NETWORK_POLICIES_CACHE:-/var/cache/singularity-stack/kube-network-policies-$VERSION}
BIN=$CACHE_DIR/bin/kube-network-policies
APT_DIR=$CACHE_DIR/sid-apt
ROOT=$CACHE_DIR/root
WORK=$CACHE_DIR/gopath
MODULE=sigs.k8s.io/kube-network-policies
# What its standard build imports, as Debian names the packages (their dependencies come with them).
PACKAGES=(
  golang-go golang-github-containerd-nri-dev golang-github-florianl-go-nfqueue-dev
  golang-github-google-nftables-dev golang-github-mdlayher-netlink-dev golang-github-prometheus-client-golang-dev
  golang-github-vishvananda-netlink-dev golang-github-vishvananda-netns-dev golang-golang-x-sys-dev
  golang-google-protobuf-dev golang-k8s-client-go-dev golang-k8s-component-base-dev
  golang-k8s-component-helpers-dev golang-k8s-klog-dev golang-k8s-utils-dev
)

log() { echo "build-network-policies: $*" >&2; }
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
mapfile -t packages < <(
  apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
    --no-enhances "${PACKAGES[@]}" | grep -E '^golang-' | sort -u
)
rm -rf "$CACHE_DIR/debs" "$ROOT" "$WORK"
mkdir -p "$CACHE_DIR/debs" "$ROOT" "$WORK/src/$MODULE" "$WORK/src/github.com/florianl/go-nfqueue"
log "downloading ${#packages[@]} packages (Go $(apt-cache show --no-all-versions golang-go | awk '/^Version:/ { print $2 }') and the libraries)"
# (as root, apt cannot drop to _apt for a download into the cache: that warning is expected)
(cd "$CACHE_DIR/debs" && apt-get download -q=2 "${packages[@]}") 2>&1 | { grep -v '^W: Download is performed unsandboxed' >&2 || true; }
for deb in "$CACHE_DIR"/debs/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
gobins=("$ROOT"/usr/lib/go-*/bin/go)
gobin=$(printf '%s\n' "${gobins[@]}" | sort -V | tail -1)
[[ -x $gobin ]] || die "no Go toolchain among the packages"
export GOROOT=${gobin%/bin/go} GOTOOLCHAIN=local GOCACHE=$CACHE_DIR/gocache CGO_ENABLED=0

source_dir=${SINGULARITY_NETWORK_POLICIES_SRC:-}
if [[ -z $source_dir ]]; then
  log "fetching $MODULE@v$VERSION from the Go module proxy"
  if ! source_dir=$(GOPATH=$CACHE_DIR/modules GOFLAGS=-modcacherw "$gobin" mod download -json "$MODULE@v$VERSION" |
    python3 -c 'import json, sys; d = json.load(sys.stdin); print(d.get("Dir") or sys.exit(d.get("Error")))'); then
    die "no source for $MODULE v$VERSION: set SINGULARITY_NETWORK_POLICIES_SRC to a checkout of kubernetes-sigs/kube-network-policies at v$VERSION"
  fi
fi
[[ -f $source_dir/cmd/kube-network-policies/standard/main.go ]] ||
  die "$source_dir is not kube-network-policies' source (no cmd/kube-network-policies/standard/main.go)"
cp -r "$source_dir/." "$WORK/src/$MODULE/"
chmod -R u+w "$WORK/src/$MODULE"
rm -rf "$WORK/src/$MODULE/vendor"
# Debian's go-nfqueue is v2 under its v1 path; the source imports .../v2.
ln -s "$ROOT/usr/share/gocode/src/github.com/florianl/go-nfqueue" "$WORK/src/github.com/florianl/go-nfqueue/v2"

log "adapting it to this kernel (xt NFQUEUE) and to Debian's go-nfqueue 2.0"
python3 - "$WORK/src/$MODULE/pkg/dataplane" <<'EOF'
import sys
from pathlib import Path

dataplane = Path(sys.argv[1])
controller = dataplane / "controller.go"
text = controller.read_text()
edits = [
    (
        "\tqueue := &expr.Queue{Num: uint16(c.config.QueueID)}\n\tif c.config.FailOpen {\n"
        "\t\tqueue.Flag = expr.QueueFlagBypass\n\t}\n",
        "\tqueue := xtNfqueue(uint16(c.config.QueueID), c.config.FailOpen)\n",
        2,
    ),
    ("verdictOptions := []nfqueue.VerdictOption{}", "verdictOptions := [][]byte{}", 1),
    (
        "verdictOptions = append(verdictOptions, nfqueue.WithLabel(generateLabelMask(c.config.CTLabelAccept)))",
        "verdictOptions = append(verdictOptions, generateLabelMask(c.config.CTLabelAccept))",
        1,
    ),
    (
        "err = c.nfq.SetVerdictWithOption(*a.PacketID, verdict, verdictOptions...)",
        "_ = verdictOptions // no label set: established connections are accepted below\n"
        "\t\terr = c.nfq.SetVerdict(*a.PacketID, verdict)",
        1,
    ),
    (  # "ct label X ct state established,related accept" without the label
        "\t\t\t&expr.Ct{Register: 0x1, Key: expr.CtKeyLABELS},\n"
        "\t\t\t&expr.Bitwise{SourceRegister: 0x1, DestRegister: 0x1, Len: 16, "
        "Mask: generateLabelMask(c.config.CTLabelAccept), Xor: make([]byte, 16)},\n"
        "\t\t\t&expr.Cmp{Op: expr.CmpOpNeq, Register: 0x1, Data: make([]byte, 16)},\n"
        "\t\t\t&expr.Ct{Register: 0x1, Key: expr.CtKeySTATE},\n",
        "\t\t\t&expr.Ct{Register: 0x1, Key: expr.CtKeySTATE},\n",
        1,
    ),
]
for old, new, count in edits:
    if text.count(old) != count:
        sys.exit(f"build-network-policies: ERROR: {controller} changed: {old.strip()[:60]!r} found {text.count(old)} times, not {count}")
    text = text.replace(old, new)
controller.write_text(text)
(dataplane / "xtqueue.go").write_text('''package dataplane

import (
	"encoding/binary"

	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
)

// xtNfqueue queues to nfqueue num with xtables' NFQUEUE target (through nft_compat), for kernels
// built without nftables' own queue expression (CONFIG_NFT_QUEUE).
func xtNfqueue(num uint16, bypass bool) expr.Any {
	info := make(xt.Unknown, 8) // struct xt_NFQ_info_v3 {u16 queuenum; u16 queues_total; u16 flags;}, aligned
	binary.NativeEndian.PutUint16(info[0:], num)
	binary.NativeEndian.PutUint16(info[2:], 1)
	if bypass {
		binary.NativeEndian.PutUint16(info[4:], 1) // NFQ_FLAG_BYPASS
	}
	return &expr.Target{Name: "NFQUEUE", Rev: 3, Info: &info}
}
''')
EOF

log "building with $("$gobin" version) in GOPATH mode (about 4 minutes cold)"
mkdir -p "$CACHE_DIR/bin"
(
  cd "$WORK"
  GOPATH=$WORK:$ROOT/usr/share/gocode GO111MODULE=off nice -n 10 "$gobin" build -trimpath -ldflags "-s -w" \
    -o "$BIN.new" "$MODULE/cmd/kube-network-policies/standard"
)
"$BIN.new" --help >/dev/null 2>&1 || die "the built binary does not run"
mv "$BIN.new" "$BIN"
if [[ -z ${KEEP_BUILD:-} ]]; then rm -rf "$CACHE_DIR/debs" "$ROOT" "$WORK" "$CACHE_DIR/gocache" "$CACHE_DIR/modules"; fi
log "$BIN (v$VERSION)"
echo "$BIN"
