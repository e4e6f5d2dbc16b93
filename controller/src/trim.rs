//! Trimming of watched objects before they enter a reflector store: only the fields
//! some reconcile or the CLI reads are kept. Pure functions.
//!
//! Pods are not trimmed here: they are stored as [`crate::stored_pod::StoredPod`],
//! which never holds the rest.

use k8s_openapi::api::{
    core::v1::{Endpoints, Node, Service},
    discovery::v1::EndpointSlice,
};

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
