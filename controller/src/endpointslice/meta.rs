//! Slice metadata and comparisons: labels, ownership, new and placeholder
//! slices, the trigger-time annotation, endpoint change detection. Pure.
//!
//! Upstream: `setEndpointSliceLabels`, `ownedBy`, `newEndpointSlice`,
//! `placeholderSliceCompare`, `addTriggerTimeAnnotation` (`k8s.io/endpointslice`)
//! and `EndpointsEqualBeyondHash` (`k8s.io/endpointslice/util`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::desired::is_service_ip_set;
use crate::ip::IpFamily;
use crate::labels::{HEADLESS, MANAGED_BY, SERVICE_NAME};

/// Labels the controller owns; a Service's own values for them are ignored.
fn is_reserved_label(key: &str) -> bool {
    key == SERVICE_NAME || key == MANAGED_BY || key == HEADLESS
}

/// Labels minus the reserved ones.
fn unreserved(labels: Option<&BTreeMap<String, String>>) -> BTreeMap<String, String> {
    labels
        .into_iter()
        .flatten()
        .filter(|(k, _)| !is_reserved_label(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The labels a slice of `svc` should carry, and whether `current` differs in a
/// way that warrants a write: only non-reserved labels count, so a wrong
/// `headless` label alone is fixed at the next write for another reason, as upstream.
pub(super) fn slice_labels(
    svc: &Service,
    current: Option<&BTreeMap<String, String>>,
    managed_by: &str,
) -> (BTreeMap<String, String>, bool) {
    let mut labels = unreserved(svc.metadata.labels.as_ref());
    let changed = unreserved(current) != labels;
    if !is_service_ip_set(svc) {
        labels.insert(HEADLESS.to_owned(), String::new());
    }
    labels.insert(SERVICE_NAME.to_owned(), svc.metadata.name.clone().unwrap_or_default());
    labels.insert(MANAGED_BY.to_owned(), managed_by.to_owned());
    (labels, changed)
}

/// True for a slice of this Service that this controller manages and that is not
/// being deleted: what upstream's lister selector and pending-deletion filter keep.
pub(super) fn is_managed(slice: &EndpointSlice, svc: &Service, managed_by: &str) -> bool {
    let labels = slice.metadata.labels.as_ref();
    let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
    slice.metadata.namespace == svc.metadata.namespace
        && label(SERVICE_NAME) == svc.metadata.name.as_deref()
        && label(MANAGED_BY) == Some(managed_by)
        && slice.metadata.deletion_timestamp.is_none()
}

/// The slice has an ownerRef to this Service (by UID). A same-named Service that
/// was deleted and recreated has another UID: its leftovers are not owned.
pub(super) fn owned_by(slice: &EndpointSlice, svc: &Service) -> bool {
    let uid = svc.metadata.uid.as_deref().unwrap_or_default();
    slice
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.kind == "Service" && o.api_version == "v1")
}

/// The controller ownerRef every created slice carries.
fn owner_reference(svc: &Service) -> OwnerReference {
    OwnerReference {
        api_version: "v1".to_owned(),
        kind: "Service".to_owned(),
        name: svc.metadata.name.clone().unwrap_or_default(),
        uid: svc.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// A new, empty slice of `svc` (upstream `newEndpointSlice`).
pub(super) fn build_slice(
    svc: &Service,
    ports: &[EndpointPort],
    family: IpFamily,
    managed_by: &str,
) -> EndpointSlice {
    let name = svc.metadata.name.clone().unwrap_or_default();
    let (labels, _) = slice_labels(svc, None, managed_by);
    EndpointSlice {
        metadata: ObjectMeta {
            // Service names are DNS labels, so the dash form always validates.
            generate_name: Some(format!("{name}-")),
            namespace: svc.metadata.namespace.clone(),
            labels: Some(labels),
            owner_references: Some(vec![owner_reference(svc)]),
            ..ObjectMeta::default()
        },
        address_type: family.as_str().to_owned(),
        endpoints: Some(Vec::new()),
        ports: Some(ports.to_vec()),
    }
}

/// Upstream `placeholderSliceCompare`: of the metadata only namespace and labels
/// count (an empty label value equals an absent label; ownerRefs are not
/// compared); address type, ports and endpoints must match, nil equal to empty.
pub(super) fn placeholder_equal(existing: &EndpointSlice, placeholder: &EndpointSlice) -> bool {
    let labels_a = existing.metadata.labels.clone().unwrap_or_default();
    let labels_b = placeholder.metadata.labels.clone().unwrap_or_default();
    let value =
        |labels: &BTreeMap<String, String>, key: &String| labels.get(key).cloned().unwrap_or_default();
    let labels_equal = labels_a.iter().all(|(k, v)| &value(&labels_b, k) == v)
        && labels_b.iter().all(|(k, v)| &value(&labels_a, k) == v);
    let namespace = |s: &EndpointSlice| s.metadata.namespace.clone().unwrap_or_default();
    labels_equal
        && namespace(existing) == namespace(placeholder)
        && existing.address_type == placeholder.address_type
        && existing.ports.clone().unwrap_or_default() == placeholder.ports.clone().unwrap_or_default()
        && existing.endpoints.clone().unwrap_or_default() == placeholder.endpoints.clone().unwrap_or_default()
}
