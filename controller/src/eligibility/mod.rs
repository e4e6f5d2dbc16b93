//! Whether, and how, a Pod is an endpoint of a Service: one function per consumer
//! (EndpointSlices, Endpoints) that the planners build endpoints from and
//! `svcplane explain` and the `NoReadyEndpoints` Event print, so they cannot
//! disagree. Pure.
//!
//! Upstream: the Pod loops of `reconcileByAddressType` and `podToEndpoint`
//! (`k8s.io/endpointslice`), and of `syncService` and
//! `podToEndpointAddressForService` (`pkg/controller/endpoint`).

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::Service;

use crate::endpointslice::{NodeInfo, NodeLookup, service_address_families};
use crate::ip::{self, IpFamily};
use crate::pod::{
    PortError, find_port, has_ip, is_pod_ready, is_terminal, is_terminating, pod_ips_of_family, pod_phase,
    publishes_not_ready,
};
use crate::selector;
use crate::stored_pod::StoredPod;

/// One reason a Pod is not (fully) an endpoint of a Service.
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
    /// The Pod has IPs, but none of a family the Service gets endpoints for.
    NoUsableIp,
    /// No Service port resolves on the Pod: the Endpoints controller leaves it out.
    NoPortResolved,
    /// The Service has no ports and is not headless: the Endpoints controller
    /// publishes no address for it.
    NoServicePorts,
}

impl Exclusion {
    /// True when the reason keeps the Pod out of the endpoint list; false when it
    /// only degrades it (not ready, a port or a family missing).
    pub fn drops_pod(&self) -> bool {
        !matches!(self, Exclusion::NotReady | Exclusion::PortNotFound { .. } | Exclusion::NoIpOfFamily { .. })
    }

    /// A fixed name, for `-o json` and scripts.
    pub fn name(&self) -> &'static str {
        match self {
            Exclusion::NoSelector => "NoSelector",
            Exclusion::ExternalName => "ExternalName",
            Exclusion::OtherNamespace { .. } => "OtherNamespace",
            Exclusion::SelectorMismatch { .. } => "SelectorMismatch",
            Exclusion::Terminal { .. } => "Terminal",
            Exclusion::NoIp => "NoIP",
            Exclusion::Terminating => "Terminating",
            Exclusion::NodeMissing { .. } => "NodeMissing",
            Exclusion::NotReady => "NotReady",
            Exclusion::PortNotFound { .. } => "PortNotFound",
            Exclusion::NoIpOfFamily { .. } => "NoIPOfFamily",
            Exclusion::NoUsableIp => "NoUsableIP",
            Exclusion::NoPortResolved => "NoPortResolved",
            Exclusion::NoServicePorts => "NoServicePorts",
        }
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
            Exclusion::NoUsableIp => write!(f, "pod has no IP of a family the service uses"),
            Exclusion::NoPortResolved => write!(f, "no service port resolves on the pod"),
            Exclusion::NoServicePorts => write!(f, "service has no ports and is not headless"),
        }
    }
}

/// A Pod's standing, the short form of its reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Standing {
    /// A ready endpoint with every port and family.
    Ready,
    /// Published, but not ready: it gets no new traffic.
    NotReady,
    /// Published, but without some port or IP family.
    Partial,
    /// Not an endpoint at all.
    Excluded,
}

impl Standing {
    /// The `kubectl`-style spelling: `ready`, `not-ready`, `partial`, `excluded`.
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::Ready => "ready",
            Standing::NotReady => "not-ready",
            Standing::Partial => "partial",
            Standing::Excluded => "excluded",
        }
    }
}

/// An endpoint's conditions (upstream `EndpointConditions`; Endpoints use `ready`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conditions {
    /// Receives new traffic.
    pub ready: bool,
    /// The Pod's `Ready` condition, terminating or not.
    pub serving: bool,
    /// The Pod has a `deletionTimestamp`.
    pub terminating: bool,
}

/// A Pod's standing as an endpoint of a Service, for one consumer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Eligibility {
    /// Every reason it is not, or not fully, an endpoint, in a fixed order.
    pub reasons: Vec<Exclusion>,
    /// Selected, not terminal, with an IP (and, for Endpoints, not dropped as
    /// terminating): upstream resolves its ports, and the EndpointSlice controller
    /// creates its port group even if the Pod then yields no endpoint.
    pub candidate: bool,
    /// The endpoint's conditions.
    pub conditions: Conditions,
    /// The target port of each Service port in spec order, `None` where a named
    /// `targetPort` is not declared.
    pub ports: Vec<Option<i32>>,
    /// The canonical addresses published, by family; empty when not an endpoint.
    pub addresses: BTreeMap<IpFamily, Vec<String>>,
}

impl Eligibility {
    /// True when no reason drops the Pod: it is published.
    pub fn is_endpoint(&self) -> bool {
        !self.reasons.iter().any(Exclusion::drops_pod)
    }

    /// The short form of the reasons.
    pub fn standing(&self) -> Standing {
        if self.reasons.is_empty() {
            Standing::Ready
        } else if !self.is_endpoint() {
            Standing::Excluded
        } else if self.reasons.iter().all(|r| *r == Exclusion::NotReady) {
            Standing::NotReady
        } else {
            Standing::Partial
        }
    }

    /// Published, ready, and reachable on some port (or the Service has none):
    /// what `NoReadyEndpoints` counts as a ready endpoint.
    pub fn serves(&self) -> bool {
        self.is_endpoint()
            && self.conditions.ready
            && (self.ports.is_empty() || self.ports.iter().any(Option::is_some))
    }
}

/// The reasons every consumer shares: the Service selects the Pod, and the Pod is
/// not terminal and has an IP (upstream `ShouldPodBeInEndpoints` but terminating).
fn shared_reasons(svc: &Service, pod: &StoredPod) -> Vec<Exclusion> {
    let mut reasons = Vec::new();
    if selector::is_external_name(svc) {
        reasons.push(Exclusion::ExternalName);
    }
    match selector::service_selector(svc) {
        None => reasons.push(Exclusion::NoSelector),
        Some(selector) => {
            for (key, expected, actual) in selector::mismatches(selector, pod.metadata.labels.as_ref()) {
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
    reasons
}

/// Resolves every Service port on the Pod (upstream `FindPort` per port), adding
/// a [`Exclusion::PortNotFound`] for each that fails.
fn resolve_ports(svc: &Service, pod: &StoredPod, reasons: &mut Vec<Exclusion>) -> Vec<Option<i32>> {
    let svc_ports = svc.spec.as_ref().and_then(|s| s.ports.as_deref()).unwrap_or_default();
    svc_ports
        .iter()
        .map(|svc_port| match find_port(pod, svc_port) {
            Ok(port) => Some(port),
            Err(error) => {
                let service_port = svc_port.name.clone().unwrap_or_default();
                reasons.push(Exclusion::PortNotFound { service_port, error });
                None
            }
        })
        .collect()
}

/// The Pod as an EndpointSlice endpoint (upstream `reconcileByAddressType`'s loop
/// and `podToEndpoint`). `node_found` says whether its Node exists.
///
/// Terminating Pods stay, never ready unless `publishNotReadyAddresses` (then
/// always ready, kubernetes#116285). A Pod on a missing Node is left out unless
/// `publishNotReadyAddresses`. One endpoint per Service family the Pod has an
/// IP of; a Pod whose named ports do not resolve is published without them.
pub fn for_slices(svc: &Service, pod: &StoredPod, node_found: bool) -> Eligibility {
    let mut reasons = shared_reasons(svc, pod);
    let candidate = reasons.is_empty();
    let pnra = publishes_not_ready(svc);
    if candidate && !node_found && !pnra {
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        reasons.push(Exclusion::NodeMissing { node: node.unwrap_or_default() });
    }
    let (serving, terminating) = (is_pod_ready(pod), is_terminating(pod));
    let conditions = Conditions { ready: pnra || (serving && !terminating), serving, terminating };
    if !conditions.ready {
        reasons.push(Exclusion::NotReady);
    }
    let ports = resolve_ports(svc, pod, &mut reasons);
    let mut addresses = BTreeMap::new();
    if has_ip(pod) {
        for family in service_address_families(svc) {
            let ips = pod_ips_of_family(pod, family);
            if ips.is_empty() {
                reasons.push(Exclusion::NoIpOfFamily { family });
            } else {
                addresses.insert(family, ips);
            }
        }
        if addresses.is_empty() {
            reasons.push(Exclusion::NoUsableIp);
        }
    }
    let mut eligibility = Eligibility { reasons, candidate, conditions, ports, addresses };
    if !eligibility.is_endpoint() {
        eligibility.addresses.clear();
    }
    eligibility
}

/// The Pod as an address of the legacy Endpoints object (upstream `syncService`'s
/// loop and `podToEndpointAddressForService`).
///
/// Terminating Pods are dropped unless `publishNotReadyAddresses`; Nodes are not
/// looked up. The one address is the first Pod IP of the Service's primary
/// family. A port whose named target is not declared is left out for this Pod;
/// with none left, or a Service without ports that is not headless, the Pod is.
pub fn for_endpoints(svc: &Service, pod: &StoredPod) -> Eligibility {
    let mut reasons = shared_reasons(svc, pod);
    let pnra = publishes_not_ready(svc);
    let terminating = is_terminating(pod);
    if terminating && !pnra {
        reasons.push(Exclusion::Terminating);
    }
    let candidate = reasons.is_empty();
    let serving = is_pod_ready(pod);
    let conditions = Conditions { ready: pnra || serving, serving, terminating };
    if !conditions.ready {
        reasons.push(Exclusion::NotReady);
    }
    let ports = resolve_ports(svc, pod, &mut reasons);
    let spec = svc.spec.as_ref();
    if ports.is_empty() && spec.and_then(|s| s.cluster_ip.as_deref()) != Some("None") {
        reasons.push(Exclusion::NoServicePorts);
    } else if !ports.is_empty() && ports.iter().all(Option::is_none) {
        reasons.push(Exclusion::NoPortResolved);
    }
    let mut addresses = BTreeMap::new();
    if has_ip(pod) {
        let family = endpoints_family(svc, pod);
        match pod_ips_of_family(pod, family).into_iter().next() {
            Some(ip) => {
                addresses.insert(family, vec![ip]);
            }
            None => reasons.extend([Exclusion::NoIpOfFamily { family }, Exclusion::NoUsableIp]),
        }
    }
    let mut eligibility = Eligibility { reasons, candidate, conditions, ports, addresses };
    if !eligibility.is_endpoint() {
        eligibility.addresses.clear();
    }
    eligibility
}

/// The Pod's Node, `None` when `spec.nodeName` is unset or the Node unknown
/// (upstream's lister answers NotFound for both).
pub fn pod_node(pod: &StoredPod, nodes: &impl NodeLookup) -> Option<NodeInfo> {
    let name = pod.spec.as_ref().and_then(|s| s.node_name.as_deref())?;
    if name.is_empty() {
        return None;
    }
    nodes.node(name)
}

/// The family of the Endpoints address (upstream `podToEndpointAddressForService`):
/// `ipFamilies[0]`; without ipFamilies, that of a set clusterIP; for a headless
/// one, that of `status.podIP`. Unparseable text counts as IPv4, as Go's
/// `IsIPv6String` does.
fn endpoints_family(svc: &Service, pod: &StoredPod) -> IpFamily {
    let spec = svc.spec.as_ref();
    let of_text = |text: Option<&str>| match text.and_then(ip::parse_ip_sloppy).map(IpFamily::of) {
        Some(IpFamily::V6) => IpFamily::V6,
        _ => IpFamily::V4,
    };
    let families = spec.and_then(|s| s.ip_families.as_deref()).unwrap_or_default();
    let cluster_ip = spec.and_then(|s| s.cluster_ip.as_deref()).unwrap_or_default();
    if let Some(first) = families.first() {
        IpFamily::from_name(first).unwrap_or(IpFamily::V4)
    } else if !cluster_ip.is_empty() && cluster_ip != "None" {
        of_text(Some(cluster_ip))
    } else {
        of_text(pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()))
    }
}

pub mod summary;
#[cfg(test)]
mod tests;
