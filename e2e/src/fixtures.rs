//! What tests need without a kubelet or scheduler: a namespace per test, Node
//! objects with addresses and a zone, Pods bound to a Node whose status (phase, IPs,
//! Ready) is set through the status subresource, as a kubelet would.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU32, Ordering},
};

use k8s_openapi::{
    api::core::v1::{
        Container, ContainerPort, Namespace, Node, NodeAddress, NodeCondition, NodeStatus, Pod, PodCondition,
        PodIP, PodSpec, PodStatus,
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{ObjectMeta, Time},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

static NEXT_NAMESPACE: AtomicU32 = AtomicU32::new(0);

/// A namespace of its own for one test. It is left behind when the test ends: the
/// control plane (and everything in it) goes when the test binary exits.
#[derive(Clone)]
pub struct TestNamespace {
    /// The namespace's name.
    pub name: String,
    /// The client that created it.
    pub client: Client,
}

impl TestNamespace {
    /// Creates `<prefix>-<n>` (prefix lower-cased and cut to fit a DNS label).
    pub async fn new(client: &Client, prefix: &str) -> Self {
        let n = NEXT_NAMESPACE.fetch_add(1, Ordering::Relaxed);
        let mut base: String = prefix
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        base.truncate(50);
        let name = format!("{}-{n}", base.trim_matches('-'));
        let ns = Namespace {
            metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        Self { name, client: client.clone() }
    }

    /// A namespaced API in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Creates `obj` in this namespace; panics with the apiserver's message on failure.
    pub async fn create<K>(&self, obj: &K) -> K
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
        <K as Resource>::DynamicType: Default,
    {
        self.api::<K>()
            .create(&PostParams::default(), obj)
            .await
            .unwrap_or_else(|e| panic!("create {:?} in {}: {e}", obj.meta().name, self.name))
    }

    /// Creates a Pod bound to `node` and sets its status: Running with `ips`, Ready as given.
    pub async fn running_pod(&self, pod: Pod, ips: &[&str], ready: bool) -> Pod {
        let name = pod.metadata.name.clone().unwrap_or_default();
        self.create(&pod).await;
        set_pod_status(&self.api(), &name, ips, ready).await
    }

    /// Finishes a Pod's deletion as its kubelet would once containers stopped:
    /// deletes it with grace period 0 (without a kubelet a graceful delete of a
    /// bound Pod never completes).
    pub async fn finish_pod_deletion(&self, name: &str) {
        match self
            .api::<Pod>()
            .delete(name, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => panic!("delete pod {name} now: {e}"),
        }
    }

    /// Deletes a Pod gracefully: it stays, terminating, until
    /// [`TestNamespace::finish_pod_deletion`] (there is no kubelet).
    pub async fn delete_pod(&self, name: &str) {
        self.api::<Pod>()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete pod {name}: {e}"));
    }
}

/// A Pod named `name` with `labels`, bound to `node`, one container `app` with `ports`
/// (`(name, containerPort)`, TCP).
pub fn mk_pod(name: &str, labels: &[(&str, &str)], node: &str, ports: &[(&str, i32)]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_string()),
            containers: vec![Container {
                name: "app".into(),
                image: Some("registry.invalid/app:1".into()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, p)| ContainerPort {
                            name: (!n.is_empty()).then(|| n.to_string()),
                            container_port: *p,
                            protocol: Some("TCP".into()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
}

/// Sets a Pod's status as a kubelet would: phase Running, podIP(s) `ips`, condition
/// Ready = `ready` (an empty `ips` leaves the Pod without an address).
pub async fn set_pod_status(api: &Api<Pod>, name: &str, ips: &[&str], ready: bool) -> Pod {
    let status = pod_status(ips, ready, "Running");
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(json!({ "status": status })))
        .await
        .unwrap_or_else(|e| panic!("patch status of pod {name}: {e}"))
}

/// Sets only the Ready condition (and the matching ContainersReady).
pub async fn set_pod_ready(api: &Api<Pod>, name: &str, ready: bool) -> Pod {
    let pod = api.get_status(name).await.unwrap_or_else(|e| panic!("get pod {name}: {e}"));
    let ips: Vec<String> =
        pod.status.and_then(|s| s.pod_ips).unwrap_or_default().into_iter().map(|ip| ip.ip).collect();
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    set_pod_status(api, name, &ips, ready).await
}

/// Sets the Pod's phase (e.g. "Succeeded", "Failed"), keeping IPs and readiness false.
pub async fn set_pod_phase(api: &Api<Pod>, name: &str, phase: &str) -> Pod {
    let pod = api.get_status(name).await.unwrap_or_else(|e| panic!("get pod {name}: {e}"));
    let ips: Vec<String> =
        pod.status.and_then(|s| s.pod_ips).unwrap_or_default().into_iter().map(|ip| ip.ip).collect();
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    let status = pod_status(&ips, false, phase);
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(json!({ "status": status })))
        .await
        .unwrap_or_else(|e| panic!("patch phase of pod {name}: {e}"))
}

fn pod_status(ips: &[&str], ready: bool, phase: &str) -> PodStatus {
    let now = Time(Timestamp::now());
    let cond = |t: &str| PodCondition {
        type_: t.to_string(),
        status: if ready { "True" } else { "False" }.to_string(),
        last_transition_time: Some(now.clone()),
        ..Default::default()
    };
    PodStatus {
        phase: Some(phase.to_string()),
        pod_ip: ips.first().map(|s| s.to_string()),
        pod_ips: (!ips.is_empty()).then(|| ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect()),
        conditions: Some(vec![
            PodCondition {
                type_: "PodScheduled".into(),
                status: "True".into(),
                last_transition_time: Some(now.clone()),
                ..Default::default()
            },
            cond("ContainersReady"),
            cond("Ready"),
        ]),
        ..Default::default()
    }
}

/// Creates (or leaves) a Node named `name` with an InternalIP and, if given, a zone
/// label, and marks it Ready with 4 allocatable CPUs (topology-mode Auto reads
/// them; kube-controller-manager reads a Node's CPU only when its readiness or
/// zone changes, so it is set together with Ready). Nodes are cluster-wide:
/// tests share them by name.
pub async fn ensure_node(client: &Client, name: &str, internal_ip: &str, zone: Option<&str>) -> Node {
    let api = Api::<Node>::all(client.clone());
    let mut labels = BTreeMap::from([("kubernetes.io/hostname".to_string(), name.to_string())]);
    if let Some(zone) = zone {
        labels.insert("topology.kubernetes.io/zone".into(), zone.to_string());
    }
    let node = Node {
        metadata: ObjectMeta { name: Some(name.to_string()), labels: Some(labels), ..Default::default() },
        ..Default::default()
    };
    match api.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create node {name}: {e}"),
    }
    let cpu = BTreeMap::from([("cpu".to_string(), Quantity(NODE_CPU.into()))]);
    let status = NodeStatus {
        addresses: Some(vec![NodeAddress { type_: "InternalIP".into(), address: internal_ip.to_string() }]),
        allocatable: Some(cpu.clone()),
        capacity: Some(cpu),
        conditions: Some(vec![NodeCondition {
            type_: "Ready".into(),
            status: "True".into(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(json!({ "status": status })))
        .await
        .unwrap_or_else(|e| panic!("patch status of node {name}: {e}"))
}

/// Allocatable CPUs of every Node [`ensure_node`] makes.
pub const NODE_CPU: &str = "4";

/// Labels as a map, for builders.
pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// A Service `name` selecting `selector` (empty: no selector) with `ports`, labelled
/// team=e2e (so label copying shows).
pub fn mk_service(
    name: &str,
    selector: &[(&str, &str)],
    ports: Vec<k8s_openapi::api::core::v1::ServicePort>,
) -> k8s_openapi::api::core::v1::Service {
    use k8s_openapi::api::core::v1::{Service, ServiceSpec};
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels(&[("team", "e2e")])),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: (!selector.is_empty()).then(|| labels(selector)),
            ports: Some(ports),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A TCP Service port; `target` is a number or a container port name.
pub fn mk_port(name: &str, port: i32, target: &str) -> k8s_openapi::api::core::v1::ServicePort {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    k8s_openapi::api::core::v1::ServicePort {
        name: (!name.is_empty()).then(|| name.into()),
        port,
        target_port: Some(match target.parse() {
            Ok(n) => IntOrString::Int(n),
            Err(_) => IntOrString::String(target.into()),
        }),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}
