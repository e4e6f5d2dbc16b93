#!/usr/bin/env bash
# Benchmarks svcplane's ClusterIP allocator (criterion, ipam/benches/) against
# upstream's bitmap allocator (Go, ipam/bench-go/) and prints one table.
#
# The Go side builds in a temporary module whose go.mod/go.sum are copied
# from the control-plane wrapper module of the pinned Kubernetes version
# (made by e2e/controlplane/build.sh, which is run if it is missing), so the
# upstream code is exactly the pinned k8s.io/kubernetes.
#
# Usage: ipam/bench.sh          (about two minutes on 2 cores, warm caches)
# Env:   GO_BENCHTIME (default 200000x) iterations per Go benchmark.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=../e2e/controlplane/versions.env
. "$root/e2e/controlplane/versions.env"
cache=${SVCPLANE_CACHE:-$HOME/.cache/svcplane}
wrapper="$cache/k8s-$KUBERNETES_VERSION/wrapper-k8s"
log() { printf '[bench-ipam %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

command -v go >/dev/null || { echo "bench.sh: Go is needed for the upstream side" >&2; exit 1; }
command -v python3 >/dev/null || { echo "bench.sh: python3 is needed to print the table" >&2; exit 1; }
if [ ! -f "$wrapper/go.mod" ] || [ ! -f "$wrapper/go.sum" ]; then
  log "no wrapper module in $wrapper: running e2e/controlplane/build.sh"
  "$root/e2e/controlplane/build.sh" >&2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/mod"
cp "$wrapper/go.mod" "$wrapper/go.sum" "$here/bench-go/upstream_test.go" "$work/mod/"

log "svcplane: cargo bench -p svcplane-ipam --bench allocator"
(cd "$root" && cargo bench -p svcplane-ipam --bench allocator) >"$work/rust.txt" 2>&1 \
  || { cat "$work/rust.txt" >&2; exit 1; }
target_dir=$(cd "$root" && cargo metadata --format-version 1 --no-deps \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

log "upstream: go test -bench in a temporary module (k8s.io/kubernetes $KUBERNETES_VERSION)"
(
  cd "$work/mod"
  export GOFLAGS=-mod=mod GOTOOLCHAIN=local
  go test -run '^$' -bench 'AllocateNext|ReleaseAllocate' -benchtime "${GO_BENCHTIME:-200000x}" -count 1 .
  go test -run '^$' -bench 'Memory50' -benchtime 1x -count 1 .
) >"$work/go.txt" 2>&1 || { cat "$work/go.txt" >&2; exit 1; }

python3 - "$work/rust.txt" "$work/go.txt" "$target_dir/criterion" "$KUBERNETES_VERSION" <<'PY'
import json, re, sys
rust_out, go_out, crit, version = sys.argv[1:]
go = open(go_out).read()
def go_metric(name, unit):
    m = re.search(rf"^Benchmark{name}(?:-\d+)?\s.*?([\d.e+]+) {re.escape(unit)}", go, re.M)
    return float(m.group(1)) if m else float("nan")
def rust_ns(path):
    with open(f"{crit}/{path}/new/estimates.json") as f:
        return json.load(f)["mean"]["point_estimate"]
heap = re.search(r"svcplane_heap_bytes_50 (\d+)", open(rust_out).read())
rows = [
    ("AllocateNext, /12 0 % full", go_metric("AllocateNext0", "ns/op"), rust_ns("allocate_next/0"), "ns/op"),
    ("AllocateNext, /12 50 % full", go_metric("AllocateNext50", "ns/op"), rust_ns("allocate_next/50"), "ns/op"),
    ("AllocateNext, /12 99 % full", go_metric("AllocateNext99", "ns/op"), rust_ns("allocate_next/99"), "ns/op"),
    ("Release+AllocateNext, /12 50 % full", go_metric("ReleaseAllocate50", "ns/op"), rust_ns("release_allocate/50"), "ns/op"),
    ("Memory per /12 range, 50 % full", go_metric("Memory50", "B/range"), float(heap.group(1)) if heap else float("nan"), "bytes"),
]
print(f"ClusterIP bitmap allocator: upstream k8s.io/kubernetes {version} ipallocator.NewInMemory vs svcplane-ipam ClusterIpAllocator")
print(f"| {'scenario':<38} | {'upstream':>12} | {'svcplane':>12} | {'unit':<6} | {'upstream/svcplane':>17} |")
print(f"|{'-'*40}|{'-'*14}|{'-'*14}|{'-'*8}|{'-'*19}|")
for name, up, us, unit in rows:
    ratio = up / us if us else float("nan")
    print(f"| {name:<38} | {up:>12.1f} | {us:>12.1f} | {unit:<6} | {ratio:>16.1f}x |")
PY
