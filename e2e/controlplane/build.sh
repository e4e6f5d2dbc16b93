#!/usr/bin/env bash
# Builds etcd, kube-apiserver and kube-controller-manager (kube-proxy, kubectl and
# CoreDNS behind flags) for the version pinned in versions.env, from the Go module
# proxy, into ${SVCPLANE_CACHE:-$HOME/.cache/svcplane}/k8s-vX.Y.Z/bin.
#
# Why a wrapper module: k8s.io/kubernetes replaces each k8s.io/<staging> module with
# ./staging/src/..., so `go install ...@version` refuses it. A throwaway module that
# requires k8s.io/kubernetes and replaces each staging module with its published
# v0.Y.Z tag builds it. The replace list is derived from the pinned go.mod.
#
# Idempotent: a binary already in the cache is not rebuilt.
#
# Usage: build.sh [--with-proxy] [--with-kubectl] [--with-coredns] [--with-nodes] [--print-bin-dir]
#   --with-nodes also builds kubelet and kube-scheduler (the real-cluster suite).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"

want_proxy=0 want_kubectl=0 want_coredns=0 want_nodes=0 print_only=0
for arg in "$@"; do
  case "$arg" in
    --with-proxy) want_proxy=1 ;;
    --with-kubectl) want_kubectl=1 ;;
    --with-coredns) want_coredns=1 ;;
    --with-nodes) want_nodes=1 ;;
    --all) want_proxy=1 want_kubectl=1 want_coredns=1 want_nodes=1 ;;
    --print-bin-dir) print_only=1 ;;
    *) echo "build.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

cache=${SVCPLANE_CACHE:-$HOME/.cache/svcplane}
root="$cache/k8s-$KUBERNETES_VERSION"
bin="$root/bin"
if [ "$print_only" = 1 ]; then echo "$bin"; exit 0; fi

log() { printf '[controlplane %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
command -v go >/dev/null || { echo "build.sh: Go is not installed (needed to build the control plane)" >&2; exit 1; }

mkdir -p "$bin"
start=$SECONDS
minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
staging_version="v0.${KUBERNETES_VERSION#v1.}"

export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local
# Go's build cache for these builds is about 5 GB and useless once the binaries
# exist (they are cached by version), so unless the caller chose a GOCACHE it is
# a private one, removed after a successful build. The module cache (the
# downloaded sources, ~2.5 GB) stays where Go keeps it.
private_gocache=0
if [ -z "${GOCACHE:-}" ] && [ "$(go env GOCACHE 2>/dev/null)" = "${XDG_CACHE_HOME:-$HOME/.cache}/go-build" ]; then
  export GOCACHE="$root/go-build-cache"
  private_gocache=1
fi
tags="selinux,notest,grpcnotrace"

# --- kube-apiserver, kube-controller-manager (+ kube-proxy, kubectl) -------------
k8s_cmds=(kube-apiserver kube-controller-manager)
[ "$want_proxy" = 1 ] && k8s_cmds+=(kube-proxy)
[ "$want_kubectl" = 1 ] && k8s_cmds+=(kubectl)
[ "$want_nodes" = 1 ] && k8s_cmds+=(kubelet kube-scheduler)
missing=()
for c in "${k8s_cmds[@]}"; do [ -x "$bin/$c" ] || missing+=("$c"); done

if [ "${#missing[@]}" -gt 0 ]; then
  w="$root/wrapper-k8s"
  mkdir -p "$w"
  log "building ${missing[*]} $KUBERNETES_VERSION in $w (a cold build takes about 5 minutes per 2 cores)"
  (
    cd "$w"
    # tools.go imports every command that may be built, so `go mod tidy` records
    # all of their go.sum entries once (a later kube-proxy build then needs no tidy).
    {
      echo "//go:build tools"
      echo
      echo "package tools"
      echo
      echo "import ("
      for c in kube-apiserver kube-controller-manager kube-proxy kubectl kubelet kube-scheduler; do
        echo "	_ \"k8s.io/kubernetes/cmd/$c\""
      done
      echo ")"
    } > tools.go.new
    # A changed import list needs a new tidy (go.sum entries for the new commands).
    if ! cmp -s tools.go.new tools.go; then rm -f go.sum; fi
    mv tools.go.new tools.go
    if [ ! -f go.sum ] || ! grep -q "k8s.io/kubernetes $KUBERNETES_VERSION" go.mod 2>/dev/null; then
      rm -f go.mod go.sum
      go mod init svcplane.local/k8s-wrapper >/dev/null 2>&1
      gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')
      [ -f "$gomod" ] || { echo "build.sh: could not download k8s.io/kubernetes@$KUBERNETES_VERSION" >&2; exit 1; }
      staging=$(sed -n 's#^[[:space:]]*\(k8s.io/[A-Za-z0-9._-]*\) => ./staging/.*#\1#p' "$gomod" | sort -u)
      [ -n "$staging" ] || { echo "build.sh: no staging replaces found in $gomod" >&2; exit 1; }
      {
        echo
        echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
        echo
        echo "replace ("
        for m in $staging; do echo "	$m => $m $staging_version"; done
        echo ")"
      } >> go.mod
      log "wrapper go.mod: $(echo "$staging" | wc -l) staging replaces derived from $gomod"
      t=$SECONDS; go mod tidy >&2; log "go mod tidy: $((SECONDS - t)) s"
    fi
    pkgs=(); for c in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
    ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION \
-X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
-X k8s.io/component-base/version.gitTreeState=clean \
-X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION \
-X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
    t=$SECONDS
    go build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$bin/.partial/" "${pkgs[@]}"
    for c in "${missing[@]}"; do mv "$bin/.partial/$c" "$bin/$c"; done
    rmdir "$bin/.partial" 2>/dev/null || true
    log "go build ${missing[*]}: $((SECONDS - t)) s"
  )
fi

# --- etcd ------------------------------------------------------------------------
if [ ! -x "$bin/etcd" ]; then
  w="$root/wrapper-etcd"
  mkdir -p "$w"
  log "building etcd $ETCD_VERSION"
  (
    cd "$w"
    printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go
    if [ ! -f go.sum ]; then
      rm -f go.mod
      go mod init svcplane.local/etcd-wrapper >/dev/null 2>&1
      go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2
      go mod tidy >&2
    fi
    t=$SECONDS
    go build -trimpath -ldflags "-s -w" -o "$bin/etcd.partial" go.etcd.io/etcd/server/v3
    mv "$bin/etcd.partial" "$bin/etcd"
    log "go build etcd: $((SECONDS - t)) s"
  )
fi

# --- CoreDNS (for the data-path suite) -------------------------------------------
if [ "$want_coredns" = 1 ] && [ ! -x "$bin/coredns" ]; then
  w="$root/wrapper-coredns"
  mkdir -p "$w"
  log "building coredns $COREDNS_VERSION"
  (
    cd "$w"
    printf '//go:build tools\n\npackage tools\n\nimport _ "github.com/coredns/coredns"\n' > tools.go
    if [ ! -f go.sum ]; then
      rm -f go.mod
      go mod init svcplane.local/coredns-wrapper >/dev/null 2>&1
      go get "github.com/coredns/coredns@$COREDNS_VERSION" >&2
      go mod tidy >&2
    fi
    t=$SECONDS
    go build -trimpath -ldflags "-s -w" -o "$bin/coredns.partial" github.com/coredns/coredns
    mv "$bin/coredns.partial" "$bin/coredns"
    log "go build coredns: $((SECONDS - t)) s"
  )
fi

if [ "$private_gocache" = 1 ] && [ -d "$GOCACHE" ]; then
  rm -rf "$GOCACHE"
fi
log "control plane $KUBERNETES_VERSION ready in $bin ($((SECONDS - start)) s)"
echo "$bin"
