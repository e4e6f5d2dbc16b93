//! The EndpointSlice mirroring controller's pure planner.
//!
//! Input: the Service and the user-written Endpoints of one name (either may be
//! missing) and the slices that exist for that name. Output: a [`MirrorPlan`], the
//! slices to create, update and delete, plus the addresses that could not be
//! mirrored so the shell can emit upstream's Warning Events. No client, no I/O.
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

use crate::plan::SlicePlan;
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

/// The mirroring planner's result: the slice writes and what to report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MirrorPlan {
    /// Slices to write. Creates and deletes of one address type are already
    /// recycled into updates (upstream `recycleSlices`): apply it as it is.
    pub slices: SlicePlan,
    /// Addresses (as written in the Endpoints) that are not valid IPs and were skipped.
    pub invalid_addresses: Vec<String>,
    /// Addresses not mirrored for any reason: invalid, or over the per-subset cap
    /// (upstream's `addresses_skipped_per_sync`).
    pub addresses_skipped: usize,
    /// Endpoints kept in a slice but with changed fields (`endpoints_updated_per_sync`).
    pub endpoints_updated: usize,
    /// The cap in force, for the over-capacity Event message.
    pub max_endpoints_per_subset: usize,
}

/// An Event the shell records on the Endpoints object (always type Warning).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorWarning {
    /// Upstream's Event reason.
    pub reason: &'static str,
    /// Upstream's Event message.
    pub message: String,
}

impl MirrorPlan {
    /// The Warning Events upstream records on the Endpoints for this sync, in
    /// upstream's order: invalid IPs first, then the over-capacity one.
    pub fn warnings(&self) -> Vec<MirrorWarning> {
        let mut warnings = Vec::new();
        let invalid = self.invalid_addresses.len();
        if invalid > 0 {
            warnings.push(MirrorWarning {
                reason: REASON_INVALID_IP_ADDRESS,
                message: format!("Skipped {invalid} invalid IP addresses when mirroring to EndpointSlices"),
            });
        }
        // The skipped count includes the invalid addresses, as upstream's does.
        if self.addresses_skipped > invalid {
            warnings.push(MirrorWarning {
                reason: REASON_TOO_MANY_ADDRESSES,
                message: format!(
                    "A max of {} addresses can be mirrored to EndpointSlices per Endpoints subset. {} addresses were skipped",
                    self.max_endpoints_per_subset, self.addresses_skipped
                ),
            });
        }
        warnings
    }
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
) -> MirrorPlan {
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

    let mut plan =
        MirrorPlan { max_endpoints_per_subset: config.max_endpoints_per_subset, ..MirrorPlan::default() };
    let mirrorable = match (svc, endpoints) {
        (Some(svc), Some(endpoints)) => should_mirror(endpoints) && selector::service_selector(svc).is_none(),
        _ => false,
    };
    let Some(endpoints) = endpoints.filter(|_| mirrorable) else {
        // deleteMirroredSlices: no counts, no events.
        plan.slices.delete = mine.into_iter().cloned().collect();
        return plan;
    };

    let desired = DesiredState::from_endpoints(endpoints, config.max_endpoints_per_subset);
    plan.invalid_addresses = desired.invalid_addresses.clone();
    plan.addresses_skipped = desired.addresses_skipped;

    let mut existing_by_key: BTreeMap<SliceKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in mine {
        existing_by_key.entry(SliceKey::of_slice(slice)).or_default().push(slice);
    }

    let mut actions = Actions::default();
    for (key, group) in &desired.groups {
        plan.slices.endpoints_desired += group.endpoints.len();
        let existing_group = existing_by_key.remove(key).unwrap_or_default();
        reconcile_by_port_mapping(endpoints, key, group, &existing_group, config, &mut actions, &mut plan);
    }
    // Port sets no longer desired at all: delete, uncounted (as upstream).
    for slices in existing_by_key.into_values() {
        actions.delete.extend(slices.into_iter().cloned());
    }

    recycle_slices(&mut actions);
    // Never create slices for an Endpoints that is being deleted: the garbage
    // collector would race them.
    if endpoints.metadata.deletion_timestamp.is_some() {
        actions.create.clear();
    }
    plan.slices.create = actions.create;
    plan.slices.update = actions.update;
    plan.slices.delete = actions.delete;
    plan
}

/// Slice writes being assembled, before recycling.
#[derive(Default)]
struct Actions {
    create: Vec<EndpointSlice>,
    update: Vec<EndpointSlice>,
    delete: Vec<EndpointSlice>,
}

/// Upstream `reconcileByPortMapping`: one slice per (address type, port set).
fn reconcile_by_port_mapping(
    endpoints: &Endpoints,
    key: &SliceKey,
    group: &desired::DesiredGroup,
    existing: &[&EndpointSlice],
    config: &MirroringConfig,
    actions: &mut Actions,
    plan: &mut MirrorPlan,
) {
    if group.endpoints.is_empty() {
        plan.slices.endpoints_removed += existing.iter().map(|s| endpoint_count(s)).sum::<usize>();
        actions.delete.extend(existing.iter().map(|s| (*s).clone()));
        return;
    }
    let Some((first, rest)) = existing.split_first() else {
        plan.slices.endpoints_added += group.endpoints.len();
        actions.create.push(build::mirrored_slice(endpoints, key, group, None, config));
        return;
    };
    // Keep one slice per group and delete the rest.
    actions.delete.extend(rest.iter().map(|s| (*s).clone()));
    let totals = desired::total_changes(first, &group.endpoints);
    plan.slices.endpoints_added += usize::try_from(totals.added).unwrap_or(0);
    plan.slices.endpoints_removed += totals.removed;
    plan.endpoints_updated += totals.updated;
    let unchanged = totals.added == 0
        && totals.updated == 0
        && totals.removed == 0
        && build::metadata_matches(endpoints, first)
        && !build::owned_by_older_endpoints(endpoints, first);
    if !unchanged {
        actions.update.push(build::mirrored_slice(endpoints, key, group, Some(first), config));
    }
}

/// Upstream `recycleSlices`: per address type, pair creates with deletes and turn
/// each pair into an update of the slice that would have been deleted, so that
/// the number of slice objects churns less.
///
/// Upstream removes the recycled create by name, and creates have no name yet,
/// so with creates of both address types pending it can drop the wrong one and
/// then fail with AlreadyExists until map order cooperates. svcplane removes the
/// paired create itself.
fn recycle_slices(actions: &mut Actions) {
    let mut creates = std::mem::take(&mut actions.create);
    let mut deletes = std::mem::take(&mut actions.delete);
    let mut kept_creates = Vec::new();
    for mut slice in creates.drain(..) {
        match deletes.iter().position(|d| d.address_type == slice.address_type) {
            Some(at) => {
                let recycled = deletes.remove(at);
                slice.metadata.name = recycled.metadata.name;
                slice.metadata.resource_version = recycled.metadata.resource_version;
                actions.update.push(slice);
            }
            None => kept_creates.push(slice),
        }
    }
    actions.create = kept_creates;
    actions.delete = deletes;
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

fn endpoint_count(slice: &EndpointSlice) -> usize {
    slice.endpoints.as_ref().map_or(0, Vec::len)
}
