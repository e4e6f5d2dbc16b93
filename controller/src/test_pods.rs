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

/// A Running, Ready Pod `name` of namespace `ns` labelled app=web on node-1, with
/// container port http=8080 and the given IPs.
pub(crate) fn web_pod(name: &str, ips: &[&str]) -> crate::stored_pod::StoredPod {
    stored(TestPod {
        name: name.into(),
        namespace: "ns",
        uid: Some(format!("uid-{name}")),
        resource_version: None,
        labels: &[("app", "web")],
        node: "node-1",
        container: "main",
        port: ("http", 8080),
        ips: ips.iter().map(|ip| (*ip).to_owned()).collect(),
        phase: "Running",
        ready: true,
    })
}

/// Service ns/web selecting app=web, IPv4 with clusterIP 10.96.0.1, one port
/// "http" 80 with `target` and `protocol`.
pub(crate) fn web_service(
    target: k8s_openapi::apimachinery::pkg::util::intstr::IntOrString,
    protocol: &str,
) -> k8s_openapi::api::core::v1::Service {
    use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
    Service {
        metadata: ObjectMeta { name: Some("web".into()), namespace: Some("ns".into()), ..Default::default() },
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([("app".into(), "web".into())])),
            cluster_ip: Some("10.96.0.1".into()),
            ip_families: Some(vec!["IPv4".into()]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some(protocol.into()),
                target_port: Some(target),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}
