//! The Pod as the controllers keep it in their store: only the fields an endpoint
//! controller reads, deserialized straight from the watch.
//!
//! A Pod from a real cluster carries managedFields, env, volumes, images, probes
//! and container statuses, several KiB that no endpoint controller reads. Why not
//! a trimmed `k8s_openapi` Pod: its structs are sized for every field even when
//! empty (a `Container` is 2.3 KiB, a `Pod` 2.4 KiB), so a trimmed Pod still took
//! about 6 KiB, the largest share of svcplane's memory. A `StoredPod` takes about
//! a third of that, and the store keeps it packed as its JSON
//! ([`crate::packed`]), half again: a sync decodes its members. The planners
//! read `StoredPod` directly; `svcplane explain` and the differential tests list
//! Pods as `StoredPod` too.

use k8s_openapi::{
    api::core::v1::{ContainerPort, Pod, PodIP},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use kube::Resource;
use serde::{Deserialize, Serialize};

/// A Pod with only what the endpoint controllers read.
#[derive(Resource, Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[resource(inherit = Pod)]
pub struct StoredPod {
    /// Metadata (trimmed by [`StoredPod::trim`]).
    pub metadata: ObjectMeta,
    /// Containers, hostname, subdomain, node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<StoredPodSpec>,
    /// Phase, IPs, the Ready condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StoredPodStatus>,
}

/// The part of `spec` kept.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredPodSpec {
    /// Containers: names and ports.
    #[serde(default)]
    pub containers: Vec<StoredContainer>,
    /// Restartable (sidecar) init containers only, after [`StoredPod::trim`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_containers: Option<Vec<StoredContainer>>,
    /// `spec.hostname`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// `spec.subdomain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subdomain: Option<String>,
    /// `spec.nodeName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

/// A container's name, ports and restart policy (sidecars have `Always`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredContainer {
    /// Name.
    pub name: String,
    /// Ports (named target ports resolve against them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<ContainerPort>>,
    /// `Always` for a sidecar init container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<String>,
}

/// The part of `status` kept.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredPodStatus {
    /// `status.phase`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// `status.podIP`.
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    /// `status.podIPs`.
    #[serde(default, rename = "podIPs", skip_serializing_if = "Option::is_none")]
    pub pod_ips: Option<Vec<PodIP>>,
    /// Conditions; only Ready after [`StoredPod::trim`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<StoredCondition>>,
}

/// A condition's type, status and transition time.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredCondition {
    /// Condition type.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// When it last changed (the endpoints' trigger time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
}

impl StoredPod {
    /// Drops what no controller reads and the watch still delivered: metadata
    /// other than identity, labels and deletion, plain init containers, and
    /// conditions other than Ready. Kept as the watch stream's `modify` step.
    pub fn trim(&mut self) {
        let meta = &mut self.metadata;
        meta.managed_fields = None;
        meta.annotations = None;
        meta.owner_references = None;
        meta.finalizers = None;
        if let Some(spec) = self.spec.as_mut()
            && let Some(init) = spec.init_containers.as_mut()
        {
            init.retain(|c| c.restart_policy.as_deref() == Some("Always"));
        }
        if let Some(conditions) = self.status.as_mut().and_then(|s| s.conditions.as_mut()) {
            conditions.retain(|c| c.type_ == "Ready");
        }
    }
}

/// A full `k8s_openapi` Pod, as the planners' unit tests build them, as the store
/// would keep it: the same fields the watch's deserialization keeps, then
/// [`StoredPod::trim`].
#[cfg(test)]
impl From<&Pod> for StoredPod {
    fn from(pod: &Pod) -> Self {
        let container = |c: &k8s_openapi::api::core::v1::Container| StoredContainer {
            name: c.name.clone(),
            ports: c.ports.clone(),
            restart_policy: c.restart_policy.clone(),
        };
        let mut stored = StoredPod {
            metadata: pod.metadata.clone(),
            spec: pod.spec.as_ref().map(|s| StoredPodSpec {
                containers: s.containers.iter().map(container).collect(),
                init_containers: s.init_containers.as_ref().map(|cs| cs.iter().map(container).collect()),
                hostname: s.hostname.clone(),
                subdomain: s.subdomain.clone(),
                node_name: s.node_name.clone(),
            }),
            status: pod.status.as_ref().map(|s| StoredPodStatus {
                phase: s.phase.clone(),
                pod_ip: s.pod_ip.clone(),
                pod_ips: s.pod_ips.clone(),
                conditions: s.conditions.as_ref().map(|cs| {
                    cs.iter()
                        .map(|c| StoredCondition {
                            type_: c.type_.clone(),
                            status: c.status.clone(),
                            last_transition_time: c.last_transition_time.clone(),
                        })
                        .collect()
                }),
            }),
        };
        stored.trim();
        stored
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Pod as a real cluster sends it, with much that no controller reads.
    fn full_pod() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web-0", "namespace": "shop", "uid": "u-1", "resourceVersion": "42",
                "labels": {"app": "web"},
                "annotations": {"note": "x"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web", "uid": "u-2"}],
                "finalizers": ["f"],
                "deletionTimestamp": "2026-01-01T00:00:00Z",
                "managedFields": [{"manager": "kubelet", "operation": "Update"}]
            },
            "spec": {
                "containers": [{
                    "name": "app", "image": "img", "env": [{"name": "A", "value": "1"}],
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
                }],
                "initContainers": [
                    {"name": "once", "image": "i", "ports": [{"name": "x", "containerPort": 1}]},
                    {"name": "sidecar", "image": "p", "restartPolicy": "Always",
                     "ports": [{"name": "proxy", "containerPort": 15001}]}
                ],
                "hostname": "web-0", "subdomain": "web", "nodeName": "node-a",
                "volumes": [{"name": "v", "emptyDir": {}}]
            },
            "status": {
                "phase": "Running", "podIP": "10.0.0.1",
                "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}],
                "hostIP": "192.0.2.1",
                "conditions": [
                    {"type": "Initialized", "status": "True"},
                    {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z",
                     "reason": "r", "message": "m"}
                ],
                "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "img", "imageID": "", "started": true, "state": {}}]
            }
        })
    }

    #[test]
    fn stored_pod_keeps_what_the_planner_reads() {
        let mut pod: StoredPod = serde_json::from_value(full_pod()).expect("stored pod");
        pod.trim();
        let meta = &pod.metadata;
        assert_eq!((meta.name.as_deref(), meta.uid.as_deref()), (Some("web-0"), Some("u-1")));
        assert_eq!(meta.resource_version.as_deref(), Some("42"));
        assert!(meta.labels.as_ref().is_some_and(|l| l["app"] == "web"));
        assert!(crate::pod::is_terminating(&pod));
        assert_eq!(
            (&meta.annotations, &meta.owner_references, &meta.finalizers, &meta.managed_fields),
            (&None, &None, &None, &None)
        );
        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(spec.containers[0].ports.as_ref().expect("ports")[0].container_port, 8080);
        let init = spec.init_containers.as_ref().expect("init containers");
        assert_eq!(init.len(), 1, "only the restartable init container");
        assert_eq!(init[0].ports.as_ref().expect("ports")[0].container_port, 15001);
        assert_eq!(spec.node_name.as_deref(), Some("node-a"));
        assert_eq!((spec.hostname.as_deref(), spec.subdomain.as_deref()), (Some("web-0"), Some("web")));
        let status = pod.status.as_ref().expect("status");
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ips.as_ref().map(Vec::len), Some(2));
        assert!(crate::pod::is_pod_ready(&pod));
        let conditions = status.conditions.as_ref().expect("conditions");
        assert_eq!(conditions.len(), 1, "only Ready");
        assert!(conditions[0].last_transition_time.is_some(), "the trigger time source");
    }

    #[test]
    fn a_packed_pod_unpacks_to_what_the_watch_stored_before_packing() {
        let packed: crate::packed::Packed<StoredPod> = serde_json::from_value(full_pod()).expect("packs");
        let mut watched: StoredPod = serde_json::from_value(full_pod()).expect("stored pod");
        watched.trim();
        assert_eq!(packed.unpack(), watched);
    }

    #[test]
    fn a_full_pod_converts_to_what_the_watch_stores() {
        let mut watched: StoredPod = serde_json::from_value(full_pod()).expect("stored pod");
        watched.trim();
        let full: Pod = serde_json::from_value(full_pod()).expect("pod");
        assert_eq!(StoredPod::from(&full), watched);
    }

    #[test]
    fn a_pod_without_spec_or_status_converts() {
        let stored = StoredPod::from(&Pod {
            metadata: ObjectMeta { name: Some("p".into()), ..Default::default() },
            ..Default::default()
        });
        assert_eq!((stored.metadata.name.as_deref(), stored.spec, stored.status), (Some("p"), None, None));
    }
}
