#!/usr/bin/env bash
# Builds the real cluster's images without Docker or a registry, with Debian's umoci and
# skopeo, into docker-archive tarballs that each node's containerd imports (`ctr images
# import`). Called by `make cluster-images`; the harness (e2e/src/cluster) imports them.
#
#   svcplane:dev                       the static musl svcplane, configured as the
#                                      Dockerfile's runtime stage (user, entrypoint, cmd,
#                                      ports are read from the Dockerfile itself)
#   svcplane-test/testpod:dev          e2e/src/bin/cluster-testpod.rs, static: an HTTP
#                                      server with a flippable readiness and a client
#   svcplane-test/coredns:VERSION      the CoreDNS built by e2e/controlplane/build.sh
#   registry.k8s.io/pause:3.10         pause.c, static (containerd's sandbox_image)
#
# Usage: images.sh SVCPLANE_BINARY OUT_DIR
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
svcplane_bin=${1:?usage: images.sh SVCPLANE_BINARY OUT_DIR}
out=${2:?usage: images.sh SVCPLANE_BINARY OUT_DIR}
. "$repo/e2e/controlplane/versions.env"
bin_dir=$(bash "$repo/e2e/controlplane/build.sh" --print-bin-dir)
for tool in umoci skopeo gcc rustc; do
  command -v "$tool" >/dev/null || { echo "images.sh: $tool not found (scripts/setup.sh --with-cluster installs it)" >&2; exit 1; }
done
[ -x "$bin_dir/coredns" ] || { echo "images.sh: $bin_dir/coredns not found: run e2e/controlplane/build.sh --with-coredns" >&2; exit 1; }
file "$svcplane_bin" 2>/dev/null | grep -q 'statically linked\|static-pie' \
  || { echo "images.sh: $svcplane_bin is not a static binary (build it for x86_64-unknown-linux-musl)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out" "$work/rootfs/etc"
log() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# What distroless/static:nonroot provides that these binaries use: the nonroot user.
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$work/rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$work/rootfs/etc/group"

# image NAME:TAG FILE:PATH... -- UMOCI-CONFIG-ARGS...
image() {
  local ref=$1; shift
  local layout="$work/layout" tag=${ref//[\/:]/-}
  [ -d "$layout" ] || umoci init --layout "$layout"
  umoci new --image "$layout:$tag"
  umoci insert --image "$layout:$tag" "$work/rootfs/etc" /etc
  while [ "$1" != -- ]; do
    umoci insert --image "$layout:$tag" "${1%%:*}" "${1#*:}"
    shift
  done
  shift
  umoci config --image "$layout:$tag" --os linux --architecture amd64 "$@"
  skopeo copy --quiet "oci:$layout:$tag" "docker-archive:$out/$tag.tar.partial:$ref"
  mv "$out/$tag.tar.partial" "$out/$tag.tar"
  log "$ref -> $out/$tag.tar"
}

# --- svcplane: user, entrypoint, cmd and ports from the Dockerfile's runtime stage --------
dockerfile="$repo/Dockerfile"
runtime=$(awk '/^FROM /{stage=$0} stage ~ / AS runtime|distroless/ {print}' "$dockerfile")
user=$(sed -n 's/^USER //p' <<<"$runtime" | tail -n1)
ports=$(sed -n 's/^EXPOSE //p' <<<"$runtime" | tail -n1)
json_list() { python3 -c 'import json,sys; print("\n".join(json.loads(sys.argv[1])))' "$1"; }
entrypoint=$(sed -n 's/^ENTRYPOINT //p' <<<"$runtime" | tail -n1)
cmd=$(sed -n 's/^CMD //p' <<<"$runtime" | tail -n1)
[ -n "$user" ] && [ -n "$ports" ] && [ -n "$entrypoint" ] || { echo "images.sh: cannot read USER/EXPOSE/ENTRYPOINT from $dockerfile" >&2; exit 1; }
binary_path=$(json_list "$entrypoint" | head -n1)
config=(--config.user "$user")
while IFS= read -r e; do config+=(--config.entrypoint "$e"); done < <(json_list "$entrypoint")
while IFS= read -r c; do config+=(--config.cmd "$c"); done < <(json_list "$cmd")
for p in $ports; do config+=(--config.exposedports "$p/tcp"); done
image svcplane:dev "$svcplane_bin:$binary_path" -- "${config[@]}"

# --- the test workload ----------------------------------------------------------------
rustc --edition 2024 -C opt-level=2 --target x86_64-unknown-linux-musl \
  -o "$work/testpod" "$repo/e2e/src/bin/cluster-testpod.rs"
image svcplane-test/testpod:dev "$work/testpod:/testpod" -- \
  --config.user 65532:65532 --config.entrypoint /testpod --config.exposedports 8080/tcp

# --- CoreDNS ---------------------------------------------------------------------------
image "svcplane-test/coredns:$COREDNS_VERSION" "$bin_dir/coredns:/coredns" -- \
  --config.user 65532:65532 --config.entrypoint /coredns --config.exposedports 53/udp

# --- pause -----------------------------------------------------------------------------
gcc -static -O2 -o "$work/pause" "$here/pause.c"
image registry.k8s.io/pause:3.10 "$work/pause:/pause" -- --config.user 65535:65535 --config.entrypoint /pause
