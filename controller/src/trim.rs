//! Trimming of watched objects before they enter a reflector store: only the fields
//! some reconcile or the CLI reads are kept. Pure functions.
//!
//! Pods are not trimmed here: they are stored as [`crate::stored_pod::StoredPod`],
//! which never holds the rest.

use std::collections::BTreeMap;

use k8s_openapi::api::{
    core::v1::{Endpoints, Node, NodeCondition, NodeStatus, Service},
    discovery::v1::EndpointSlice,
};

#[cfg(doc)]
use crate::endpointslice::NodeInfo;
use crate::endpointslice::{EXCLUDED_ROLE_LABELS, ZONE_LABEL};
use crate::labels;

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

/// Drops managedFields and, from an endpointslice controller's slice, the
/// last-change-trigger-time annotation: every write of such a slice sets or
/// removes it afresh, and no comparison reads it. The mirroring controller's
/// slices keep theirs: their annotations are compared with the Endpoints'.
pub fn trim_slice(slice: &mut EndpointSlice) {
    slice.metadata.managed_fields = None;
    let managed_by = slice.metadata.labels.as_ref().and_then(|l| l.get(labels::MANAGED_BY));
    if managed_by.is_some_and(|m| {
        [labels::SVCPLANE_SLICE_CONTROLLER, labels::UPSTREAM_SLICE_CONTROLLER].contains(&m.as_str())
    }) {
        drop_trigger_time(&mut slice.metadata.annotations);
    }
}

/// Drops managedFields and the last-change-trigger-time annotation: the
/// Endpoints controller sets or removes it on every write, and mirroring never
/// copies it.
pub fn trim_endpoints(ep: &mut Endpoints) {
    ep.metadata.managed_fields = None;
    drop_trigger_time(&mut ep.metadata.annotations);
}

/// Removes the trigger time, and the map once empty: a map of one entry
/// holds a node of eleven (over 500 bytes per stored object).
fn drop_trigger_time(annotations: &mut Option<BTreeMap<String, String>>) {
    if let Some(map) = annotations {
        map.remove(labels::LAST_CHANGE_TRIGGER_TIME);
        if map.is_empty() {
            *annotations = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn meta(managed_by: &str, annotations: &[(&str, &str)]) -> ObjectMeta {
        let map =
            |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        ObjectMeta {
            labels: Some(map(&[(labels::MANAGED_BY, managed_by)])),
            annotations: Some(map(annotations)),
            ..ObjectMeta::default()
        }
    }

    const TRIGGER: (&str, &str) = (labels::LAST_CHANGE_TRIGGER_TIME, "2026-12-07T10:00:00Z");

    #[test]
    fn an_endpointslice_controllers_slice_is_stored_without_its_trigger_time() {
        for managed_by in [labels::SVCPLANE_SLICE_CONTROLLER, labels::UPSTREAM_SLICE_CONTROLLER] {
            let mut slice =
                EndpointSlice { metadata: meta(managed_by, &[TRIGGER]), ..EndpointSlice::default() };
            trim_slice(&mut slice);
            assert_eq!(slice.metadata.annotations, None, "{managed_by}");

            let mut slice = EndpointSlice {
                metadata: meta(managed_by, &[TRIGGER, ("note", "x")]),
                ..EndpointSlice::default()
            };
            trim_slice(&mut slice);
            let kept: Vec<_> = slice.metadata.annotations.unwrap().into_keys().collect();
            assert_eq!(kept, ["note"], "{managed_by}");
        }
    }

    #[test]
    fn a_mirrored_slice_keeps_its_annotations_as_written() {
        for managed_by in [labels::SVCPLANE_MIRRORING_CONTROLLER, labels::UPSTREAM_MIRRORING_CONTROLLER] {
            let mut slice =
                EndpointSlice { metadata: meta(managed_by, &[TRIGGER]), ..EndpointSlice::default() };
            trim_slice(&mut slice);
            assert_eq!(slice.metadata.annotations.unwrap().len(), 1, "{managed_by}");
        }
    }

    #[test]
    fn endpoints_are_stored_without_the_trigger_time_and_keep_every_other_annotation() {
        let mut ep = Endpoints { metadata: meta("", &[TRIGGER]), subsets: None };
        trim_endpoints(&mut ep);
        assert_eq!(ep.metadata.annotations, None);

        let lock = (labels::LEADER_ELECTION, "{}");
        let over = (labels::OVER_CAPACITY, "truncated");
        let mut ep = Endpoints { metadata: meta("", &[TRIGGER, lock, over]), subsets: None };
        trim_endpoints(&mut ep);
        let kept: Vec<_> = ep.metadata.annotations.unwrap().into_keys().collect();
        assert_eq!(kept, [labels::LEADER_ELECTION, labels::OVER_CAPACITY]);
    }
}
