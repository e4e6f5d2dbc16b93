//! Desired endpoints: which Pods are endpoints, their fields, and the port-set
//! group each lands in. Pure.
//!
//! Upstream: `podToEndpoint`, `getEndpointPorts`, `getAddressTypesForService` in
//! `k8s.io/endpointslice/utils.go` and the Pod loop of `reconcileByAddressType`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::stored_pod::StoredPod;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

use super::NodeLookup;
use crate::eligibility::{self, Conditions, Exclusion, pod_node};
use crate::ip::IpFamily;
use crate::pod::{DEFAULT_PROTOCOL, pod_reference, should_set_hostname};
use crate::slice_keys::{EndpointIdentity, PortSet};

/// The desired endpoints of one (address type, port set) group.
#[derive(Clone, Debug, Default)]
pub(super) struct DesiredGroup {
    /// The ports every slice of the group carries, in key order.
    pub ports: Vec<EndpointPort>,
    /// Endpoints by identity; the sorted map stands in for upstream's hash set.
    pub endpoints: BTreeMap<EndpointIdentity, Endpoint>,
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
    PortSet::sort(&mut ports);
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
///
/// Pods left out because their Node is unknown are added to `missing_nodes` as
/// `(pod, spec.nodeName)`: upstream still writes the other endpoints, then fails
/// the sync so the Service is retried with backoff (kubernetes#107927).
pub(super) fn desired_groups(
    svc: &Service,
    pods: &[&StoredPod],
    nodes: &impl NodeLookup,
    family: IpFamily,
    missing_nodes: &mut BTreeSet<(String, String)>,
) -> BTreeMap<PortSet, DesiredGroup> {
    let mut groups: BTreeMap<PortSet, DesiredGroup> = BTreeMap::new();
    for pod in pods {
        let node = pod_node(pod, nodes);
        let verdict = eligibility::for_slices(svc, pod, node.is_some());
        if !verdict.candidate {
            continue;
        }
        let ports = endpoint_ports(svc, &verdict.ports);
        let group = groups
            .entry(PortSet::of(&ports))
            .or_insert_with(|| DesiredGroup { ports, endpoints: BTreeMap::new() });
        let missing = verdict.reasons.iter().find_map(|r| match r {
            Exclusion::NodeMissing { node } => Some(node.clone()),
            _ => None,
        });
        if let Some(node) = missing {
            missing_nodes.insert((pod.metadata.name.clone().unwrap_or_default(), node));
            continue;
        }
        let Some(addresses) = verdict.addresses.get(&family) else {
            continue;
        };
        let endpoint =
            build_endpoint(svc, pod, verdict.conditions, addresses.clone(), node.and_then(|n| n.zone));
        group.endpoints.insert(EndpointIdentity::of(&endpoint), endpoint);
    }
    groups
}
