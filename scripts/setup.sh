#!/usr/bin/env bash
# Installs what `make test` and `make demo` need on a fresh machine, then builds the
# pinned control plane (cached: a warm run does nothing). Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing_debs=()
for tool in make git curl openssl; do command -v "$tool" >/dev/null || missing_debs+=("$tool"); done
command -v cc >/dev/null || missing_debs+=(build-essential)
# The data-path suite (make test-datapath): network namespaces, kube-proxy's nftables
# mode (it runs `nft`, and `iptables` to clean up leftovers) and `dig` for CoreDNS.
command -v ip >/dev/null || missing_debs+=(iproute2)
command -v nft >/dev/null || missing_debs+=(nftables)
command -v iptables >/dev/null || missing_debs+=(iptables)
command -v dig >/dev/null || missing_debs+=(dnsutils)
# The real cluster (make cluster, make test-cluster, make demo): kubelet's runtime,
# CNI plugins, image tools without Docker, a static C compiler for musl (ring) and pause.
command -v containerd >/dev/null || missing_debs+=(containerd)
command -v runc >/dev/null || missing_debs+=(runc)
[ -x /usr/lib/cni/bridge ] || missing_debs+=(containernetworking-plugins)
command -v umoci >/dev/null || missing_debs+=(umoci)
command -v skopeo >/dev/null || missing_debs+=(skopeo)
command -v musl-gcc >/dev/null || missing_debs+=(musl-tools)
command -v conntrack >/dev/null || missing_debs+=(conntrack)
command -v file >/dev/null || missing_debs+=(file)
if [ "${#missing_debs[@]}" -gt 0 ]; then
  say "installing ${missing_debs[*]} with apt-get"
  as_root apt-get update -qq && as_root apt-get install -y -qq "${missing_debs[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found: install Rust with rustup (https://rustup.rs) and re-run" >&2
  exit 1
fi
# rust-toolchain.toml pins the toolchain and its components; this installs them if absent.
rustup show active-toolchain >/dev/null 2>&1 || rustup toolchain install
rustup component add rustfmt clippy >/dev/null 2>&1 || true
# The image's static svcplane (the Dockerfile's target).
rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl \
  || rustup target add x86_64-unknown-linux-musl

if ! command -v go >/dev/null; then
  echo "setup: Go not found: the control plane is built from Go modules; install Go >= 1.25 and re-run" >&2
  exit 1
fi
bash e2e/controlplane/build.sh "$@" >/dev/null
