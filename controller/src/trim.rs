//! Trimming of watched objects before they enter a reflector store: only the fields
//! some reconcile or the CLI reads are kept. Pure functions.
//!
//! A Pod from a real cluster carries managedFields, env, volumes, images, probes and
//! container statuses, several KiB that no endpoint controller reads; keeping them
//! is most of upstream's memory.

use k8s_openapi::api::{
    core::v1::{Container, Endpoints, Node, Pod, PodCondition, PodSpec, PodStatus, Service},
    discovery::v1::EndpointSlice,
};

/// Keeps labels, deletionTimestamp, uid, resourceVersion; container and restartable
/// init-container ports; hostname, subdomain, nodeName; phase, podIPs, Ready.
pub fn trim_pod(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    if let Some(spec) = pod.spec.take() {
        let keep_container = |c: Container| Container {
            name: c.name,
            ports: c.ports,
            restart_policy: c.restart_policy,
            ..Default::default()
        };
        pod.spec = Some(PodSpec {
            containers: spec.containers.into_iter().map(keep_container).collect(),
            // Only restartable (sidecar) init containers can serve a named port.
            init_containers: spec.init_containers.map(|cs| {
                cs.into_iter()
                    .filter(|c| c.restart_policy.as_deref() == Some("Always"))
                    .map(keep_container)
                    .collect()
            }),
            hostname: spec.hostname,
            subdomain: spec.subdomain,
            node_name: spec.node_name,
            ..Default::default()
        });
    }
    if let Some(status) = pod.status.take() {
        pod.status = Some(PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            conditions: status.conditions.map(|cs| {
                cs.into_iter()
                    .filter(|c| c.type_ == "Ready")
                    .map(|c| PodCondition {
                        type_: c.type_,
                        status: c.status,
                        last_transition_time: c.last_transition_time,
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        });
    }
}

/// Keeps the name, labels and a zone label only: the planner reads a Node's existence
/// and zone.
pub fn trim_node(node: &mut Node) {
    node.metadata.managed_fields = None;
    node.metadata.annotations = None;
    node.metadata.owner_references = None;
    node.metadata.labels = node
        .metadata
        .labels
        .take()
        .map(|labels| labels.into_iter().filter(|(k, _)| k == "topology.kubernetes.io/zone").collect());
    node.spec = None;
    node.status = None;
}

/// Drops managedFields and the last-applied annotation.
pub fn trim_service(svc: &mut Service) {
    svc.metadata.managed_fields = None;
    if let Some(a) = svc.metadata.annotations.as_mut() {
        a.remove(crate::labels::LAST_APPLIED);
    }
    svc.status = None;
}

/// Drops managedFields (svcplane's own slices are small already).
pub fn trim_slice(slice: &mut EndpointSlice) {
    slice.metadata.managed_fields = None;
}

/// Drops managedFields.
pub fn trim_endpoints(ep: &mut Endpoints) {
    ep.metadata.managed_fields = None;
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ContainerPort, EnvVar, PodIP};

    use super::*;

    #[test]
    fn trimmed_pod_keeps_what_the_planner_reads() {
        let mut pod = Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "app".into(),
                    image: Some("img".into()),
                    env: Some(vec![EnvVar { name: "A".into(), ..Default::default() }]),
                    ports: Some(vec![ContainerPort { container_port: 80, ..Default::default() }]),
                    ..Default::default()
                }],
                init_containers: Some(vec![
                    Container { name: "once".into(), ..Default::default() },
                    Container {
                        name: "sidecar".into(),
                        restart_policy: Some("Always".into()),
                        ..Default::default()
                    },
                ]),
                node_name: Some("n1".into()),
                hostname: Some("h".into()),
                subdomain: Some("s".into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ips: Some(vec![PodIP { ip: "10.0.0.1".into() }]),
                conditions: Some(vec![
                    PodCondition { type_: "Ready".into(), status: "True".into(), ..Default::default() },
                    PodCondition { type_: "Initialized".into(), status: "True".into(), ..Default::default() },
                ]),
                ..Default::default()
            }),
            ..Default::default()
        };
        trim_pod(&mut pod);
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.containers[0].image, None);
        assert_eq!(spec.containers[0].env, None);
        assert_eq!(spec.containers[0].ports.as_ref().unwrap()[0].container_port, 80);
        assert_eq!(spec.init_containers.as_ref().unwrap().len(), 1, "only the restartable init container");
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        assert_eq!((spec.hostname.as_deref(), spec.subdomain.as_deref()), (Some("h"), Some("s")));
        assert!(crate::pod::is_pod_ready(&pod));
        assert_eq!(pod.status.as_ref().unwrap().conditions.as_ref().unwrap().len(), 1);
    }
}
