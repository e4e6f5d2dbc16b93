//! Which hints a Service's endpoints get: topology-aware hints
//! (`service.kubernetes.io/topology-mode: Auto`, in [`super::topology_hints`]),
//! else `spec.trafficDistribution` hints, else none. Pure.
//!
//! Upstream: `trafficdist.ReconcileHints`, `topologycache.RemoveHintsFromSlices`
//! and the hint branch of `reconcileByAddressType`.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointHints, EndpointSlice, ForNode, ForZone};

use super::NodeLookup;
use super::topology_hints::add_hints;
use crate::ip::IpFamily;
use crate::plan::Warning;

/// `service.kubernetes.io/topology-aware-hints`: deprecated, wins when present.
const TOPOLOGY_AWARE_HINTS: &str = "service.kubernetes.io/topology-aware-hints";
/// `service.kubernetes.io/topology-mode`.
const TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";

/// Upstream `hintsEnabled`: the topology annotation is `Auto` or `auto` (the
/// deprecated `topology-aware-hints` wins when both are set).
pub fn topology_hints_enabled(svc: &Service) -> bool {
    let annotations = svc.metadata.annotations.as_ref();
    let value = annotations
        .and_then(|a| a.get(TOPOLOGY_AWARE_HINTS).or_else(|| a.get(TOPOLOGY_MODE)))
        .map(String::as_str);
    matches!(value, Some("Auto" | "auto"))
}

/// The hint heuristic a valid `trafficDistribution` asks for: `Some(true)` also
/// adds node hints (`PreferSameNode`); `None` when the field is unset or unknown.
/// `PreferSameZone`/`PreferSameNode` are always accepted: their gate is GA and
/// locked on since 1.35.
fn traffic_distribution(svc: &Service) -> Option<bool> {
    let value = svc.spec.as_ref()?.traffic_distribution.as_deref()?;
    match value {
        "PreferClose" | "PreferSameZone" => Some(false),
        "PreferSameNode" => Some(true),
        _ => None,
    }
}

/// Sets or removes hints on the slices of one address type being written, and
/// moves unchanged slices whose hints are wrong into `update` (as copies).
/// Returns the Warning upstream records when topology-aware hints are refused.
pub(super) fn reconcile_hints(
    svc: &Service,
    nodes: &impl NodeLookup,
    family: IpFamily,
    create: &mut [EndpointSlice],
    update: &mut Vec<EndpointSlice>,
    unchanged: &[&EndpointSlice],
) -> Option<Warning> {
    if topology_hints_enabled(svc) {
        return add_hints(nodes.zone_shares().as_deref(), family, create, update, unchanged);
    }
    let heuristic = traffic_distribution(svc);
    let needs_update = |slice: &EndpointSlice| match heuristic {
        Some(node_hints) => endpoints(slice).iter().any(|e| wrong_hints(e, node_hints)),
        None => endpoints(slice).iter().any(|e| e.hints.is_some()),
    };
    update.extend(unchanged.iter().filter(|slice| needs_update(slice)).map(|slice| (*slice).clone()));
    for slice in create.iter_mut().chain(update.iter_mut()) {
        for endpoint in slice.endpoints.iter_mut().flatten() {
            match heuristic {
                Some(node_hints) => set_hints(endpoint, node_hints),
                None => endpoint.hints = None,
            }
        }
    }
    None
}

/// A slice's endpoints.
fn endpoints(slice: &EndpointSlice) -> &[Endpoint] {
    slice.endpoints.as_deref().unwrap_or_default()
}

/// Hints are only managed for ready endpoints; others keep what they have.
fn is_ready(endpoint: &Endpoint) -> bool {
    endpoint.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false)
}

/// Upstream `preferCloseHeuristic.needsUpdate` for one endpoint.
fn wrong_hints(endpoint: &Endpoint, node_hints: bool) -> bool {
    if !is_ready(endpoint) {
        return false;
    }
    let hints = endpoint.hints.as_ref();
    let zones = hints.and_then(|h| h.for_zones.as_deref()).unwrap_or_default();
    let nodes = hints.and_then(|h| h.for_nodes.as_deref()).unwrap_or_default();
    let zone_wrong = match &endpoint.zone {
        Some(zone) => hints.is_none() || zones.len() != 1 || &zones[0].name != zone,
        None => !zones.is_empty(),
    };
    let node_wrong = match (&endpoint.node_name, node_hints) {
        (Some(node), true) => hints.is_none() || nodes.len() != 1 || &nodes[0].name != node,
        _ => !nodes.is_empty(),
    };
    zone_wrong || node_wrong
}

/// Upstream `preferCloseHeuristic.update` for one endpoint: own zone, and own
/// node for `PreferSameNode`; no hint at all when neither is known.
fn set_hints(endpoint: &mut Endpoint, node_hints: bool) {
    if !is_ready(endpoint) {
        return;
    }
    let for_zones = endpoint.zone.as_ref().map(|zone| vec![ForZone { name: zone.clone() }]);
    let for_nodes =
        endpoint.node_name.as_ref().filter(|_| node_hints).map(|node| vec![ForNode { name: node.clone() }]);
    endpoint.hints =
        (for_zones.is_some() || for_nodes.is_some()).then_some(EndpointHints { for_zones, for_nodes });
}
