#!/usr/bin/env bash
# Build the local Kubernetes test bed's binaries from their Go modules, cached by version.
#
#   bash tests/testbed/install.sh            # build what is missing (seconds when cached)
#   QMODEL_TESTBED_CACHE=/some/dir bash ...  # cache somewhere else (default ~/.cache/qmodel-testbed)
#   bash tests/testbed/install.sh --print-bin  # print the bin dir and exit
#
# One wrapper module builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# kubectl and kwok in ONE `go build`, so the packages they share (client-go, apimachinery,
# grpc, ...) compile once. Helm 4.3 needs k8s.io/* v0.37, which the Kubernetes 1.36
# wrapper pins to v0.36, so it gets a module of its own (sharing GOCACHE for the rest).
# k8s.io/kubernetes replaces its staging modules with ./staging paths, which `go install
# pkg@version` refuses; the wrapper replaces each with its published v0.Y.Z twin instead.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
. "$here/versions.env"
cache="${QMODEL_TESTBED_CACHE:-$HOME/.cache/qmodel-testbed}"
key="k8s${K8S_VERSION}-etcd${ETCD_VERSION}-kwok${KWOK_VERSION}-helm${HELM_VERSION}"
root="$cache/$key"
bin="$root/bin"
if [ "${1:-}" = "--print-bin" ]; then echo "$bin"; exit 0; fi

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false"
# Shared with the user's Go cache on purpose: a second key (new versions) reuses what did not change.
export GOCACHE="${GOCACHE:-$(go env GOCACHE)}"
log() { printf '[testbed install %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
need() { command -v "$1" >/dev/null || { log "needs '$1' on PATH: $2"; exit 1; }; }
need go "install Go >= 1.26 (Debian: golang-1.26, or the official tarball)"
need python3 "any Python 3"

version_ldflags() {  # -X flags so /version reports the real version (Helm's kubeVersion checks read it)
  local v=$1 minor=${1#1.}; minor=${minor%%.*}
  local flags="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $p.gitVersion=v$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
  echo "$flags"
}

build_kube() {  # etcd + Kubernetes control plane + kubectl + kwok, one module, one go build
  [ -f "$root/.kube-done" ] && return 0
  local w="$root/src/kube" y="${K8S_VERSION#1.}"
  rm -rf "$w" && mkdir -p "$w" "$bin" && cd "$w"
  go mod init testbed.local/kube >/dev/null 2>&1
  local kmod
  kmod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" \
    | python3 -c 'import json,sys;print(json.load(sys.stdin)["GoMod"])')
  # Every staging module (`=> ./staging/...` or required as v0.0.0) -> its published v0.Y.Z.
  local m
  for m in $(sed -nE 's#^\s*(k8s\.io/[a-z0-9-]+) => \./staging/.*#\1#p; s#^\s*(k8s\.io/[a-z0-9-]+) v0\.0\.0( //.*)?$#\1#p' "$kmod" | sort -u); do
    go mod edit "-replace=$m=$m@v0.$y"
  done
  grep '^godebug' "$kmod" >> go.mod || true   # keep Kubernetes' GODEBUG defaults
  local pkgs=(
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
    go.etcd.io/etcd/server/v3 sigs.k8s.io/kwok/cmd/kwok
  )
  log "resolving modules (k8s $K8S_VERSION, etcd $ETCD_VERSION, kwok $KWOK_VERSION)"
  go get "k8s.io/kubernetes@v$K8S_VERSION" "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" \
    "sigs.k8s.io/kwok@v$KWOK_VERSION" >/dev/null 2>"$w/get.log" || { cat "$w/get.log" >&2; exit 1; }
  log "building ${#pkgs[@]} binaries in one go build (10-20 min cold on 2 cores)"
  go build -trimpath -pgo=off -tags selinux,notest -ldflags "$(version_ldflags "$K8S_VERSION")" \
    -o "$w/out/" "${pkgs[@]}"
  mv "$w/out/server" "$w/out/etcd"   # etcd's main is its module root: go names it after ".../server/v3"
  mv "$w/out/"* "$bin/"
  touch "$root/.kube-done"
}

copy_kwok_stages() {  # kwok's own default stages; the test bed adds its own beside them (kwok.py)
  [ -f "$root/.stages-done" ] && return 0
  local src dst="$root/share/kwok-stages"
  src="$(go env GOMODCACHE)/sigs.k8s.io/kwok@v$KWOK_VERSION/kustomize/stage"
  [ -d "$src" ] || (cd "$(mktemp -d)" && go mod download "sigs.k8s.io/kwok@v$KWOK_VERSION")
  mkdir -p "$dst"
  cp "$src/node/fast/node-initialize.yaml" "$src/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml" \
    "$src/pod/fast/pod-ready.yaml" "$src/pod/fast/pod-complete.yaml" "$src/pod/fast/pod-delete.yaml" "$dst/"
  chmod 644 "$dst"/*.yaml   # the module cache is read-only
  touch "$root/.stages-done"
}

build_helm() {
  [ -f "$root/.helm-done" ] && return 0
  local w="$root/src/helm"
  rm -rf "$w" && mkdir -p "$w" "$bin" && cd "$w"
  go mod init testbed.local/helm >/dev/null 2>&1
  log "building helm $HELM_VERSION"
  go get "helm.sh/helm/v4@v$HELM_VERSION" >/dev/null 2>"$w/get.log" || { cat "$w/get.log" >&2; exit 1; }
  go build -trimpath -pgo=off -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=v$HELM_VERSION" \
    -o "$bin/helm" helm.sh/helm/v4/cmd/helm
  touch "$root/.helm-done"
}

mkdir -p "$cache"
exec 9>"$root.lock" && flock 9   # two test sessions installing at once wait for each other
start=$SECONDS
build_kube
copy_kwok_stages
build_helm
cd "$here" && rm -rf "$root/src"   # the wrapper modules are only needed while building
if [ "$((SECONDS - start))" -gt 2 ]; then
  log "built in $((SECONDS - start)) s: $bin ($(du -sh "$bin" | cut -f1))"
fi
# The S3 server (storage's issue) installs into the same bin dir through its own script.
# Its output goes to stderr: this script's stdout is the bin dir alone.
[ -f "$here/install_s3.sh" ] && QMODEL_TESTBED_BIN="$bin" bash "$here/install_s3.sh" >&2
echo "$bin"
