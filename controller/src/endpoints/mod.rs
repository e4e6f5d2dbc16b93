//! The legacy Endpoints controller's pure planner, plus the canonical-subset and
//! IP helpers it shares with the mirroring planner.
//!
//! Input: one Service (or `None` once it is gone), the Pods of its namespace, the
//! trigger time the shell's tracker computed, and the Endpoints object of the same
//! name if the store has one. Output: a [`Plan`] of at most one write (create,
//! update or delete). No client, no I/O.
//!
//! Rules follow kube-controller-manager v1.37.2 `pkg/controller/endpoint`
//! (`syncService`, `podToEndpointAddressForService`, `addEndpointSubset`,
//! `truncateEndpoints`, `capacityAnnotationSetCorrectly`,
//! `labelsCorrectForEndpoints`) and `pkg/api/v1/endpoints.RepackSubsets`.

pub(crate) mod repack;
#[cfg(test)]
mod tests;
mod truncate;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::stored_pod::StoredPod;
use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, ObjectReference, Service,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use crate::eligibility;
use crate::plan::{Key, Plan};
use crate::pod::{DEFAULT_PROTOCOL, pod_reference, should_set_hostname};
use crate::{labels, selector};
use repack::{PortIdentity, repack_subsets};

/// Upstream `maxCapacity`: an Endpoints holds at most this many addresses.
pub const MAX_CAPACITY: usize = 1000;

/// The value of `endpoints.kubernetes.io/over-capacity` on a truncated Endpoints.
pub const TRUNCATED: &str = "truncated";

/// Event reason when creating the Endpoints failed (Warning, on the Endpoints).
pub const REASON_FAILED_TO_CREATE: &str = "FailedToCreateEndpoint";

/// Event reason when updating the Endpoints failed (Warning, on the Endpoints).
pub const REASON_FAILED_TO_UPDATE: &str = "FailedToUpdateEndpoint";

/// Plans the Endpoints of one Service (upstream `syncService`).
///
/// `pods` may be the whole namespace or already selected: Pods of another
/// namespace or not matched by the selector are ignored. `trigger_time` is the
/// `endpoints.kubernetes.io/last-change-trigger-time` value (`None` removes the
/// annotation when the object is written; it never causes a write by itself).
///
/// Nothing is written for a selectorless or ExternalName Service (its Endpoints
/// is the user's, and the mirroring controller's). Once the Service is gone
/// (`svc` is `None`), the Endpoints named `key` is deleted whatever wrote it and
/// whether or not the store has it, as upstream does; a delete that finds
/// nothing is not an error.
pub fn desired_endpoints(
    key: &Key,
    svc: Option<&Service>,
    pods: &[Arc<StoredPod>],
    trigger_time: Option<Time>,
    existing: Option<&Endpoints>,
) -> Plan<Endpoints> {
    let Some(svc) = svc else {
        let meta = ObjectMeta {
            name: Some(key.name.clone()),
            namespace: Some(key.namespace.clone()),
            ..ObjectMeta::default()
        };
        return Plan::delete_all([Endpoints { metadata: meta, subsets: None }]);
    };
    if !selector::is_selected(svc) {
        // Selectorless: the Endpoints is the user's (and the mirroring controller's);
        // ExternalName: it has none.
        return Plan::default();
    }

    let subsets = desired_subsets(svc, pods);

    let svc_labels = svc.metadata.labels.clone().unwrap_or_default();
    let current = existing.cloned().unwrap_or_else(|| Endpoints {
        metadata: ObjectMeta {
            name: svc.metadata.name.clone(),
            namespace: svc.metadata.namespace.clone(),
            labels: svc.metadata.labels.clone(),
            ..ObjectMeta::default()
        },
        subsets: None,
    });
    let create = current.metadata.resource_version.as_deref().unwrap_or_default().is_empty();
    if !create
        && subsets_equal(current.subsets.as_deref().unwrap_or(&[]), &subsets)
        && labels_correct(current.metadata.labels.as_ref(), &svc_labels)
        && capacity_annotation_correct(&current)
    {
        return Plan::default();
    }

    let mut updated = current;
    let mut annotations = updated.metadata.annotations.take().unwrap_or_default();
    labels::set_trigger_time(&mut annotations, trigger_time.as_ref());
    let mut subsets = subsets;
    if truncate::truncate_subsets(&mut subsets, MAX_CAPACITY) {
        annotations.insert(labels::OVER_CAPACITY.to_owned(), TRUNCATED.to_owned());
    } else {
        annotations.remove(labels::OVER_CAPACITY);
    }
    updated.metadata.annotations = (!annotations.is_empty()).then_some(annotations);
    updated.metadata.labels = Some(endpoints_labels(svc, svc_labels));
    updated.subsets = (!subsets.is_empty()).then_some(subsets);
    if create {
        Plan { create: vec![updated], ..Plan::default() }
    } else {
        Plan { update: vec![updated], ..Plan::default() }
    }
}

/// The repacked subsets the Service's Pods call for (upstream `syncService`'s
/// loop), each Pod as [`eligibility::for_endpoints`] has it.
fn desired_subsets(svc: &Service, pods: &[Arc<StoredPod>]) -> Vec<EndpointSubset> {
    let svc_ports = svc.spec.as_ref().and_then(|s| s.ports.as_deref()).unwrap_or_default();
    let mut subsets: Vec<EndpointSubset> = Vec::new();
    for pod in pods {
        let verdict = eligibility::for_endpoints(svc, pod);
        let Some(ip) = verdict.addresses.into_values().flatten().next() else {
            continue;
        };
        let address = EndpointAddress {
            ip,
            hostname: should_set_hostname(pod, svc).then(|| pod.spec.as_ref()?.hostname.clone()).flatten(),
            // Upstream always sets the pointer, even to "".
            node_name: Some(pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default()),
            target_ref: Some(pod_reference(pod)),
        };
        let ready = verdict.conditions.ready;
        let single = |ports: Option<Vec<EndpointPort>>| {
            let list = Some(vec![address.clone()]);
            EndpointSubset {
                addresses: if ready { list.clone() } else { None },
                not_ready_addresses: if ready { None } else { list },
                ports,
            }
        };
        if svc_ports.is_empty() {
            // Published without ports only when headless (eligibility drops others).
            subsets.push(single(None));
            continue;
        }
        for (svc_port, number) in svc_ports.iter().zip(verdict.ports) {
            // An unresolvable named port drops only this port for this Pod.
            let Some(number) = number else {
                continue;
            };
            subsets.push(single(Some(vec![EndpointPort {
                name: svc_port.name.clone(),
                port: number,
                protocol: Some(svc_port.protocol.clone().unwrap_or_else(|| DEFAULT_PROTOCOL.to_owned())),
                app_protocol: svc_port.app_protocol.clone(),
            }])));
        }
    }
    repack_subsets(&subsets, PortIdentity::ByValue)
}

/// The Endpoints labels: exactly the Service's, plus the headless label when the
/// Service has no cluster IP (`None` or empty), plus managed-by.
fn endpoints_labels(svc: &Service, mut svc_labels: BTreeMap<String, String>) -> BTreeMap<String, String> {
    let cluster_ip = svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()).unwrap_or_default();
    if cluster_ip.is_empty() || cluster_ip == "None" {
        svc_labels.insert(labels::HEADLESS.to_owned(), String::new());
    } else {
        svc_labels.remove(labels::HEADLESS);
    }
    svc_labels
        .insert(labels::ENDPOINTS_MANAGED_BY.to_owned(), labels::UPSTREAM_ENDPOINTS_CONTROLLER.to_owned());
    svc_labels
}

/// Upstream `labelsCorrectForEndpoints`: managed-by is ours, every other stored
/// label but headless is on the Service with the same value, and the Service has no
/// label the Endpoints lacks (a count check, so a Service carrying the headless or
/// managed-by label itself never passes and is re-PUT every sync, as upstream).
fn labels_correct(
    endpoints_labels: Option<&BTreeMap<String, String>>,
    svc_labels: &BTreeMap<String, String>,
) -> bool {
    let empty = BTreeMap::new();
    let endpoints_labels = endpoints_labels.unwrap_or(&empty);
    if endpoints_labels.get(labels::ENDPOINTS_MANAGED_BY).map(String::as_str)
        != Some(labels::UPSTREAM_ENDPOINTS_CONTROLLER)
    {
        return false;
    }
    let mut skipped = 0;
    for (key, value) in endpoints_labels {
        if key == labels::HEADLESS || key == labels::ENDPOINTS_MANAGED_BY {
            skipped += 1;
        } else if svc_labels.get(key) != Some(value) {
            return false;
        }
    }
    svc_labels.len() == endpoints_labels.len() - skipped
}

/// Upstream `capacityAnnotationSetCorrectly`: the stored object holds at most
/// [`MAX_CAPACITY`] addresses and has no over-capacity annotation. A truncated
/// object therefore never passes, and an over-capacity Service is re-PUT every sync.
fn capacity_annotation_correct(endpoints: &Endpoints) -> bool {
    let count: usize = endpoints
        .subsets
        .iter()
        .flatten()
        .map(|s| {
            s.addresses.as_ref().map_or(0, Vec::len) + s.not_ready_addresses.as_ref().map_or(0, Vec::len)
        })
        .sum();
    if count > MAX_CAPACITY {
        return false;
    }
    !endpoints.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(labels::OVER_CAPACITY))
}

/// Upstream's no-op test on subsets: equal after repacking the stored ones,
/// ignoring targetRef resourceVersions, a missing list equal to an empty one and a
/// missing string equal to "". Upstream first compares as stored, then after
/// repacking; svcplane's repack order differs from Go's, so it always repacks.
fn subsets_equal(stored: &[EndpointSubset], desired: &[EndpointSubset]) -> bool {
    let stored = normalize(repack_subsets(stored, PortIdentity::Decoded));
    stored == normalize(desired.to_vec())
}

fn normalize(subsets: Vec<EndpointSubset>) -> Vec<EndpointSubset> {
    let none_if_empty = |s: Option<String>| s.filter(|v| !v.is_empty());
    let address = |a: EndpointAddress| EndpointAddress {
        hostname: none_if_empty(a.hostname),
        ip: a.ip,
        node_name: a.node_name,
        target_ref: a.target_ref.map(|r| ObjectReference {
            api_version: none_if_empty(r.api_version),
            field_path: none_if_empty(r.field_path),
            kind: none_if_empty(r.kind),
            name: none_if_empty(r.name),
            namespace: none_if_empty(r.namespace),
            resource_version: None,
            uid: none_if_empty(r.uid),
        }),
    };
    let list = |l: Option<Vec<EndpointAddress>>| {
        l.filter(|v| !v.is_empty()).map(|v| v.into_iter().map(address).collect::<Vec<_>>())
    };
    subsets
        .into_iter()
        .map(|s| EndpointSubset {
            addresses: list(s.addresses),
            not_ready_addresses: list(s.not_ready_addresses),
            ports: s.ports.filter(|p| !p.is_empty()).map(|ports| {
                ports
                    .into_iter()
                    .map(|p| EndpointPort {
                        name: none_if_empty(p.name),
                        port: p.port,
                        protocol: none_if_empty(p.protocol),
                        app_protocol: p.app_protocol,
                    })
                    .collect()
            }),
        })
        .collect()
}
