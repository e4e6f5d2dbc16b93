//! Upstream's reconcile loop: per address type, per port set, keep unchanged
//! slices, update changed ones in place, fill slices with room, create only what
//! is missing, then turn create+delete pairs into updates. Pure.
//!
//! Upstream: `Reconcile`, `reconcileByAddressType`, `reconcileByPortMapping` and
//! `finalize` in `k8s.io/endpointslice/reconciler.go`. Go iterates maps in random
//! order; here every collection is sorted (slices by name, endpoints by identity,
//! port sets by key), so the plan is one of upstream's possible plans and the
//! same inputs always give it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use crate::stored_pod::StoredPod;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::desired::{DesiredGroup, desired_groups, selected_pods, service_address_families};
use super::meta::{build_slice, owned_by, placeholder_equal, slice_labels};
use super::{NodeLookup, SliceConfig, hints};
use crate::ip::IpFamily;
use crate::plan::{Plan, endpoint_count, recycle_deletes};
use crate::slice_keys::{EndpointIdentity, PortSet, equal_beyond_identity};

/// The whole plan for a selected Service; `managed` is sorted by name.
pub(super) fn reconcile(
    svc: &Service,
    pods: &[Arc<StoredPod>],
    nodes: &impl NodeLookup,
    managed: &[&EndpointSlice],
    trigger_time: Option<Time>,
    config: &SliceConfig,
) -> Plan<EndpointSlice> {
    let families = service_address_families(svc);
    let pods = selected_pods(svc, pods);
    let mut by_family: BTreeMap<IpFamily, Vec<&EndpointSlice>> = BTreeMap::new();
    let mut unsupported = Vec::new();
    for slice in managed {
        match IpFamily::from_name(&slice.address_type).filter(|f| families.contains(f)) {
            Some(family) => by_family.entry(family).or_default().push(slice),
            // e.g. after dual-stack → single-stack: deleted after the per-type work.
            None => unsupported.push((*slice).clone()),
        }
    }

    let mut plan = Plan::default();
    let mut missing_nodes = BTreeSet::new();
    for family in families {
        let existing = by_family.remove(&family).unwrap_or_default();
        let mut writes = reconcile_family(svc, &pods, nodes, &existing, family, config, &mut missing_nodes);
        recycle_deletes(&mut writes, |slice| owned_by(slice, svc));
        let mut writes = writes.without_creates_if_deleting(&svc.metadata);
        for slice in writes.create.iter_mut().chain(writes.update.iter_mut()) {
            let annotations = slice.metadata.annotations.get_or_insert_with(BTreeMap::new);
            crate::labels::set_trigger_time(annotations, trigger_time.as_ref());
        }
        plan.create.append(&mut writes.create);
        plan.update.append(&mut writes.update);
        plan.delete.append(&mut writes.delete);
        plan.endpoints.added += writes.endpoints.added;
        plan.endpoints.removed += writes.endpoints.removed;
        plan.endpoints.desired += writes.endpoints.desired;
        plan.endpoints.desired_slices += writes.endpoints.desired_slices;
        plan.warnings.append(&mut writes.warnings);
    }
    plan.delete.extend(unsupported);
    if !missing_nodes.is_empty() {
        let list: Vec<String> =
            missing_nodes.iter().map(|(pod, node)| format!("{pod} (node {node})")).collect();
        plan.retry = Some(format!("skipped Pods on Nodes that do not exist: {}", list.join(", ")));
    }
    plan
}

/// Upstream `reconcileByAddressType` minus the writes.
fn reconcile_family(
    svc: &Service,
    pods: &[&StoredPod],
    nodes: &impl NodeLookup,
    existing: &[&EndpointSlice],
    family: IpFamily,
    config: &SliceConfig,
    missing_nodes: &mut BTreeSet<(String, String)>,
) -> Plan<EndpointSlice> {
    let mut writes = Plan::default();
    let mut existing_by_key: BTreeMap<PortSet, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in existing {
        if owned_by(slice, svc) {
            let ports = slice.ports.as_deref().unwrap_or_default();
            existing_by_key.entry(PortSet::of(ports)).or_default().push(slice);
        } else {
            // Left over from a deleted Service of the same name (kubernetes#94720).
            writes.delete.push((*slice).clone());
        }
    }

    let groups = desired_groups(svc, pods, nodes, family, missing_nodes);
    let desired_keys: BTreeSet<PortSet> = groups.keys().cloned().collect();
    for (key, group) in groups {
        writes.endpoints.desired += group.endpoints.len();
        writes.endpoints.desired_slices +=
            crate::upstream_metrics::desired_slices(group.endpoints.len(), config.max_endpoints_per_slice);
        let slices = existing_by_key.get(&key).map(Vec::as_slice).unwrap_or_default();
        let mut port_writes = reconcile_by_port_mapping(svc, slices, group, family, config);
        writes.create.append(&mut port_writes.create);
        writes.update.append(&mut port_writes.update);
        writes.delete.append(&mut port_writes.delete);
        writes.endpoints.added += port_writes.endpoints.added;
        writes.endpoints.removed += port_writes.endpoints.removed;
    }
    // Port sets no Pod resolves to any more: all their slices go.
    for (key, slices) in &existing_by_key {
        if !desired_keys.contains(key) {
            writes.delete.extend(slices.iter().map(|s| (*s).clone()));
        }
    }

    // Every selected Service keeps at least one slice per address type.
    if existing.len() == writes.delete.len() && writes.create.is_empty() {
        let placeholder = build_slice(svc, &[], family, &config.managed_by);
        // Deleting and recreating an equivalent placeholder would churn every
        // resync (kubernetes#108231): keep the existing one instead.
        if writes.delete.len() == 1 && placeholder_equal(&writes.delete[0], &placeholder) {
            writes.delete.clear();
        } else {
            writes.create.push(placeholder);
        }
    }

    let changed: BTreeSet<&str> =
        writes.update.iter().chain(&writes.delete).filter_map(|s| s.metadata.name.as_deref()).collect();
    let unchanged: Vec<&EndpointSlice> = existing
        .iter()
        .copied()
        .filter(|s| !changed.contains(s.metadata.name.as_deref().unwrap_or_default()))
        .collect();
    let warning =
        hints::reconcile_hints(svc, nodes, family, &mut writes.create, &mut writes.update, &unchanged);
    writes.warnings.extend(warning);
    writes
}

/// Upstream `reconcileByPortMapping` for one port set; `existing` is sorted by name.
fn reconcile_by_port_mapping(
    svc: &Service,
    existing: &[&EndpointSlice],
    group: DesiredGroup,
    family: IpFamily,
    config: &SliceConfig,
) -> Plan<EndpointSlice> {
    // A limit of 0 would never place anything; upstream validates 1..=1000.
    let max = config.max_endpoints_per_slice.max(1);
    let DesiredGroup { ports, endpoints: mut desired } = group;
    let mut writes = Plan::default();
    let mut to_update: BTreeMap<String, EndpointSlice> = BTreeMap::new();
    let mut unchanged: BTreeMap<String, &EndpointSlice> = BTreeMap::new();

    // 1. Keep endpoints still desired (in their fresh version), drop the others.
    for slice in existing {
        let name = slice.metadata.name.clone().unwrap_or_default();
        let current = slice.endpoints.as_deref().unwrap_or_default();
        let mut kept = Vec::with_capacity(current.len());
        let mut endpoint_changed = false;
        for endpoint in current {
            // `remove`: an endpoint found once is placed; a duplicate is dropped.
            if let Some(fresh) = desired.remove(&EndpointIdentity::of(endpoint)) {
                endpoint_changed |= !equal_beyond_identity(&fresh, endpoint);
                kept.push(fresh);
            }
        }
        let (labels, labels_changed) = slice_labels(svc, slice.metadata.labels.as_ref(), &config.managed_by);
        if endpoint_changed || kept.len() != current.len() {
            writes.endpoints.removed += current.len() - kept.len();
            if kept.is_empty() {
                writes.delete.push((*slice).clone());
            } else {
                let mut updated = (*slice).clone();
                updated.endpoints = Some(kept);
                updated.metadata.labels = Some(labels);
                to_update.insert(name, updated);
            }
        } else if labels_changed {
            let mut updated = (*slice).clone();
            updated.metadata.labels = Some(labels);
            to_update.insert(name, updated);
        } else {
            unchanged.insert(name, slice);
        }
    }
    writes.endpoints.added = desired.len();
    let mut desired = placement_order(desired);

    // 2. Fill slices already being written, fullest first.
    if !desired.is_empty() && !to_update.is_empty() {
        let mut names: Vec<(usize, String)> =
            to_update.iter().map(|(name, slice)| (endpoint_count(slice), name.clone())).collect();
        names.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        for (_, name) in names {
            if let Some(slice) = to_update.get_mut(&name) {
                fill(slice, &mut desired, max);
            }
        }
    }

    // 3. Put a small remainder into the unchanged slice it fills best, else create.
    while !desired.is_empty() {
        let reused = if desired.len() < max {
            slice_to_fill(&unchanged, desired.len(), max).and_then(|name| unchanged.remove(&name))
        } else {
            None
        };
        let mut slice = match reused {
            Some(slice) => slice.clone(),
            None => build_slice(svc, &ports, family, &config.managed_by),
        };
        fill(&mut slice, &mut desired, max);
        match slice.metadata.name.clone() {
            Some(name) => {
                to_update.insert(name, slice);
            }
            None => writes.create.push(slice),
        }
    }
    writes.update = to_update.into_values().collect();
    writes
}

/// The order new endpoints are placed in: by address as a number (then by
/// identity). Upstream places them in Go's random map order, so this is one of
/// its possible placements; it chooses the one that keeps endpoints likely to
/// change together in the same slices. Pod IPAM (host-local, Calico blocks,
/// Cilium's cluster pool) hands a Node's range out in sequence, so numeric
/// order groups Pods by Node and, on a Node, by when they started: a rollout
/// wave turning Ready, or a Node going away, rewrites a few slices instead of
/// touching every one (string order would interleave `10.0.0.1`, `10.0.0.10`,
/// `10.0.0.100`).
fn placement_order(desired: BTreeMap<EndpointIdentity, Endpoint>) -> VecDeque<Endpoint> {
    let mut ordered: Vec<(Option<IpAddr>, Endpoint)> = desired
        .into_values()
        .map(|endpoint| (endpoint.addresses.first().and_then(|a| a.parse().ok()), endpoint))
        .collect();
    // Stable: equal addresses keep their identity order.
    ordered.sort_by_key(|(address, _)| *address);
    ordered.into_iter().map(|(_, endpoint)| endpoint).collect()
}

/// Moves desired endpoints into `slice`, in placement order, until it is full.
fn fill(slice: &mut EndpointSlice, desired: &mut VecDeque<Endpoint>, max: usize) {
    let endpoints = slice.endpoints.get_or_insert_with(Vec::new);
    while endpoints.len() < max {
        let Some(endpoint) = desired.pop_front() else {
            break;
        };
        endpoints.push(endpoint);
    }
}

/// Upstream `getSliceToFill`: the unchanged slice that ends closest to full
/// without exceeding `max` after taking `count` endpoints; first exact fit wins.
fn slice_to_fill(unchanged: &BTreeMap<String, &EndpointSlice>, count: usize, max: usize) -> Option<String> {
    let mut closest: Option<(usize, &String)> = None;
    for (name, slice) in unchanged {
        let Some(room) = max.checked_sub(count + endpoint_count(slice)) else {
            continue;
        };
        if closest.is_none_or(|(best, _)| room < best) {
            closest = Some((room, name));
            if room == 0 {
                break;
            }
        }
    }
    // Upstream starts from `closestDiff = max`, so a slice with exactly `max`
    // room (an empty slice, `count` 0) is never picked; `count` is never 0 here.
    closest.filter(|(room, _)| *room < max).map(|(_, name)| name.clone())
}
