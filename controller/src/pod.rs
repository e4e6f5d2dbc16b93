//! Pod eligibility, readiness, IP-family and target-port rules shared by the
//! EndpointSlice and Endpoints controllers and by `svcplane explain`.
//!
//! Pure: every function reads the objects it is given and nothing else. The rules
//! follow kube-controller-manager v1.37.2 (`k8s.io/endpointslice/util` and
//! `k8s.io/endpointslice/utils.go`); each function names its upstream twin.

use std::fmt;

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
fn pod_phase(pod: &StoredPod) -> &str {
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

/// Upstream `ShouldPodBeInEndpoints`: not terminal, has an IP, and (unless
/// `include_terminating`) not terminating. The EndpointSlice controller passes
/// `true`; the Endpoints controller passes `spec.publishNotReadyAddresses`.
pub fn should_pod_be_in_endpoints(pod: &StoredPod, include_terminating: bool) -> bool {
    !is_terminal(pod) && has_ip(pod) && (include_terminating || !is_terminating(pod))
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

/// Which controller's view an eligibility question is asked for: the rules differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consumer {
    /// EndpointSlices: terminating Pods are published (with conditions), a Pod on
    /// a missing Node is skipped unless `publishNotReadyAddresses`.
    EndpointSlices,
    /// Legacy Endpoints: terminating Pods are dropped unless
    /// `publishNotReadyAddresses`; Nodes are never looked up.
    Endpoints,
}

/// One reason a Pod is not (fully) an endpoint of a Service, for `svcplane explain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exclusion {
    /// The Service has no selector: its endpoints are maintained by hand.
    NoSelector,
    /// The Service is `type: ExternalName`: it has no endpoints.
    ExternalName,
    /// The Pod is in another namespace than the Service.
    OtherNamespace {
        /// The Service's namespace.
        service: String,
        /// The Pod's namespace.
        pod: String,
    },
    /// A selector label is missing on the Pod or has another value.
    SelectorMismatch {
        /// The label key.
        key: String,
        /// The value the selector wants.
        expected: String,
        /// The Pod's value, `None` when the label is absent.
        actual: Option<String>,
    },
    /// The Pod is `Succeeded` or `Failed`.
    Terminal {
        /// The phase.
        phase: String,
    },
    /// The Pod has no IP yet.
    NoIp,
    /// The Pod is terminating and this consumer drops terminating Pods.
    Terminating,
    /// The Pod's Node is not known and `publishNotReadyAddresses` is false: the
    /// EndpointSlice controller skips it and retries the Service.
    NodeMissing {
        /// `spec.nodeName` (empty when unscheduled).
        node: String,
    },
    /// Published, but marked not ready (`ready: false` in a slice,
    /// `notReadyAddresses` in Endpoints): clients do not send it new traffic.
    NotReady,
    /// Published without this Service port: its named `targetPort` is not declared.
    PortNotFound {
        /// The Service port's name (may be empty).
        service_port: String,
        /// What was not found.
        error: PortError,
    },
    /// The Service wants this family and the Pod has no IP of it.
    NoIpOfFamily {
        /// The missing family.
        family: IpFamily,
    },
}

impl Exclusion {
    /// True when the reason keeps the Pod out of every endpoint list; false when it
    /// only degrades it (not ready, a port or a family missing).
    pub fn drops_pod(&self) -> bool {
        !matches!(self, Exclusion::NotReady | Exclusion::PortNotFound { .. } | Exclusion::NoIpOfFamily { .. })
    }
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exclusion::NoSelector => write!(f, "service has no selector"),
            Exclusion::ExternalName => write!(f, "service is of type ExternalName"),
            Exclusion::OtherNamespace { service, pod } => {
                write!(f, "pod is in namespace {pod}, service in {service}")
            }
            Exclusion::SelectorMismatch { key, expected, actual: Some(actual) } => {
                write!(f, "label {key}={actual}, selector wants {expected}")
            }
            Exclusion::SelectorMismatch { key, expected, actual: None } => {
                write!(f, "label {key} missing, selector wants {expected}")
            }
            Exclusion::Terminal { phase } => write!(f, "pod phase is {phase}"),
            Exclusion::NoIp => write!(f, "pod has no IP"),
            Exclusion::Terminating => write!(f, "pod is terminating"),
            Exclusion::NodeMissing { node } => write!(f, "node {node:?} not found"),
            Exclusion::NotReady => write!(f, "pod is not ready (published as not ready)"),
            Exclusion::PortNotFound { service_port, error } => {
                write!(f, "service port {service_port:?} left out: {error}")
            }
            Exclusion::NoIpOfFamily { family } => write!(f, "pod has no {family} address"),
        }
    }
}

/// Every reason `pod` is not, or not fully, an endpoint of `svc` for `consumer`.
/// Empty means a ready endpoint with all ports in every Service family.
///
/// `node_found` answers whether the Pod's Node exists; `None` skips that check
/// (the Endpoints consumer never asks). IP families checked are the Service's
/// `ipFamilies` (none when empty: the legacy fallback differs per consumer).
pub fn endpoint_exclusions(
    svc: &Service,
    pod: &StoredPod,
    consumer: Consumer,
    node_found: Option<bool>,
) -> Vec<Exclusion> {
    let mut reasons = Vec::new();
    let spec = svc.spec.as_ref();
    if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
        reasons.push(Exclusion::ExternalName);
    }
    let pnra = publishes_not_ready(svc);
    match crate::selector::service_selector(svc) {
        None => reasons.push(Exclusion::NoSelector),
        Some(selector) => {
            for (key, expected, actual) in crate::selector::mismatches(selector, pod.metadata.labels.as_ref())
            {
                reasons.push(Exclusion::SelectorMismatch {
                    key: key.to_owned(),
                    expected: expected.to_owned(),
                    actual: actual.map(str::to_owned),
                });
            }
        }
    }
    if svc.metadata.namespace != pod.metadata.namespace {
        reasons.push(Exclusion::OtherNamespace {
            service: svc.metadata.namespace.clone().unwrap_or_default(),
            pod: pod.metadata.namespace.clone().unwrap_or_default(),
        });
    }
    if is_terminal(pod) {
        reasons.push(Exclusion::Terminal { phase: pod_phase(pod).to_owned() });
    }
    if !has_ip(pod) {
        reasons.push(Exclusion::NoIp);
    }
    if consumer == Consumer::Endpoints && is_terminating(pod) && !pnra {
        reasons.push(Exclusion::Terminating);
    }
    if consumer == Consumer::EndpointSlices && node_found == Some(false) && !pnra {
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        reasons.push(Exclusion::NodeMissing { node: node.unwrap_or_default() });
    }
    let ready = match consumer {
        Consumer::EndpointSlices => is_pod_ready(pod) && !is_terminating(pod),
        Consumer::Endpoints => is_pod_ready(pod),
    };
    if !ready && !pnra {
        reasons.push(Exclusion::NotReady);
    }
    for svc_port in spec.and_then(|s| s.ports.as_deref()).unwrap_or_default() {
        if let Err(error) = find_port(pod, svc_port) {
            reasons.push(Exclusion::PortNotFound {
                service_port: svc_port.name.clone().unwrap_or_default(),
                error,
            });
        }
    }
    if has_ip(pod) {
        let families = spec.and_then(|s| s.ip_families.as_deref()).unwrap_or_default();
        for family in families.iter().filter_map(|f| IpFamily::from_name(f)) {
            if pod_ips_of_family(pod, family).is_empty() {
                reasons.push(Exclusion::NoIpOfFamily { family });
            }
        }
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, ServiceSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use std::collections::BTreeMap;

    fn mk_pod(ips: &[&str]) -> StoredPod {
        crate::test_pods::stored(crate::test_pods::TestPod {
            name: "pod-1".into(),
            namespace: "ns",
            uid: None,
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

    fn mk_service(target: IntOrString, protocol: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                selector: Some(BTreeMap::from([("app".into(), "web".into())])),
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
    fn terminal_ipless_and_terminating_pods_follow_should_pod_be_in_endpoints() {
        let mut pod = mk_pod(&["10.0.0.1"]);
        assert!(should_pod_be_in_endpoints(&pod, false));
        pod.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert!(!should_pod_be_in_endpoints(&pod, false));
        assert!(should_pod_be_in_endpoints(&pod, true));
        let mut failed = mk_pod(&["10.0.0.1"]);
        failed.status.as_mut().unwrap().phase = Some("Failed".into());
        assert!(!should_pod_be_in_endpoints(&failed, true));
        let ipless = mk_pod(&[]);
        assert!(!should_pod_be_in_endpoints(&ipless, true));
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

    #[test]
    fn exclusions_list_every_reason() {
        let mut pod = mk_pod(&["fd00::1"]);
        pod.metadata.labels = Some(BTreeMap::from([("app".into(), "db".into())]));
        pod.status.as_mut().unwrap().conditions = None;
        let svc = mk_service(IntOrString::String("grpc".into()), "TCP");
        let reasons = endpoint_exclusions(&svc, &pod, Consumer::EndpointSlices, Some(false));
        assert_eq!(
            reasons,
            vec![
                Exclusion::SelectorMismatch {
                    key: "app".into(),
                    expected: "web".into(),
                    actual: Some("db".into())
                },
                Exclusion::NodeMissing { node: "node-1".into() },
                Exclusion::NotReady,
                Exclusion::PortNotFound {
                    service_port: "http".into(),
                    error: PortError::NamedPortNotFound { name: "grpc".into(), protocol: "TCP".into() }
                },
                Exclusion::NoIpOfFamily { family: IpFamily::V4 },
            ]
        );
        let ok = mk_pod(&["10.0.0.1"]);
        let svc = mk_service(IntOrString::String("http".into()), "TCP");
        assert!(endpoint_exclusions(&svc, &ok, Consumer::Endpoints, None).is_empty());
    }
}
