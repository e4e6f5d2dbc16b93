#!/usr/bin/env bash
# Builds the svcplane image, creates a kind cluster without kube-controller-manager's
# endpoint controllers, deploys manifests/overlays/kind and runs e2e/cluster/smoke.sh,
# the smoke test the local real cluster (make test-cluster) also runs.
#
# Needs docker, kind and kubectl on PATH. It cannot run on the development machine
# (no Docker engine there); the same manifests, image layout and smoke test run on
# the local cluster instead (see manifests/README.md).
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

echo "==> smoke test (the same script the local real cluster's suite runs)"
cargo build --locked --bin svcplane
kubeconfig=$(mktemp)
kind get kubeconfig --name "${CLUSTER}" >"${kubeconfig}"
bash e2e/cluster/smoke.sh "kubectl --kubeconfig ${kubeconfig}" "./target/debug/svcplane --kubeconfig ${kubeconfig}"
rm -f "${kubeconfig}"
echo "==> kind smoke test passed"
