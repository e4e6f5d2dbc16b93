#!/usr/bin/env bash
# The smoke test of a cluster where svcplane is deployed (manifests/overlays/*) and
# kube-controller-manager's endpoint controllers are off. The same script runs on the
# local real cluster (e2e/tests/cluster.rs) and on kind (e2e/kind/run.sh):
#
#   1. svcplane's Deployment is Available 2/2 and one of its Pods holds the Lease;
#   2. examples/ applied: the web Deployment's Pods become Ready, svcplane (not
#      kube-controller-manager) writes the web Service's EndpointSlice with 3 ready
#      endpoints, and mirrors the selectorless external-db's Endpoints;
#   3. a Service created with kubectl gets its ClusterIP and NodePort from svcplane's
#      webhook (an AllocationClaim names it);
#   4. svcplane's CLI explains the cluster (explain, dns, ipam status).
#
# Usage: smoke.sh KUBECTL SVCPLANE [AGNHOST_STAND_IN]
#   KUBECTL   kubectl command (with --kubeconfig/--context), quoted as one word
#   SVCPLANE  svcplane CLI command (with --kubeconfig), quoted as one word
#   AGNHOST_STAND_IN  image to use instead of examples/' agnhost (no registry here)
set -euo pipefail
cd "$(dirname "$0")/../.."
read -r -a kubectl <<<"${1:?usage: smoke.sh KUBECTL SVCPLANE [AGNHOST_STAND_IN]}"
read -r -a svcplane <<<"${2:?usage: smoke.sh KUBECTL SVCPLANE [AGNHOST_STAND_IN]}"
stand_in=${3:-}
say() { printf '==> %s\n' "$*"; }
fail() { printf 'smoke: %s\n' "$*" >&2; exit 1; }
# Polls "$@" (a command) once a second for up to $within seconds.
within=120
until_ok() { local i; for ((i = 0; i < within; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done; "$@"; }

say "svcplane Available 2/2, a replica holds the Lease"
"${kubectl[@]}" -n svcplane-system rollout status deploy/svcplane --timeout=180s
lease_held_by_replica() {
  local holder pods
  holder=$("${kubectl[@]}" -n svcplane-system get lease svcplane -o jsonpath='{.spec.holderIdentity}')
  pods=$("${kubectl[@]}" -n svcplane-system get pods -l app.kubernetes.io/name=svcplane -o name)
  [[ -n "$holder" ]] && grep -qx "pod/${holder%%_*}" <<<"$pods"
}
until_ok lease_held_by_replica || fail "the Lease is not held by a svcplane replica"

say "examples/: web Pods Ready, slices written by svcplane"
"${kubectl[@]}" delete namespace demo --ignore-not-found --wait=true
if [[ -n "$stand_in" ]]; then
  for f in examples/*.yaml; do printf -- '---\n'; cat "$f"; done \
    | sed "s#registry.k8s.io/e2e-test-images/agnhost:2.53#${stand_in}#" | "${kubectl[@]}" apply -f -
else
  "${kubectl[@]}" apply -f examples/
fi
"${kubectl[@]}" -n demo rollout status deploy/web --timeout=180s
web_published() {
  local ready managed
  managed=$("${kubectl[@]}" -n demo get endpointslices -l kubernetes.io/service-name=web \
    -o jsonpath='{.items[*].metadata.labels.endpointslice\.kubernetes\.io/managed-by}')
  ready=$("${kubectl[@]}" -n demo get endpointslices -l kubernetes.io/service-name=web \
    -o jsonpath='{range .items[*].endpoints[*]}{.conditions.ready}{"\n"}{end}' | grep -c true)
  [[ "$managed" == endpointslice-controller.svcplane.io && "$ready" == 3 ]]
}
until_ok web_published || fail "demo/web has no svcplane EndpointSlice with 3 ready endpoints"
mirrored() {
  "${kubectl[@]}" -n demo get endpointslices -l kubernetes.io/service-name=external-db \
    -o jsonpath='{.items[*].endpoints[*].addresses[*]}' | grep -qx 192.0.2.50
}
until_ok mirrored || fail "demo/external-db's Endpoints were not mirrored"

say "a Service created with kubectl gets its ClusterIP and NodePort from svcplane"
"${kubectl[@]}" -n demo create service nodeport smoke --tcp=80:8080
ip=$("${kubectl[@]}" -n demo get service smoke -o jsonpath='{.spec.clusterIP}')
port=$("${kubectl[@]}" -n demo get service smoke -o jsonpath='{.spec.ports[0].nodePort}')
claims=$("${kubectl[@]}" get allocationclaims -o jsonpath='{range .items[*]}{.spec.value} {.spec.namespace}/{.spec.service}{"\n"}{end}')
grep -qx "$ip demo/smoke" <<<"$claims" || fail "no AllocationClaim for ClusterIP $ip of demo/smoke"
grep -qx "$port demo/smoke" <<<"$claims" || fail "no AllocationClaim for NodePort $port of demo/smoke"

say "svcplane's CLI"
"${svcplane[@]}" explain svc/web -n demo
"${svcplane[@]}" dns svc/zk -n demo
"${svcplane[@]}" ipam status
say "smoke test passed"
