//! The EndpointSlice mirroring controller's pure planner.
//!
//! Input: the Service and the user-written Endpoints of one name (either may be
//! missing) and the slices that exist for that name. Output: a [`Plan`], the
//! slices to create, update and delete, plus upstream's Warning Events for the
//! addresses that could not be mirrored. No client, no I/O.
//!
//! Rules follow kube-controller-manager v1.37.2
//! (`pkg/controller/endpointslicemirroring`: `syncEndpoints`, `shouldMirror`,
//! `reconciler.reconcile`, `reconcileByPortMapping`, `recycleSlices`,
//! `newEndpointSlice`, `addressToEndpoint`).

mod build;
mod desired;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::plan::{Plan, Warning, endpoint_count, recycle_deletes};
use crate::{labels, selector};

use desired::{DesiredState, SliceKey};

/// Upstream's `--mirroring-max-endpoints-per-subset` default (and maximum).
pub const DEFAULT_MAX_ENDPOINTS_PER_SUBSET: usize = 1000;

/// Event reason when addresses of an Endpoints are not valid IPs (Warning, on the Endpoints).
pub const REASON_INVALID_IP_ADDRESS: &str = "InvalidIPAddress";

/// Event reason when a subset held more addresses than may be mirrored (Warning, on the Endpoints).
pub const REASON_TOO_MANY_ADDRESSES: &str = "TooManyAddressesToMirror";

/// Static settings of the mirroring planner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirroringConfig {
    /// At most this many addresses of one Endpoints subset are mirrored; it is also
    /// the size limit of a mirrored slice (upstream uses one value for both:
    /// `--mirroring-max-endpoints-per-subset`, default 1000, valid 1..=1000).
    pub max_endpoints_per_subset: usize,
    /// The `endpointslice.kubernetes.io/managed-by` value written on, and required
    /// of, mirrored slices. Slices with any other value are never touched.
    pub managed_by: String,
}

impl Default for MirroringConfig {
    fn default() -> Self {
        MirroringConfig {
            max_endpoints_per_subset: DEFAULT_MAX_ENDPOINTS_PER_SUBSET,
            managed_by: labels::SVCPLANE_MIRRORING_CONTROLLER.to_owned(),
        }
    }
}

/// The Warning Events upstream records on the Endpoints for one sync, in
/// upstream's order: invalid IPs first, then the over-capacity one.
/// `addresses_skipped` counts every address not mirrored, the invalid ones
/// included (upstream's `addresses_skipped_per_sync`).
fn warnings(invalid: usize, addresses_skipped: usize, max_endpoints_per_subset: usize) -> Vec<Warning> {
    let mut warnings = Vec::new();
    if invalid > 0 {
        warnings.push(Warning {
            reason: REASON_INVALID_IP_ADDRESS,
            message: format!("Skipped {invalid} invalid IP addresses when mirroring to EndpointSlices"),
        });
    }
    if addresses_skipped > invalid {
        warnings.push(Warning {
            reason: REASON_TOO_MANY_ADDRESSES,
            message: format!(
                "A max of {max_endpoints_per_subset} addresses can be mirrored to EndpointSlices per Endpoints subset. {addresses_skipped} addresses were skipped"
            ),
        });
    }
    warnings
}

/// True when an Endpoints may be mirrored at all (upstream `shouldMirror`): it has
/// no `endpointslice.kubernetes.io/skip-mirror: "true"` label and is not a
/// leader-election lock. Whether a selectorless Service exists is checked apart.
///
/// Endpoints written by the Endpoints controller are not skipped here: they belong
/// to Services with a selector, which [`plan_mirrored_slices`] refuses. When a
/// selector is removed, the last such Endpoints is mirrored, as upstream does.
pub fn should_mirror(endpoints: &Endpoints) -> bool {
    let meta = &endpoints.metadata;
    let skip = meta.labels.as_ref().and_then(|l| l.get(labels::SKIP_MIRROR)).is_some_and(|v| v == "true");
    let leader = meta.annotations.as_ref().is_some_and(|a| a.contains_key(labels::LEADER_ELECTION));
    !skip && !leader
}

/// Plans the mirrored slices of one name (upstream `syncEndpoints` + `reconcile`).
///
/// `svc` and `endpoints` are the Service and Endpoints named by the key (`None` when
/// absent from the store); `existing` are the slices of that namespace labelled
/// `kubernetes.io/service-name=<name>` (others are ignored, as are slices whose
/// managed-by is not `config.managed_by`).
///
/// All mirrored slices are deleted when the Endpoints is missing or must not be
/// mirrored ([`should_mirror`]), or when the Service is missing or has a selector
/// ([`selector::service_selector`]: an empty one is none, as stored upstream). The Service type is not
/// looked at: a selectorless ExternalName Service is mirrored like any other.
pub fn plan_mirrored_slices(
    svc: Option<&Service>,
    endpoints: Option<&Endpoints>,
    existing: &[Arc<EndpointSlice>],
    config: &MirroringConfig,
) -> Plan<EndpointSlice> {
    let name = endpoints
        .and_then(|e| e.metadata.name.as_deref())
        .or_else(|| svc.and_then(|s| s.metadata.name.as_deref()));
    let mut mine: Vec<&EndpointSlice> = existing
        .iter()
        .map(Arc::as_ref)
        .filter(|slice| is_mirrored_for(slice, name, &config.managed_by))
        .collect();
    // Upstream keeps the first listed slice of a group; informer order is
    // arbitrary, so take a stable one.
    mine.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));

    let mirrorable = match (svc, endpoints) {
        (Some(svc), Some(endpoints)) => should_mirror(endpoints) && selector::service_selector(svc).is_none(),
        _ => false,
    };
    let Some(endpoints) = endpoints.filter(|_| mirrorable) else {
        // deleteMirroredSlices: no counts, no events.
        return Plan::delete_all(mine.into_iter().cloned());
    };

    let desired = DesiredState::from_endpoints(endpoints, config.max_endpoints_per_subset);
    let mut plan = Plan {
        warnings: warnings(
            desired.invalid_addresses,
            desired.addresses_skipped,
            config.max_endpoints_per_subset,
        ),
        ..Plan::default()
    };
    plan.endpoints.skipped = desired.addresses_skipped;

    let mut existing_by_key: BTreeMap<SliceKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in mine {
        existing_by_key.entry(SliceKey::of_slice(slice)).or_default().push(slice);
    }
    for (key, group) in &desired.groups {
        plan.endpoints.desired += group.endpoints.len();
        plan.endpoints.desired_slices +=
            crate::upstream_metrics::desired_slices(group.endpoints.len(), config.max_endpoints_per_subset);
        let existing_group = existing_by_key.remove(key).unwrap_or_default();
        reconcile_by_port_mapping(endpoints, key, group, &existing_group, config, &mut plan);
    }
    // Port sets no longer desired at all: delete, uncounted (as upstream).
    for slices in existing_by_key.into_values() {
        plan.delete.extend(slices.into_iter().cloned());
    }
    // Mirrored slices have no owner check: any of this name and managed-by may be recycled.
    recycle_deletes(&mut plan, |_| true);
    plan.without_creates_if_deleting(&endpoints.metadata)
}

/// Upstream `reconcileByPortMapping`: one slice per (address type, port set).
fn reconcile_by_port_mapping(
    endpoints: &Endpoints,
    key: &SliceKey,
    group: &desired::DesiredGroup,
    existing: &[&EndpointSlice],
    config: &MirroringConfig,
    plan: &mut Plan<EndpointSlice>,
) {
    if group.endpoints.is_empty() {
        plan.endpoints.removed += existing.iter().map(|s| endpoint_count(s)).sum::<usize>();
        plan.delete.extend(existing.iter().map(|s| (*s).clone()));
        return;
    }
    let Some((first, rest)) = existing.split_first() else {
        plan.endpoints.added += group.endpoints.len();
        plan.create.push(build::mirrored_slice(endpoints, key, group, None, config));
        return;
    };
    // Keep one slice per group and delete the rest.
    plan.delete.extend(rest.iter().map(|s| (*s).clone()));
    let totals = desired::total_changes(first, &group.endpoints);
    plan.endpoints.added += usize::try_from(totals.added).unwrap_or(0);
    plan.endpoints.removed += totals.removed;
    plan.endpoints.updated += totals.updated;
    let unchanged = totals.added == 0
        && totals.updated == 0
        && totals.removed == 0
        && build::metadata_matches(endpoints, first)
        && !build::owned_by_older_endpoints(endpoints, first);
    if !unchanged {
        plan.update.push(build::mirrored_slice(endpoints, key, group, Some(first), config));
    }
}

fn is_mirrored_for(slice: &EndpointSlice, name: Option<&str>, managed_by: &str) -> bool {
    let Some(slice_labels) = slice.metadata.labels.as_ref() else {
        return false;
    };
    let managed = slice_labels.get(labels::MANAGED_BY).is_some_and(|v| v == managed_by);
    let named = match name {
        Some(name) => slice_labels.get(labels::SERVICE_NAME).is_some_and(|v| v == name),
        None => true,
    };
    managed && named
}
