//! What the in-cluster tests run and how they observe it: the test workload
//! (`svcplane-test/testpod:dev`, e2e/src/bin/cluster-testpod.rs) as Deployments,
//! StatefulSets and client Pods pinned to a node, and plain HTTP to Pod IPs from this
//! (root) namespace, which routes to every node's Pod CIDR. Traffic *through a
//! Service* always starts inside a Pod (`/fetch` of a client Pod), where kube-proxy's
//! rules are.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use k8s_openapi::api::{
    apps::v1::{Deployment, StatefulSet},
    core::v1::{Namespace, Pod},
    discovery::v1::EndpointSlice,
};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::wait::eventually;

/// The test workload's image.
pub const TESTPOD_IMAGE: &str = "svcplane-test/testpod:dev";
/// The port it serves on.
pub const TESTPOD_PORT: i32 = 8080;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A namespace of its own for one test, named `<prefix>-<pid>-<n>` so runs against
/// a long-lived cluster (`make cluster`) never meet an earlier run's objects.
pub async fn namespace(client: &kube::Client, prefix: &str) -> String {
    let name = format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let ns: Namespace = from_json(json!({ "metadata": { "name": name } }));
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
    // Pods need the namespace's `default` ServiceAccount, made by
    // kube-controller-manager a moment later.
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), &name);
    eventually("the namespace's default ServiceAccount", Duration::from_secs(30), || async {
        accounts.get("default").await.map(|_| ())
    })
    .await;
    name
}

/// Deserializes a JSON literal into a typed object (panics on a test's typo).
pub fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).unwrap_or_else(|e| panic!("object literal: {e}"))
}

/// The testpod container: named port `http`, readiness from `/healthz` every second.
pub fn testpod_container() -> serde_json::Value {
    json!({
        "name": "app",
        "image": TESTPOD_IMAGE,
        "imagePullPolicy": "Never",
        "env": [{ "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }],
        "ports": [{ "name": "http", "containerPort": TESTPOD_PORT }],
        "readinessProbe": {
            "httpGet": { "path": "/healthz", "port": "http" },
            "periodSeconds": 1,
            "failureThreshold": 1,
            "successThreshold": 1,
        },
    })
}

/// A Deployment of `replicas` testpods labelled `app: NAME`, spread over the nodes
/// (at most one more on any node than on another). `pod_spec` entries are merged in
/// (e.g. `terminationGracePeriodSeconds`, a preStop hook on the container).
pub fn testpod_deployment(name: &str, replicas: i32, container_extra: serde_json::Value) -> Deployment {
    let mut container = testpod_container();
    merge(&mut container, container_extra);
    from_json(json!({
        "metadata": { "name": name },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "topologySpreadConstraints": [{
                        "maxSkew": 1,
                        "topologyKey": "kubernetes.io/hostname",
                        "whenUnsatisfiable": "DoNotSchedule",
                        "labelSelector": { "matchLabels": { "app": name } },
                    }],
                    "containers": [container],
                },
            },
        },
    }))
}

/// A client Pod on `node`, labelled `role: client` (selected by no test Service).
pub fn client_pod(name: &str, node: &str) -> Pod {
    from_json(json!({
        "metadata": { "name": name, "labels": { "role": "client" } },
        "spec": { "nodeName": node, "containers": [testpod_container()] },
    }))
}

/// A headless Service `name` over `app: NAME` port 80 -> `http`, publishing not-ready
/// addresses, and a StatefulSet of `replicas` testpods behind it (Parallel, so a
/// not-ready member does not hold the next back).
pub fn headless_statefulset(name: &str, replicas: i32) -> (k8s_openapi::api::core::v1::Service, StatefulSet) {
    let service = from_json(json!({
        "metadata": { "name": name },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": true,
            "selector": { "app": name },
            "ports": [{ "name": "http", "port": 80, "targetPort": "http" }],
        },
    }));
    let set = from_json(json!({
        "metadata": { "name": name },
        "spec": {
            "serviceName": name,
            "replicas": replicas,
            "podManagementPolicy": "Parallel",
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": { "containers": [testpod_container()] },
            },
        },
    }));
    (service, set)
}

/// A ClusterIP Service `name` over `app: NAME`, port 80 -> `http`.
pub fn cluster_ip_service(name: &str) -> k8s_openapi::api::core::v1::Service {
    from_json(json!({
        "metadata": { "name": name },
        "spec": {
            "selector": { "app": name },
            "ports": [{ "name": "http", "port": 80, "targetPort": "http" }],
        },
    }))
}

fn merge(base: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(base), serde_json::Value::Object(extra)) = (base.as_object_mut(), extra) {
        for (k, v) in extra {
            base.insert(k, v);
        }
    }
}

/// The Running, Ready Pods matching `selector` in `namespace`, once there are `count`.
pub async fn ready_pods(client: &kube::Client, namespace: &str, selector: &str, count: usize) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    eventually(&format!("{count} Ready Pods {selector} in {namespace}"), Duration::from_secs(120), || async {
        let list = pods.list(&ListParams::default().labels(selector)).await.map_err(|e| e.to_string())?;
        let ready: Vec<Pod> = list
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && pod_ready(p))
            .collect();
        if ready.len() == count { Ok(ready) } else { Err(format!("{} Ready", ready.len())) }
    })
    .await
}

/// Whether the Pod's Ready condition is True.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The Pod's IP (panics when it has none).
pub fn pod_ip(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_else(|| panic!("Pod {:?} has no IP", pod.metadata.name))
}

/// The node the Pod runs on.
pub fn pod_node(pod: &Pod) -> String {
    pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default()
}

/// `GET path` on `addr` (HTTP/1.0, one connection): status and body.
pub async fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let exchange = async {
        let mut stream =
            tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| format!("send to {addr}: {e}"))?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.map_err(|e| format!("read from {addr}: {e}"))?;
        let text = String::from_utf8_lossy(&answer).into_owned();
        let (head, body) =
            text.split_once("\r\n\r\n").ok_or_else(|| format!("{addr}: no HTTP answer: {text:?}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{addr}: bad status line {head:?}"))?;
        Ok((status, body.to_string()))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("{addr}{path}: no answer within {timeout:?}"))?
}

/// Makes a testpod's readiness probe fail (`false`) or pass (`true`).
pub async fn set_ready(pod: &Pod, ready: bool) {
    let addr = format!("{}:{TESTPOD_PORT}", pod_ip(pod));
    let (status, body) = http_get(&addr, &format!("/ready?set={ready}"), Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("flip readiness of {:?}: {e}", pod.metadata.name));
    assert_eq!(status, 200, "flip readiness of {:?}: {body}", pod.metadata.name);
}

/// What `count` requests from `client` (a testpod) to `target` got: the answering
/// Pod's name, or why the request failed.
pub async fn fetch_through(client: &Pod, target: &str, count: usize) -> Vec<Result<String, String>> {
    let addr = format!("{}:{TESTPOD_PORT}", pod_ip(client));
    // Each request may take the test pod's connect and answer timeouts (8.5 s).
    let timeout = Duration::from_secs(10 + 9 * count as u64);
    match http_get(&addr, &format!("/fetch?target={target}&count={count}"), timeout).await {
        Ok((200, body)) => body
            .lines()
            .map(|line| match line.split_once(' ') {
                Some(("ok", name)) => Ok(name.to_string()),
                Some((_, why)) => Err(why.to_string()),
                None => Err(line.to_string()),
            })
            .collect(),
        Ok((status, body)) => vec![Err(format!("client answered {status}: {body}"))],
        Err(e) => vec![Err(format!("client {:?} unreachable: {e}", client.metadata.name))],
    }
}

/// The addresses `name` resolves to inside `client` (through the cluster DNS).
pub async fn resolve_in(client: &Pod, name: &str) -> Result<Vec<String>, String> {
    let addr = format!("{}:{TESTPOD_PORT}", pod_ip(client));
    match http_get(&addr, &format!("/resolve?name={name}"), Duration::from_secs(10)).await? {
        (200, body) => Ok(body.lines().map(str::to_string).collect()),
        (status, body) => Err(format!("{status}: {}", body.trim())),
    }
}

/// Each endpoint of Service `service`'s slices (any manager): address -> (ready,
/// serving, terminating).
pub async fn endpoint_conditions(
    client: &kube::Client,
    namespace: &str,
    service: &str,
) -> BTreeMap<String, (bool, bool, bool)> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let list = api
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await
        .unwrap_or_else(|e| panic!("list slices of {service}: {e}"));
    let mut out = BTreeMap::new();
    for slice in list.items {
        for endpoint in slice.endpoints.into_iter().flatten() {
            let c = endpoint.conditions.unwrap_or_default();
            for address in endpoint.addresses {
                out.insert(
                    address,
                    (c.ready.unwrap_or(false), c.serving.unwrap_or(false), c.terminating.unwrap_or(false)),
                );
            }
        }
    }
    out
}

/// Ok when Service `service`'s endpoint for `ip` has conditions (ready, serving,
/// terminating) that `want` accepts, else what it has: a probe for `eventually`.
pub async fn endpoint_is(
    client: &kube::Client,
    namespace: &str,
    service: &str,
    ip: &str,
    want: impl Fn((bool, bool, bool)) -> bool,
) -> Result<(), String> {
    match endpoint_conditions(client, namespace, service).await.get(ip) {
        Some(&conditions) if want(conditions) => Ok(()),
        other => Err(format!("{other:?}")),
    }
}
