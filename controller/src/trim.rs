//! Trimming of watched objects before they enter a reflector store: only the fields
//! some reconcile or the CLI reads are kept. Pure functions.
//!
//! Pods are not trimmed here: they are stored as [`crate::stored_pod::StoredPod`],
//! which never holds the rest.

use k8s_openapi::api::{
    core::v1::{Endpoints, Node, NodeCondition, NodeStatus, Service},
    discovery::v1::EndpointSlice,
};

#[cfg(doc)]
use crate::endpointslice::NodeInfo;
use crate::endpointslice::{EXCLUDED_ROLE_LABELS, ZONE_LABEL};

/// Keeps what [`NodeInfo::of`] reads: the zone and control-plane role labels, the
/// `Ready` condition's status and the allocatable CPU. A status heartbeat then
/// leaves the stored Node as it was.
pub fn trim_node(node: &mut Node) {
    node.metadata.managed_fields = None;
    node.metadata.annotations = None;
    node.metadata.owner_references = None;
    node.metadata.labels = node.metadata.labels.take().map(|labels| {
        labels
            .into_iter()
            .filter(|(k, _)| k == ZONE_LABEL || EXCLUDED_ROLE_LABELS.contains(&k.as_str()))
            .collect()
    });
    node.spec = None;
    node.status = node.status.take().map(|status| NodeStatus {
        allocatable: status.allocatable.map(|a| a.into_iter().filter(|(k, _)| k == "cpu").collect()),
        conditions: status.conditions.map(|conditions| {
            conditions
                .into_iter()
                .filter(|c| c.type_ == "Ready")
                .map(|c| NodeCondition { type_: c.type_, status: c.status, ..NodeCondition::default() })
                .collect()
        }),
        ..NodeStatus::default()
    });
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
