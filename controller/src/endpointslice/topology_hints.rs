//! Topology-aware hints (`service.kubernetes.io/topology-mode: Auto`): each zone
//! gets a number of ready endpoints proportional to its share of allocatable CPU,
//! or no endpoint gets a hint at all. Pure.
//!
//! Upstream: `TopologyCache.AddHints`, `getAllocations`, `getAllocatedHintsByZone`,
//! `getGivingAndReceivingZones`, `redistributeHints` and `RemoveHintsFromSlices`
//! in `k8s.io/endpointslice/topologycache` (v0.37.2). Go iterates the zone maps
//! in random order; here zones are visited in name order, which is one of
//! upstream's possible orders.

use std::collections::BTreeMap;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointHints, EndpointSlice, ForZone};

use super::nodes::ZoneShares;
use crate::ip::IpFamily;
use crate::plan::Warning;

/// A zone may receive up to 20 % more than its CPU share before it counts as
/// overloaded (upstream `overloadThreshold`).
const OVERLOAD_THRESHOLD: f64 = 0.2;

/// Upstream's Event reason when hints are refused or removed.
pub const REASON_HINTS_DISABLED: &str = "TopologyAwareHintsDisabled";
const NO_ZONE_SPECIFIED: &str = "One or more endpoints do not have a zone specified";
const NO_ALLOCATED_HINTS_FOR_ZONES: &str = "No hints allocated for zones";
const INSUFFICIENT_NODE_INFO: &str =
    "Insufficient Node information: allocatable CPU or zone not specified on one or more nodes";
const NODES_READY_IN_ONE_ZONE_ONLY: &str = "Nodes only ready in one zone";
const INSUFFICIENT_NUMBER_OF_ENDPOINTS: &str = "Insufficient number of endpoints";
const MIN_ALLOCATION_EXCEEDS_OVERLOAD_THRESHOLD: &str =
    "Unable to allocate minimum required endpoints to each zone without exceeding overload threshold";

/// How many hinted endpoints one zone should get.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Allocation {
    /// Fewest endpoints before the zone is overloaded.
    minimum: usize,
    /// Most endpoints the zone may hold given every other zone's minimum.
    maximum: usize,
    /// Its CPU share of the endpoints (at least `minimum`).
    desired: f64,
}

/// Sets Auto hints on the slices being written for one address type, moving
/// unchanged slices whose hints no longer fit into `update` (as copies). When
/// hints cannot be given, removes them everywhere and returns the Warning
/// upstream records (`TopologyAwareHintsDisabled`), on every such sync as upstream.
pub(super) fn add_hints(
    shares: Option<&ZoneShares>,
    family: IpFamily,
    create: &mut [EndpointSlice],
    update: &mut Vec<EndpointSlice>,
    unchanged: &[&EndpointSlice],
) -> Option<Warning> {
    let all = create.iter().chain(update.iter()).chain(unchanged.iter().copied());
    let ready_total = all.flat_map(endpoints).filter(|e| is_ready(e)).count();
    let allocations = match allocations(shares, ready_total) {
        Ok(allocations) => allocations,
        Err(message) => return Some(disable(message, family, create, update, unchanged.iter().copied())),
    };

    // Unchanged slices whose hints still fit stay as they are and count.
    let mut allocated: BTreeMap<String, i64> = BTreeMap::new();
    let mut kept = Vec::new();
    for slice in unchanged {
        match hints_by_zone(slice, &allocated, &allocations) {
            Some(by_zone) => {
                for (zone, count) in by_zone {
                    *allocated.entry(zone).or_default() += count as i64;
                }
                kept.push(*slice);
            }
            None => update.push((*slice).clone()),
        }
    }

    let writable = || create.iter().chain(update.iter()).flat_map(endpoints);
    if writable().any(|e| is_ready(e) && zone(e).is_none()) {
        return Some(disable(NO_ZONE_SPECIFIED.into(), family, create, update, kept));
    }
    for endpoint in create.iter_mut().chain(update.iter_mut()).flat_map(endpoints_mut) {
        if let (true, Some(zone)) = (is_ready(endpoint), zone(endpoint).map(str::to_owned)) {
            *allocated.entry(zone.clone()).or_default() += 1;
            endpoint.hints = Some(zone_hint(zone));
        }
    }

    let (giving, receiving) = giving_and_receiving_zones(&allocations, &allocated);
    let moved = redistribute(create.iter_mut().chain(update.iter_mut()), giving, receiving);
    for (zone, difference) in moved {
        *allocated.entry(zone).or_default() += difference;
    }
    if allocated.is_empty() {
        return Some(disable(NO_ALLOCATED_HINTS_FOR_ZONES.into(), family, create, update, kept));
    }
    None
}

/// Upstream `RemoveHintsFromSlices`, plus the Warning for `message`.
fn disable<'a>(
    message: String,
    family: IpFamily,
    create: &mut [EndpointSlice],
    update: &mut Vec<EndpointSlice>,
    unchanged: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Warning {
    for endpoint in create.iter_mut().chain(update.iter_mut()).flat_map(endpoints_mut) {
        endpoint.hints = None;
    }
    for slice in unchanged {
        if endpoints(slice).iter().any(|e| e.hints.is_some()) {
            let mut copy = slice.clone();
            copy.endpoints.iter_mut().flatten().for_each(|e| e.hints = None);
            update.push(copy);
        }
    }
    Warning { reason: REASON_HINTS_DISABLED, message: format!("{message}, addressType: {family}") }
}

/// Upstream `getAllocations`: per zone, the minimum, maximum and desired number
/// of endpoints, or why hints cannot be given.
fn allocations(
    shares: Option<&ZoneShares>,
    endpoints: usize,
) -> Result<BTreeMap<String, Allocation>, String> {
    let Some(shares) = shares else { return Err(INSUFFICIENT_NODE_INFO.into()) };
    let zones = shares.len();
    if zones < 2 {
        return Err(NODES_READY_IN_ONE_ZONE_ONLY.into());
    }
    if zones > endpoints {
        return Err(format!("{INSUFFICIENT_NUMBER_OF_ENDPOINTS} ({endpoints} endpoints, {zones} zones)"));
    }
    let mut allocations = BTreeMap::new();
    let mut minimum_total = 0;
    for (zone, share) in shares {
        let desired = share * endpoints as f64;
        // Upstream's exact float expression, so that ceil rounds the same way.
        let minimum = (desired * (1.0 / (1.0 + OVERLOAD_THRESHOLD))).ceil() as usize;
        minimum_total += minimum;
        if minimum_total > endpoints {
            return Err(format!(
                "{MIN_ALLOCATION_EXCEEDS_OVERLOAD_THRESHOLD} ({endpoints} endpoints, {zones} zones)"
            ));
        }
        allocations
            .insert(zone.clone(), Allocation { minimum, maximum: 0, desired: desired.max(minimum as f64) });
    }
    for allocation in allocations.values_mut() {
        allocation.maximum = allocation.minimum + endpoints - minimum_total;
    }
    Ok(allocations)
}

/// Upstream `getHintsByZone`: the hints an unchanged slice holds per zone, or
/// `None` when the slice must be rewritten (a ready endpoint without a zone
/// hint, a hint for a zone without allocation, or a zone over its maximum).
fn hints_by_zone(
    slice: &EndpointSlice,
    allocated: &BTreeMap<String, i64>,
    allocations: &BTreeMap<String, Allocation>,
) -> Option<BTreeMap<String, usize>> {
    let mut by_zone: BTreeMap<String, usize> = BTreeMap::new();
    for endpoint in endpoints(slice).iter().filter(|e| is_ready(e)) {
        let zones = endpoint.hints.as_ref().and_then(|h| h.for_zones.as_deref()).unwrap_or_default();
        if zones.is_empty() {
            return None;
        }
        for zone in zones {
            allocations.get(&zone.name)?;
            *by_zone.entry(zone.name.clone()).or_default() += 1;
        }
    }
    let fits = by_zone.iter().all(|(zone, count)| {
        let already = allocated.get(zone).copied().unwrap_or(0);
        allocations.get(zone).is_some_and(|a| already + *count as i64 <= a.maximum as i64)
    });
    fits.then_some(by_zone)
}

/// Upstream `getGivingAndReceivingZones`: how many hints each zone over its
/// desired count gives away, and each zone under it receives.
fn giving_and_receiving_zones(
    allocations: &BTreeMap<String, Allocation>,
    allocated: &BTreeMap<String, i64>,
) -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
    let mut giving_desired: BTreeMap<&str, f64> = BTreeMap::new();
    let mut receiving_desired: BTreeMap<&str, f64> = BTreeMap::new();
    for (zone, allocation) in allocations {
        let hints = allocated.get(zone).copied().unwrap_or(0) as f64;
        if hints > allocation.desired {
            giving_desired.insert(zone, hints - allocation.desired);
        } else if hints < allocation.desired {
            receiving_desired.insert(zone, allocation.desired - hints);
        }
    }
    let (mut giving, mut receiving) = (BTreeMap::new(), BTreeMap::new());
    while let (Some((give_zone, to_give)), Some((receive_zone, to_receive))) =
        (most(&giving_desired), most(&receiving_desired))
    {
        if (to_give < 1.0 && to_receive < 1.0) || to_give < 0.5 || to_receive < 0.5 {
            break;
        }
        *giving.entry(give_zone.to_owned()).or_insert(0) += 1;
        *receiving.entry(receive_zone.to_owned()).or_insert(0) += 1;
        giving_desired.insert(give_zone, to_give - 1.0);
        receiving_desired.insert(receive_zone, to_receive - 1.0);
    }
    (giving, receiving)
}

/// Upstream `getMost`: the zone with the largest positive value (first on ties).
fn most<'a>(zones: &BTreeMap<&'a str, f64>) -> Option<(&'a str, f64)> {
    let mut best: Option<(&str, f64)> = None;
    for (zone, value) in zones {
        if *value > best.map_or(0.0, |(_, v)| v) {
            best = Some((zone, *value));
        }
    }
    best
}

/// Upstream `redistributeHints`: re-hints ready endpoints of giving zones for
/// receiving zones, in slice order; returns the change of hints per zone.
fn redistribute<'a>(
    slices: impl Iterator<Item = &'a mut EndpointSlice>,
    mut giving: BTreeMap<String, i64>,
    mut receiving: BTreeMap<String, i64>,
) -> BTreeMap<String, i64> {
    let mut moved: BTreeMap<String, i64> = BTreeMap::new();
    for endpoint in slices.flat_map(endpoints_mut) {
        if !is_ready(endpoint) {
            continue;
        }
        if giving.is_empty() || receiving.is_empty() {
            break;
        }
        let Some(give_zone) = zone(endpoint).map(str::to_owned) else { continue };
        if giving.get(&give_zone).is_none_or(|n| *n <= 0) {
            continue;
        }
        let Some(receive_zone) = receiving.iter().find(|(_, n)| **n > 0).map(|(z, _)| z.clone()) else {
            continue;
        };
        endpoint.hints = Some(zone_hint(receive_zone.clone()));
        take_one(&mut giving, &give_zone);
        take_one(&mut receiving, &receive_zone);
        *moved.entry(receive_zone).or_default() += 1;
        *moved.entry(give_zone).or_default() -= 1;
    }
    moved
}

/// Counts one off `zone`, forgetting it at zero.
fn take_one(zones: &mut BTreeMap<String, i64>, zone: &str) {
    if let Some(n) = zones.get_mut(zone) {
        *n -= 1;
        if *n <= 0 {
            zones.remove(zone);
        }
    }
}

fn zone_hint(zone: String) -> EndpointHints {
    EndpointHints { for_zones: Some(vec![ForZone { name: zone }]), for_nodes: None }
}

fn endpoints(slice: &EndpointSlice) -> &[Endpoint] {
    slice.endpoints.as_deref().unwrap_or_default()
}

fn endpoints_mut(slice: &mut EndpointSlice) -> impl Iterator<Item = &mut Endpoint> {
    slice.endpoints.iter_mut().flatten()
}

fn is_ready(endpoint: &Endpoint) -> bool {
    endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(true)
}

/// The endpoint's zone, `None` when absent or empty.
fn zone(endpoint: &Endpoint) -> Option<&str> {
    endpoint.zone.as_deref().filter(|z| !z.is_empty())
}

#[cfg(test)]
#[path = "topology_hints_tests.rs"]
mod tests;
