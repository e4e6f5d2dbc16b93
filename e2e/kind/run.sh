#!/usr/bin/env bash
# Builds the svcplane image, creates a kind cluster without kube-controller-manager's
# endpoint controllers, deploys manifests/overlays/kind and runs a smoke test:
# svcplane becomes ready, writes EndpointSlices for examples/ and its CLI explains them.
#
# Needs docker, kind and kubectl on PATH. Not exercised on the development
# machine (no Docker engine there); see manifests/README.md.
#
#   e2e/kind/run.sh            # build, create, deploy, smoke test (cluster kept)
#   KEEP=0 e2e/kind/run.sh     # delete the cluster at the end
set -euo pipefail

cd "$(dirname "$0")/../.."
CLUSTER=${CLUSTER:-svcplane}
IMAGE=${IMAGE:-svcplane:dev}
KEEP=${KEEP:-1}
KUBECTL=(kubectl --context "kind-${CLUSTER}")

for tool in docker kind kubectl cargo; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool not found on PATH" >&2; exit 1; }
done

echo "==> building ${IMAGE}"
docker build -t "${IMAGE}" .

if ! kind get clusters | grep -qx "${CLUSTER}"; then
  echo "==> creating kind cluster ${CLUSTER}"
  kind create cluster --name "${CLUSTER}" --config e2e/kind/cluster.yaml --wait 120s
fi
[[ "${KEEP}" == 0 ]] && trap 'kind delete cluster --name "${CLUSTER}"' EXIT

echo "==> checking kube-controller-manager's endpoint controllers are off"
"${KUBECTL[@]}" -n kube-system get pod -l component=kube-controller-manager -o yaml \
  | grep -q -- '-endpointslice-controller' \
  || { echo "kube-controller-manager still runs its endpoint controllers" >&2; exit 1; }

echo "==> loading ${IMAGE}"
kind load docker-image "${IMAGE}" --name "${CLUSTER}"

echo "==> deploying manifests/overlays/kind"
"${KUBECTL[@]}" apply --server-side -k manifests/overlays/kind
"${KUBECTL[@]}" -n svcplane-system rollout status deploy/svcplane --timeout=180s

echo "==> smoke test: examples/"
"${KUBECTL[@]}" apply -f examples/
"${KUBECTL[@]}" -n demo rollout status deploy/web --timeout=180s

# svcplane (not kube-controller-manager) wrote the web Service's slices.
for _ in $(seq 60); do
  managed=$("${KUBECTL[@]}" -n demo get endpointslices -l kubernetes.io/service-name=web \
    -o jsonpath='{.items[*].metadata.labels.endpointslice\.kubernetes\.io/managed-by}')
  [[ "${managed}" == *endpointslice-controller.svcplane.io* ]] && break
  sleep 2
done
[[ "${managed}" == *endpointslice-controller.svcplane.io* ]] \
  || { echo "no svcplane EndpointSlice for demo/web (managed-by: ${managed:-none})" >&2; exit 1; }
# The selectorless external-db is mirrored from its hand-written Endpoints.
"${KUBECTL[@]}" -n demo get endpointslices -l kubernetes.io/service-name=external-db -o name | grep -q .

echo "==> CLI against the cluster"
cargo build --locked --bin svcplane
kubeconfig=$(mktemp)
kind get kubeconfig --name "${CLUSTER}" >"${kubeconfig}"
svc=(./target/debug/svcplane --kubeconfig "${kubeconfig}")
"${svc[@]}" explain svc/web -n demo
"${svc[@]}" dns svc/zk -n demo
"${svc[@]}" ipam status
rm -f "${kubeconfig}"
echo "==> kind smoke test passed"
