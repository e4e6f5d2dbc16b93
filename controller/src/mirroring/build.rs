//! Builds mirrored slices and compares their metadata with the Endpoints. Pure.
//!
//! Upstream: `newEndpointSlice`, `getEndpointSlicePrefix`, the label/annotation
//! checks of `reconcileByPortMapping` and `needRebuildExistingSlices`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Endpoints;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::MirroringConfig;
use super::desired::{DesiredGroup, SliceKey};
use crate::labels;

/// Annotations of the Endpoints that are not copied onto its mirrored slices.
const NOT_MIRRORED_ANNOTATIONS: [&str; 2] = [labels::LAST_CHANGE_TRIGGER_TIME, labels::LAST_APPLIED];

/// Builds the mirrored slice of one group from scratch (upstream `newEndpointSlice`
/// plus the endpoint fill). With `existing`, the slice replaces it (same name and,
/// unlike upstream's unconditional PUT, its resourceVersion, so a stale cache
/// yields a conflict rather than a blind overwrite); otherwise it has a
/// `generateName`. At most `max_endpoints_per_subset` endpoints go in.
pub(super) fn mirrored_slice(
    endpoints: &Endpoints,
    key: &SliceKey,
    group: &DesiredGroup,
    existing: Option<&EndpointSlice>,
    config: &MirroringConfig,
) -> EndpointSlice {
    let name = endpoints.metadata.name.clone().unwrap_or_default();
    let mut slice_labels = endpoints.metadata.labels.clone().unwrap_or_default();
    slice_labels.insert(labels::SERVICE_NAME.to_owned(), name.clone());
    slice_labels.insert(labels::MANAGED_BY.to_owned(), config.managed_by.clone());
    let annotations = mirrored_annotations(endpoints);

    let mut metadata = ObjectMeta {
        namespace: endpoints.metadata.namespace.clone(),
        labels: Some(slice_labels),
        annotations: (!annotations.is_empty()).then_some(annotations),
        owner_references: Some(vec![owner_reference(endpoints)]),
        ..ObjectMeta::default()
    };
    match existing {
        Some(slice) => {
            metadata.name = slice.metadata.name.clone();
            metadata.resource_version = slice.metadata.resource_version.clone();
        }
        None => metadata.generate_name = Some(format!("{name}-")),
    }
    EndpointSlice {
        metadata,
        address_type: key.address_type.clone(),
        ports: Some(group.ports.clone()),
        // Always a list, never null: some clients reject `endpoints: null`.
        endpoints: Some(group.endpoints.iter().take(config.max_endpoints_per_subset).cloned().collect()),
    }
}

/// The slice matches the Endpoints' labels and annotations: slice labels without
/// managed-by and service-name equal the Endpoints labels, and slice annotations
/// equal the Endpoints annotations without the two never-mirrored ones. A missing
/// map equals an empty one (Go's semantic equality).
///
/// An Endpoints that itself carries a managed-by or service-name label can never
/// match, so its slice is rewritten on every sync, as upstream.
pub(super) fn metadata_matches(endpoints: &Endpoints, slice: &EndpointSlice) -> bool {
    let mut slice_labels = slice.metadata.labels.clone().unwrap_or_default();
    slice_labels.remove(labels::MANAGED_BY);
    slice_labels.remove(labels::SERVICE_NAME);
    let endpoints_labels = endpoints.metadata.labels.clone().unwrap_or_default();
    let slice_annotations = slice.metadata.annotations.clone().unwrap_or_default();
    endpoints_labels == slice_labels && mirrored_annotations(endpoints) == slice_annotations
}

/// Upstream `needRebuildExistingSlices`: the slice is owned by an earlier Endpoints
/// of the same name (deleted and recreated, e.g. while the controller was down).
pub(super) fn owned_by_older_endpoints(endpoints: &Endpoints, slice: &EndpointSlice) -> bool {
    let uid = endpoints.metadata.uid.as_deref().unwrap_or("");
    let name = endpoints.metadata.name.as_deref().unwrap_or("");
    slice
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|owner| owner.kind == "Endpoints" && owner.name == name && owner.uid != uid)
}

fn mirrored_annotations(endpoints: &Endpoints) -> BTreeMap<String, String> {
    let mut annotations = endpoints.metadata.annotations.clone().unwrap_or_default();
    for key in NOT_MIRRORED_ANNOTATIONS {
        annotations.remove(key);
    }
    annotations
}

/// `metav1.NewControllerRef(endpoints, v1/Endpoints)`.
fn owner_reference(endpoints: &Endpoints) -> OwnerReference {
    OwnerReference {
        api_version: "v1".to_owned(),
        kind: "Endpoints".to_owned(),
        name: endpoints.metadata.name.clone().unwrap_or_default(),
        uid: endpoints.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}
