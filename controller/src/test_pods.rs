//! One Pod builder for the planners' unit tests (compiled for tests only): a Pod
//! bound to a Node, with one container exposing one named TCP port, and a status
//! with IPs, a phase and a Ready condition.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Container, ContainerPort, Pod, PodCondition, PodIP, PodSpec, PodStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

/// What differs between test Pods.
pub(crate) struct TestPod<'a> {
    pub name: String,
    pub namespace: &'a str,
    pub uid: Option<String>,
    pub resource_version: Option<&'a str>,
    pub labels: &'a [(&'a str, &'a str)],
    pub node: &'a str,
    pub container: &'a str,
    pub port: (&'a str, i32),
    pub ips: Vec<String>,
    pub phase: &'a str,
    pub ready: bool,
}

/// Builds the Pod.
pub(crate) fn test_pod(p: TestPod<'_>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(p.name),
            namespace: Some(p.namespace.to_owned()),
            uid: p.uid,
            resource_version: p.resource_version.map(str::to_owned),
            labels: Some(
                p.labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<BTreeMap<_, _>>(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(p.node.to_owned()),
            containers: vec![Container {
                name: p.container.to_owned(),
                ports: Some(vec![ContainerPort {
                    name: Some(p.port.0.to_owned()),
                    container_port: p.port.1,
                    protocol: Some("TCP".to_owned()),
                    ..ContainerPort::default()
                }]),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some(p.phase.to_owned()),
            pod_ip: p.ips.first().cloned(),
            pod_ips: Some(p.ips.into_iter().map(|ip| PodIP { ip }).collect()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".to_owned(),
                status: if p.ready { "True" } else { "False" }.to_owned(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        }),
    }
}

/// Builds the Pod as the store keeps it (what the planners take).
pub(crate) fn stored(p: TestPod<'_>) -> crate::stored_pod::StoredPod {
    crate::stored_pod::StoredPod::from(&test_pod(p))
}
