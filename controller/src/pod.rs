//! Facts about one Pod the endpoint rules are built from: readiness, phase,
//! termination, its IPs of a family, its hostname and target ports. Whether it is
//! an endpoint is [`crate::eligibility`]'s answer, built from these.
//!
//! Pure: every function reads the objects it is given and nothing else. The rules
//! follow kube-controller-manager v1.37.2 (`k8s.io/endpointslice/util` and
//! `k8s.io/endpointslice/utils.go`); each function names its upstream twin.

use crate::ip::{self, IpFamily};
use crate::stored_pod::{StoredContainer, StoredPod};
use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The protocol the apiserver defaults `ServicePort.protocol` and
/// `ContainerPort.protocol` to; a missing field means this.
pub const DEFAULT_PROTOCOL: &str = "TCP";

/// The `targetRef` an endpoint of `pod` carries: kind Pod, namespace, name, uid.
pub fn pod_reference(pod: &StoredPod) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        kind: Some("Pod".to_owned()),
        namespace: pod.metadata.namespace.clone(),
        name: pod.metadata.name.clone(),
        uid: pod.metadata.uid.clone(),
        ..Default::default()
    }
}

/// True when the Pod's `Ready` condition has status `True` (upstream `IsPodReady`).
pub fn is_pod_ready(pod: &StoredPod) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .and_then(|conditions| conditions.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// True when the Pod has a `deletionTimestamp` (it is shutting down but may still serve).
pub fn is_terminating(pod: &StoredPod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// The Pod's phase, `""` when unset.
pub(crate) fn pod_phase(pod: &StoredPod) -> &str {
    pod.status.as_ref().and_then(|status| status.phase.as_deref()).unwrap_or_default()
}

/// True when the Pod is `Succeeded` or `Failed`: it will never run again.
pub fn is_terminal(pod: &StoredPod) -> bool {
    matches!(pod_phase(pod), "Succeeded" | "Failed")
}

/// True when the Pod has an IP in `status.podIP` or `status.podIPs`.
pub fn has_ip(pod: &StoredPod) -> bool {
    pod.status.as_ref().is_some_and(|status| {
        status.pod_ip.as_deref().is_some_and(|ip| !ip.is_empty())
            || status.pod_ips.as_ref().is_some_and(|ips| !ips.is_empty())
    })
}

/// True when `spec.publishNotReadyAddresses` is set on the Service.
pub fn publishes_not_ready(svc: &Service) -> bool {
    svc.spec.as_ref().and_then(|spec| spec.publish_not_ready_addresses).unwrap_or(false)
}

/// Upstream `ShouldSetHostname`: the endpoint carries `pod.spec.hostname` only when
/// it is set, `pod.spec.subdomain` equals the Service name, and both share a namespace.
pub fn should_set_hostname(pod: &StoredPod, svc: &Service) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    spec.hostname.as_deref().is_some_and(|h| !h.is_empty())
        && spec.subdomain.as_deref().unwrap_or_default() == svc.metadata.name.as_deref().unwrap_or_default()
        && svc.metadata.namespace == pod.metadata.namespace
}

/// Why a Service port's target could not be resolved on a Pod.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// No container (nor sidecar init container) declares a port with this name
    /// and protocol.
    #[error("no container port named {name:?} with protocol {protocol}")]
    NamedPortNotFound {
        /// The Service port's `targetPort` name.
        name: String,
        /// The Service port's protocol (`TCP` when unset).
        protocol: String,
    },
}

/// Upstream `FindPort`: the container port a Service port targets on this Pod.
///
/// An integer `targetPort` is returned verbatim (the Pod need not declare it; an
/// unset one means `port`, the apiserver default). A named one is looked up in
/// `spec.containers[*].ports` with the same protocol, then in sidecar init
/// containers (`restartPolicy: Always`), first match wins.
pub fn find_port(pod: &StoredPod, svc_port: &ServicePort) -> Result<i32, PortError> {
    let name = match &svc_port.target_port {
        None => return Ok(svc_port.port),
        Some(IntOrString::Int(port)) => return Ok(*port),
        Some(IntOrString::String(name)) => name,
    };
    let protocol = svc_port.protocol.as_deref().unwrap_or(DEFAULT_PROTOCOL);
    let declares = |container: &StoredContainer| {
        container.ports.iter().flatten().find_map(|port| {
            let same_name = port.name.as_deref() == Some(name.as_str());
            let same_protocol = port.protocol.as_deref().unwrap_or(DEFAULT_PROTOCOL) == protocol;
            (same_name && same_protocol).then_some(port.container_port)
        })
    };
    let spec = pod.spec.as_ref();
    let containers = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
    let sidecars = spec
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default()
        .iter()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    containers
        .iter()
        .chain(sidecars)
        .find_map(declares)
        .ok_or_else(|| PortError::NamedPortNotFound { name: name.clone(), protocol: protocol.to_owned() })
}

/// The Pod's `status.podIPs` of one family, canonicalised (upstream
/// `getEndpointAddresses`). Only `podIPs` is read, as upstream does; unparseable
/// entries are skipped (the apiserver rejects them, so this only matters in tests).
pub fn pod_ips_of_family(pod: &StoredPod, family: IpFamily) -> Vec<String> {
    pod.status
        .as_ref()
        .and_then(|status| status.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|pod_ip| ip::parse_ip_sloppy(&pod_ip.ip))
        .filter(|ip| IpFamily::of(*ip) == family)
        .map(ip::canonical_ip)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ContainerPort;

    fn mk_pod(ips: &[&str]) -> StoredPod {
        crate::test_pods::web_pod("pod-1", ips)
    }

    use crate::test_pods::web_service as mk_service;

    fn svc_port(svc: &Service) -> &ServicePort {
        &svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0]
    }

    #[test]
    fn named_port_resolves_from_a_container_with_the_same_protocol() {
        let pod = mk_pod(&["10.0.0.1"]);
        let svc = mk_service(IntOrString::String("http".into()), "TCP");
        assert_eq!(find_port(&pod, svc_port(&svc)), Ok(8080));
    }

    #[test]
    fn named_port_with_another_protocol_is_not_found() {
        let pod = mk_pod(&["10.0.0.1"]);
        let svc = mk_service(IntOrString::String("http".into()), "UDP");
        assert_eq!(
            find_port(&pod, svc_port(&svc)),
            Err(PortError::NamedPortNotFound { name: "http".into(), protocol: "UDP".into() })
        );
    }

    #[test]
    fn integer_target_port_is_used_verbatim_and_unset_means_port() {
        let pod = mk_pod(&["10.0.0.1"]);
        let svc = mk_service(IntOrString::Int(9999), "TCP");
        assert_eq!(find_port(&pod, svc_port(&svc)), Ok(9999));
        let mut port = svc_port(&svc).clone();
        port.target_port = None;
        assert_eq!(find_port(&pod, &port), Ok(80));
    }

    #[test]
    fn named_port_resolves_from_sidecars_but_not_plain_init_containers() {
        let mut pod = mk_pod(&["10.0.0.1"]);
        let init = |restart: Option<&str>, port: i32| StoredContainer {
            name: format!("init-{port}"),
            restart_policy: restart.map(str::to_owned),
            ports: Some(vec![ContainerPort {
                name: Some("metrics".into()),
                container_port: port,
                ..Default::default()
            }]),
        };
        pod.spec.as_mut().unwrap().init_containers = Some(vec![init(None, 1111), init(Some("Always"), 2222)]);
        let svc = mk_service(IntOrString::String("metrics".into()), "TCP");
        assert_eq!(find_port(&pod, svc_port(&svc)), Ok(2222));
        pod.spec.as_mut().unwrap().init_containers = Some(vec![init(None, 1111)]);
        assert!(find_port(&pod, svc_port(&svc)).is_err());
    }

    #[test]
    fn irregular_pod_ips_are_canonicalised_like_go() {
        let pod = mk_pod(&["010.001.002.003", "1234::5678:0000:0000:9abc:def0", "::ffff:1.2.3.4"]);
        assert_eq!(pod_ips_of_family(&pod, IpFamily::V4), ["10.1.2.3", "1.2.3.4"]);
        assert_eq!(pod_ips_of_family(&pod, IpFamily::V6), ["1234::5678:0:0:9abc:def0"]);
    }

    #[test]
    fn hostname_only_when_subdomain_is_the_service_name() {
        let mut pod = mk_pod(&["10.0.0.1"]);
        let svc = mk_service(IntOrString::Int(80), "TCP");
        let spec = pod.spec.as_mut().unwrap();
        spec.hostname = Some("h".into());
        spec.subdomain = Some("other".into());
        assert!(!should_set_hostname(&pod, &svc));
        pod.spec.as_mut().unwrap().subdomain = Some("web".into());
        assert!(should_set_hostname(&pod, &svc));
    }
}
