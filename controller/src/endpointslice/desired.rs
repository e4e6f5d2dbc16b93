//! Desired endpoints: which Pods are endpoints, their fields, and the port-set
//! group each lands in. Pure.
//!
//! Upstream: `podToEndpoint`, `getEndpointPorts`, `getAddressTypesForService` in
//! `k8s.io/endpointslice/utils.go` and the Pod loop of `reconcileByAddressType`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::stored_pod::StoredPod;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

use super::NodeLookup;
use crate::eligibility::{self, Conditions, Exclusion, pod_node};
use crate::ip::IpFamily;
use crate::pod::{DEFAULT_PROTOCOL, pod_reference, should_set_hostname};

/// One port of a port set, with every field the grouping compares. Upstream
/// hashes the whole `EndpointPort`; comparing the fields is equivalent.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct PortKeyEntry {
    name: Option<String>,
    port: Option<i32>,
    protocol: Option<String>,
    app_protocol: Option<String>,
}

/// An order-insensitive port set (upstream `PortMapKey`); nil and empty are equal.
pub(super) type PortKey = Vec<PortKeyEntry>;

/// The group key of a port list.
pub(super) fn port_key(ports: &[EndpointPort]) -> PortKey {
    let mut key: PortKey = ports
        .iter()
        .map(|p| PortKeyEntry {
            name: p.name.clone(),
            port: p.port,
            protocol: p.protocol.clone(),
            app_protocol: p.app_protocol.clone(),
        })
        .collect();
    key.sort();
    key
}

/// Endpoint identity (upstream `hashEndpoint`): sorted addresses, hostname and the
/// target's namespace and name. UID, node, zone and conditions are not part of it,
/// so a recreated Pod with the same name and IP is an in-place change.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct EndpointKey {
    addresses: Vec<String>,
    hostname: String,
    namespace: String,
    name: String,
}

/// The identity of an endpoint.
pub(super) fn endpoint_key(endpoint: &Endpoint) -> EndpointKey {
    let mut addresses = endpoint.addresses.clone();
    addresses.sort();
    let target = endpoint.target_ref.as_ref();
    EndpointKey {
        addresses,
        hostname: endpoint.hostname.clone().unwrap_or_default(),
        namespace: target.and_then(|t| t.namespace.clone()).unwrap_or_default(),
        name: target.and_then(|t| t.name.clone()).unwrap_or_default(),
    }
}

/// The desired endpoints of one (address type, port set) group.
#[derive(Clone, Debug, Default)]
pub(super) struct DesiredGroup {
    /// The ports every slice of the group carries, in key order.
    pub ports: Vec<EndpointPort>,
    /// Endpoints by identity; the sorted map stands in for upstream's hash set.
    pub endpoints: BTreeMap<EndpointKey, Endpoint>,
}

pub(super) use crate::selector::is_selected;

/// `clusterIP` is a real IP: neither `None` nor empty (upstream `isServiceIPSet`).
pub(super) fn is_service_ip_set(svc: &Service) -> bool {
    let cluster_ip = svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref());
    !matches!(cluster_ip, None | Some("") | Some("None"))
}

/// The address types a Service gets slices for (upstream `getAddressTypesForService`):
/// its `ipFamilies`; when empty (a Service written by an old apiserver), the
/// clusterIP's family, or both families for a headless Service.
pub fn service_address_families(svc: &Service) -> Vec<IpFamily> {
    let spec = svc.spec.as_ref();
    let mut families: Vec<IpFamily> = spec
        .and_then(|s| s.ip_families.as_deref())
        .unwrap_or_default()
        .iter()
        .filter_map(|f| IpFamily::from_name(f))
        .collect();
    families.sort();
    families.dedup();
    if !families.is_empty() {
        return families;
    }
    if is_service_ip_set(svc) {
        let cluster_ip = spec.and_then(|s| s.cluster_ip.as_deref()).unwrap_or_default();
        // Go's IsIPv6String: anything that does not parse as IPv6 counts as IPv4.
        let v6 = cluster_ip.parse::<IpAddr>().is_ok_and(|ip| IpFamily::of(ip) == IpFamily::V6);
        return vec![if v6 { IpFamily::V6 } else { IpFamily::V4 }];
    }
    vec![IpFamily::V4, IpFamily::V6]
}

/// The slice ports of a Pod's resolved targets (upstream `getEndpointPorts`): a
/// Service port whose named target the Pod does not declare is left out for that Pod.
pub(super) fn endpoint_ports(svc: &Service, resolved: &[Option<i32>]) -> Vec<EndpointPort> {
    let svc_ports = svc.spec.as_ref().and_then(|s| s.ports.as_deref()).unwrap_or_default();
    let mut ports: Vec<EndpointPort> = svc_ports
        .iter()
        .zip(resolved)
        .filter_map(|(svc_port, port)| {
            Some(EndpointPort {
                name: Some(svc_port.name.clone().unwrap_or_default()),
                port: Some((*port)?),
                protocol: Some(svc_port.protocol.clone().unwrap_or_else(|| DEFAULT_PROTOCOL.to_owned())),
                app_protocol: svc_port.app_protocol.clone(),
            })
        })
        .collect();
    // Upstream stores ports in hash order; any fixed order will do (order is
    // not compared), key order keeps new slices deterministic.
    ports.sort_by_key(|p| port_key(std::slice::from_ref(p)));
    ports
}

/// The endpoint of one Pod for one family (upstream `podToEndpoint`), from its
/// [`eligibility::for_slices`] conditions and addresses.
fn build_endpoint(
    svc: &Service,
    pod: &StoredPod,
    conditions: Conditions,
    mut addresses: Vec<String>,
    zone: Option<String>,
) -> Endpoint {
    addresses.sort();
    let spec = pod.spec.as_ref();
    Endpoint {
        addresses,
        conditions: Some(EndpointConditions {
            ready: Some(conditions.ready),
            serving: Some(conditions.serving),
            terminating: Some(conditions.terminating),
        }),
        hostname: should_set_hostname(pod, svc).then(|| spec.and_then(|s| s.hostname.clone())).flatten(),
        node_name: spec.and_then(|s| s.node_name.clone()).filter(|n| !n.is_empty()),
        zone: zone.filter(|z| !z.is_empty()),
        target_ref: Some(pod_reference(pod)),
        ..Endpoint::default()
    }
}

pub(super) use crate::selector::selected_pods;

/// Desired endpoints of one family, by port set. A group exists as soon as a
/// candidate Pod resolves its ports, even if the Pod then yields no endpoint (no
/// address of this family, or its Node is missing), as upstream.
pub(super) fn desired_groups(
    svc: &Service,
    pods: &[&StoredPod],
    nodes: &impl NodeLookup,
    family: IpFamily,
) -> BTreeMap<PortKey, DesiredGroup> {
    let mut groups: BTreeMap<PortKey, DesiredGroup> = BTreeMap::new();
    for pod in pods {
        let node = pod_node(pod, nodes);
        let verdict = eligibility::for_slices(svc, pod, node.is_some());
        if !verdict.candidate {
            continue;
        }
        let ports = endpoint_ports(svc, &verdict.ports);
        let group = groups
            .entry(port_key(&ports))
            .or_insert_with(|| DesiredGroup { ports, endpoints: BTreeMap::new() });
        let Some(addresses) = verdict.addresses.get(&family) else {
            continue;
        };
        let endpoint =
            build_endpoint(svc, pod, verdict.conditions, addresses.clone(), node.and_then(|n| n.zone));
        group.endpoints.insert(endpoint_key(&endpoint), endpoint);
    }
    groups
}

/// A Pod left out because its Node is unknown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingNode {
    /// The Pod's name.
    pub pod: String,
    /// Its `spec.nodeName` (empty when unscheduled).
    pub node: String,
}

/// Pods [`super::plan_slices`] left out because their Node is unknown. Upstream
/// still writes the other endpoints, then fails the sync so the Service is
/// retried with backoff (kubernetes#107927); the shell should do the same when
/// this is non-empty. Always empty with `publishNotReadyAddresses`, for
/// selectorless and ExternalName Services.
pub fn missing_nodes(svc: &Service, pods: &[Arc<StoredPod>], nodes: &impl NodeLookup) -> Vec<MissingNode> {
    selected_pods(svc, pods)
        .into_iter()
        .filter(|pod| pod_node(pod, nodes).is_none())
        .filter(|pod| {
            let reasons = eligibility::for_slices(svc, pod, false).reasons;
            reasons.iter().any(|r| matches!(r, Exclusion::NodeMissing { .. }))
        })
        .map(|pod| MissingNode {
            pod: pod.metadata.name.clone().unwrap_or_default(),
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
        })
        .collect()
}
